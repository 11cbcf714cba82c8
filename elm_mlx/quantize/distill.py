"""Tuning a quantized model's scales and biases end to end, with the float model as teacher
(the second stage of `elm convert --tune-seconds`, after `block_tuning`'s block by block).

After GPTQ has chosen every layer's codes, the per-group scales and biases are trained by Adam
to bring the quantized model's next-token distribution closer to the float model's on the
calibration text (the objective of mlx-lm's DWQ, "distilled weight quantization"; the
learnable quantization parameters of OmniQuant, Shao et al. 2024, which trains them block by
block as `block_tuning` does, here trained on the model's output). The codes stay as they are, so the folder keeps MLX's layout
(mlx-lm loads it). It runs within a time budget, and keeps the parameters that did best on
windows it does not train on; they start from GPTQ's, so tuning never makes those worse.

The teacher's distributions are kept sparse, so the float model need not stay beside the
quantized one: per token, the `top_k` most likely tokens and their log-probabilities. The loss
is the KL divergence between the two distributions coarsened to those tokens plus one bucket
for all the others: exact for the coarsened distributions and a lower bound of the full KL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn

from ..errors import OptionError
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
    # fourth and eighth rounds); since the sixteenth it pays too, and the split is not remeasured
    block_share: float = 0.75  # below 1
    # tokens per training window: all the calibration windows are cut into windows this long,
    # so the steps draw on all of the text. On the noisy SmolLM2, windows of 128 from ~100k
    # tokens, 4 a step, per group at 1e-5 cut held-out prose KL 6% in 100 steps, where 12
    # windows of 512, 2 a step, per row at 1e-3 never beat GPTQ (BENCHMARKS.md, issue 17,
    # sixteenth round)
    window: int = 128
    top_k: int = 64  # teacher tokens kept per position
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
    """The float model's sparse next-token distributions on the calibration windows."""

    ids: mx.array  # (N, L, K) int32: the K most likely tokens at each position
    logprobs: mx.array  # (N, L, K) float32: their log-probabilities
    seconds_per_window: float  # the float model's forward pass, timed here


@dataclass(frozen=True)
class DistillResult:
    steps: int
    seconds: float
    held_out_before: float  # coarsened KL on the held-out windows, GPTQ's parameters
    held_out_after: float  # ... the parameters kept

    def summary(self) -> str:
        kept = "kept" if self.held_out_after < self.held_out_before else "not kept (no better)"
        return (
            f"scales and biases tuned to the float model for {self.seconds:.0f}s ({self.steps} "
            f"steps), {kept}: KL on held-out calibration windows {self.held_out_before:.4f} -> "
            f"{self.held_out_after:.4f}"
        )


def teacher(model: nn.Module, windows: mx.array, top_k: int) -> Teacher:
    """The float `model`'s top-k log-probabilities on each window (N, L)."""
    ids, logprobs = [], []
    tic = time.perf_counter()
    for i in range(windows.shape[0]):
        logits = model(windows[i : i + 1]).astype(mx.float32)  # (1, L, V)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        top = mx.argpartition(-lp, kth=top_k - 1, axis=-1)[..., :top_k]  # (1, L, K)
        ids.append(top.astype(mx.int32))
        logprobs.append(mx.take_along_axis(lp, top, axis=-1))
        mx.eval(ids[-1], logprobs[-1])
    seconds = (time.perf_counter() - tic) / windows.shape[0]
    return Teacher(mx.concatenate(ids), mx.concatenate(logprobs), seconds)


def coarse_kl(logits: mx.array, ids: mx.array, target: mx.array) -> mx.array:
    """Mean KL(teacher || model) over positions, both coarsened to the teacher's top tokens
    plus the rest: logits (..., V), ids and target log-probabilities (..., K)."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mine = mx.take_along_axis(logprobs, ids, axis=-1)  # (..., K)
    p = mx.exp(target)
    p_rest = mx.maximum(1.0 - p.sum(-1), 1e-9)
    q_rest = mx.maximum(1.0 - mx.exp(mine).sum(-1), 1e-9)
    kl = (p * (target - mine)).sum(-1) + p_rest * (mx.log(p_rest) - mx.log(q_rest))
    return kl.mean()


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

    def loss(w: mx.array, ids: mx.array, lp: mx.array) -> mx.array:
        return coarse_kl(model(w), ids, lp)

    def held_out() -> float:
        total = sum(
            loss(windows[i : i + 1], target.ids[i : i + 1], target.logprobs[i : i + 1]).item()
            for i in held
        )
        return total / len(held)

    order = [train[i] for i in mx.random.permutation(len(train)).tolist()]

    def batch(step: int) -> tuple[mx.array, mx.array, mx.array]:
        index = mx.array([order[(step * BATCH + j) % len(order)] for j in range(BATCH)])
        return windows[index], target.ids[index], target.logprobs[index]

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
