"""Tuning a quantized model's scales and biases end to end, with the float model as teacher
(the second stage of `elm convert --tune-seconds`, after `block_tuning`'s block by block).

After GPTQ has chosen every layer's codes, the per-group scales and biases are trained by Adam
to bring the quantized model's next-token distribution closer to the float model's on the
calibration text (the objective of mlx-lm's DWQ, "distilled weight quantization"; the
learnable quantization parameters of OmniQuant, Shao et al. 2024, which trains them block by
block as `block_tuning` does, here trained on the model's output). The codes stay as they are, so the folder keeps MLX's layout
(mlx-lm loads it). It runs within a time budget, and keeps the parameters that did best on
windows it does not train on; they start from GPTQ's, so tuning never makes those worse.

The loss is the exact KL divergence of the quantized model's next-token distribution from the
float model's. The float model need not stay beside the quantized one: the teacher keeps its
final hidden states on the windows and its output layer, and recomputes its logits for each
step's windows (one matmul; all windows' logits would be tokens x vocabulary floats). The
sparse teacher it replaces (the 64 most likely tokens and one bucket for the rest) trained
nearly as well, but its held-out score, which decides what is kept and what the report says,
was a lower bound that on a random model's nearly flat distributions holds ~1.5% of the
probability mass in its tokens (BENCHMARKS.md, issue 17, seventeenth round).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn

from ..errors import OptionError
from ..models import family_of
from .blockwise import output_layers
from .calibration_text import held_out_split
from .layers import scales_training, train_kept

BATCH = 4  # windows per training step


@dataclass(frozen=True)
class DistillConfig:
    """How the scales and biases are tuned (`elm convert --tune-seconds`)."""

    seconds: float = 0.0  # time budget for the training steps (0: no tuning)
    # of it, the share spent tuning each block to the float block's outputs as calibration
    # goes (`block_tuning`), the rest on the whole model after it. Most: chosen when the
    # whole model's tuning never beat GPTQ on this CPU's budget (BENCHMARKS.md, issue 17,
    # fourth and eighth rounds). Since the sixteenth it pays too: all of 900 s end to end gave
    # the noisy SmolLM2 its best pydoc KL and prose perplexity, in one run under other load than
    # the split's (seventeenth round), which does not settle the default
    block_share: float = 0.75  # below 1
    # tokens per training window: all the calibration windows are cut into windows this long,
    # so the steps draw on all of the text. On the noisy SmolLM2, windows of 128 from ~100k
    # tokens, 4 a step, per group at 1e-5 cut held-out prose KL 6% in 100 steps, where 12
    # windows of 512, 2 a step, per row at 1e-3 never beat GPTQ (BENCHMARKS.md, issue 17,
    # sixteenth round)
    window: int = 128
    # relative to each group's step; Adam moves every parameter by about this much a step, and
    # per group there are millions of them: 1e-3 took the random OpenELM's KL from 0.013 to 0.09
    learning_rate: float = 1e-5
    per_group: bool = True  # a factor and a shift per group (as DWQ's), not per output row
    held_out_windows: int = 8  # of the windows, those scored to keep the best (spread)
    score_every: int = 10  # steps between scorings
    max_steps: int | None = None  # also stop after this many steps (a run that does not
    # depend on the machine's speed: tests, comparisons)


@dataclass(frozen=True)
class Teacher:
    """The float model on the calibration windows, as much of it as its next-token
    distributions need: the final hidden states (after the last norm) and the output layer."""

    hidden: mx.array  # (N, L, D)
    head: mx.array  # (V, D) the float output layer's weight (the embedding's, when tied)
    seconds_per_window: float  # the float model's forward pass, timed here

    def logprobs(self, index: mx.array) -> mx.array:
        """The float model's next-token log-probabilities (B, L, V) on windows `index` (B,)."""
        logits = self.hidden[index] @ self.head.T  # (B, L, V)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@dataclass(frozen=True)
class DistillResult:
    steps: int
    seconds: float
    held_out_before: float  # KL on the held-out windows, GPTQ's parameters
    held_out_after: float  # ... the parameters kept

    def summary(self) -> str:
        kept = "kept" if self.held_out_after < self.held_out_before else "not kept (no better)"
        return (
            f"scales and biases tuned to the float model for {self.seconds:.0f}s ({self.steps} "
            f"steps), {kept}: KL on held-out calibration windows {self.held_out_before:.4f} -> "
            f"{self.held_out_after:.4f}"
        )


def teacher(model: nn.Module, windows: mx.array) -> Teacher:
    """The float `model` on the windows (N, L), before it is quantized."""
    body, _ = family_of(model).body_and_embedding(model)
    embedding, head, _ = output_layers(model)
    weight = (head if head is not None else embedding).weight  # tied: the embedding's
    hidden = []
    tic = time.perf_counter()
    for i in range(windows.shape[0]):
        hidden.append(body(windows[i : i + 1], None).astype(mx.float32))  # (1, L, D)
        mx.eval(hidden[-1])
    seconds = (time.perf_counter() - tic) / windows.shape[0]
    return Teacher(mx.concatenate(hidden), weight, seconds)


def kl_divergence(logits: mx.array, target: mx.array) -> mx.array:
    """Mean KL(teacher || model) over positions: the model's logits and the teacher's
    log-probabilities, both (..., V)."""
    logprobs = logits.astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    return (mx.exp(target) * (target - logprobs)).sum(-1).mean()


def cut(windows: mx.array, length: int) -> mx.array:
    """Windows (N, L) cut into windows of `length` tokens (N * (L // length), length); what is
    left at the end of each is dropped. Windows no longer than `length` stay as they are."""
    n, full = windows.shape
    if full <= length:
        return windows
    pieces = full // length
    return windows[:, : pieces * length].reshape(n * pieces, length)


def check_tuning_budget(config: DistillConfig, target: Teacher) -> None:
    """The end-to-end share of the budget must pay for at least two steps and the held-out
    scoring; a step (forward and backward of BATCH windows) estimated from the teacher's
    forward pass."""
    step_seconds = 3.5 * BATCH * target.seconds_per_window
    needed = 3 * step_seconds / (1 - config.block_share)
    if config.seconds and config.seconds < needed:
        raise OptionError(
            "tune_seconds",
            f"{config.seconds:g}s is too short for tuning: one step takes about "
            f"{step_seconds:.0f}s on this machine; give at least {needed:.0f} "
            "(or 0 for no tuning)",
        )


def end_to_end(config: DistillConfig) -> DistillConfig:
    """The config of the end-to-end stage: what the blocks' share leaves of the budget."""
    return replace(config, seconds=config.seconds * (1 - config.block_share))


def distill(
    model: nn.Module,
    windows: mx.array,
    target: Teacher,
    config: DistillConfig,
    progress: Callable[[float, float], None] | None = None,
) -> DistillResult:
    """Tune the quantized `model`'s scales and biases in place toward `target` on `windows`
    (N, L) for `config.seconds`; `held_out_windows` of them, spread over all, are scored, not
    trained on."""
    n = windows.shape[0]
    if n <= config.held_out_windows:
        raise OptionError(
            "tune_seconds", f"tuning needs more than {config.held_out_windows} windows"
        )
    held, train = held_out_split(n, config.held_out_windows)

    def loss(w: mx.array, lp: mx.array) -> mx.array:
        return kl_divergence(model(w), lp)

    def held_out() -> float:
        scores = [loss(windows[i : i + 1], target.logprobs(mx.array([i]))).item() for i in held]
        return sum(scores) / len(held)

    order = [train[i] for i in mx.random.permutation(len(train)).tolist()]

    def batch(step: int) -> tuple[mx.array, mx.array]:
        index = mx.array([order[(step * BATCH + j) % len(order)] for j in range(BATCH)])
        return windows[index], target.logprobs(index)

    with scales_training(model, per_group=config.per_group):  # two steps at least
        steps, seconds, before, best = train_kept(
            model,
            loss,
            batch,
            held_out,
            config.seconds,
            config.learning_rate,
            config.score_every,
            config.max_steps,
            min_steps=2,
            progress=progress,
        )
    return DistillResult(steps, seconds, before, best)
