"""Tuning a quantized block to the float model as calibration goes block by block (the first
stage of `elm convert --tune-seconds`): first its norms' gains, then its scales and biases.

GPTQ fits each layer to its own float output; a block's layers then meet in its attention and
its MLP's non-linearity, where their errors add up or cancel, and each block inherits the drift
of the blocks before it. Two stages, each trained by Adam within its share of the block's
seconds, with windows spread over the calibration text held out: the parameters kept are those
with the least error on them, the starting ones unless beaten, so neither stage makes its
block error worse there.

1. Norm tweaking (Li et al. 2024, "Norm Tweaking: High-performance Low-bit Quantization of
   Large Language Models", arXiv:2309.02784): the gains of the block's RMSNorms, as a factor
   (1 + g) per hidden unit, trained so that the quantized block's outputs on the quantized
   model's activations come closer to the float model's own activations after the same block
   (so a block also undoes some drift it inherits), each hidden unit's squared error divided
   by its mean square (the residual stream's few massive units would otherwise be all the
   loss). A thousand parameters per block, so the gain holds off the calibration text: on the
   noisy SmolLM2 it cut the KL 5% on held-out prose as on the calibration domain's held-out
   tail, where the scales' many parameters (stage 2) gain only on the latter (BENCHMARKS.md,
   issue 17, tenth round). The norms stay float tensors of the same shape.
2. The scales and biases of its quantized layers (a factor and a shift per group, relative to
   the group's step), trained on the mean squared error to the float block's outputs on the
   same inputs: the block-wise objective of OmniQuant (Shao et al. 2024, arXiv:2308.13137),
   whose learnable clipping this is, and of AutoRound (Cheng et al. 2023, arXiv:2309.05516),
   which tunes the same min/max factors block by block. The codes stay, so the layout is
   MLX's (mlx-lm loads the folder).

Against tuning the whole model to its next-token distribution (`distill`), a block's outputs
give a target per hidden unit, not per token, and a step costs one block's forward and
backward pass, not the model's: on this project's CPU the same seconds buy ~30x the steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .calibration_text import held_out_split
from .layers import float_weights, scales_training, train_kept


@dataclass(frozen=True)
class BlockTuning:
    """How each block is tuned (the seconds come from `--tune-seconds`)."""

    seconds: float = 0.0  # per block (0: no tuning)
    # of them, the norms' gains' share (the rest: the scales and biases). Half: on the noisy
    # SmolLM2 (`--tune-seconds 600`) held-out prose KL 0.147 against 0.152 with the norms given
    # it all, pydoc the same (BENCHMARKS.md, issue 17, eleventh round)
    norm_share: float = 0.5
    # Adam's step on the gains, relative to each: 2e-3 for 20 steps (gains moved up to 20%)
    # cut the noisy SmolLM2's held-out prose KL by 5%
    norm_learning_rate: float = 2e-3
    # relative to each group's step. Adam moves all ~100k factors of a block by about this
    # each step: 3e-5 cut the noisy SmolLM2's held-out block errors by 17% on average in 28
    # steps; on a random OpenELM block 1e-4 and above made it worse, 3e-3 diverged
    # (BENCHMARKS.md, issue 17, eighth round)
    learning_rate: float = 3e-5
    batch: int = 4  # calibration windows per step
    held_out_windows: int = 4  # windows scored, not trained on (spread over all of them)
    score_every: int = 7  # steps between scorings
    max_steps: int | None = None  # also stop after this many steps (tests, comparisons)


@dataclass(frozen=True)
class Tuned:
    """One stage of a block's tuning: its held-out error before and kept."""

    steps: int = 0
    seconds: float = 0.0
    before: float = 0.0
    after: float = 0.0


@dataclass(frozen=True)
class BlockTuned:
    norms: Tuned  # error: to the float model's activations, each hidden unit's normalised
    scales: Tuned  # error: mean squared, to the float block's outputs on the same inputs


class TunableNorm(nn.Module):
    """An RMSNorm whose gain trains as a factor (1 + gain) of the weight it had, in float32."""

    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        self.weight0 = norm.weight.astype(mx.float32)
        self.gain = mx.zeros(norm.weight.shape, mx.float32)
        self.eps = norm.eps

    def tuned(self) -> mx.array:
        return self.weight0 * (1 + self.gain)

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.tuned().astype(x.dtype), self.eps)


@contextmanager
def norms_training(block: nn.Module) -> Iterator[None]:
    """Within it, the block's RMSNorms are `TunableNorm`s and only their gains train; on
    leaving, the norms come back with the weights those hold (in their own dtype)."""
    norms = [(p, m) for p, m in block.named_modules() if isinstance(m, nn.RMSNorm)]
    tunable = [(p, TunableNorm(m)) for p, m in norms]
    block.update_modules(tree_unflatten(tunable))
    block.freeze()
    for _, m in tunable:
        m.unfreeze(keys=["gain"], recurse=False)
    try:
        yield
    finally:
        for (_, norm), (_, t) in zip(norms, tunable, strict=True):
            norm.weight = t.tuned().astype(norm.weight.dtype)
        block.update_modules(tree_unflatten(norms))


def tune_norms(
    block: nn.Module, h: mx.array, target: mx.array, config: BlockTuning, seconds: float
) -> Tuned:
    """Tune the gains of the block's RMSNorms in place so that its outputs on h (N, L, D) come
    closer to `target` (N, L, D), each hidden unit's error weighted by 1 / its mean square in
    `target`. A block without norm weights (OLMo's) is left as it is."""
    held, train = _split(h.shape[0], config)
    if not train or not any(isinstance(m, nn.RMSNorm) for _, m in block.named_modules()):
        return Tuned()
    weight = 1.0 / (mx.mean(mx.square(target.astype(mx.float32)), axis=(0, 1)) + 1e-6)  # (D,)
    with float_weights(block), norms_training(block):
        result = train_kept(
            block,
            lambda x, y: mx.mean(mx.square(block(x, "causal", None) - y) * weight),
            _batches(h, target, train, config.batch),
            lambda: block_error(block, h, target, held, weight),
            seconds,
            config.norm_learning_rate,
            config.score_every,
            config.max_steps,
        )
    return Tuned(*result)


def _split(n: int, config: BlockTuning) -> tuple[list[int], list[int]]:
    """(held-out, training) window indices: too few windows to both train and check, none."""
    held, train = held_out_split(n, min(config.held_out_windows, n // 2))
    return (held, train) if held and train else ([], [])


def _batches(
    h: mx.array, target: mx.array, train: list[int], size: int
) -> Callable[[int], tuple[mx.array, mx.array]]:
    """Step -> (inputs, target) of `size` training windows, taken in turn."""

    def batch(step: int) -> tuple[mx.array, mx.array]:
        index = mx.array([train[(step * size + j) % len(train)] for j in range(size)])
        return h[index], target[index]

    return batch


def block_error(
    block: nn.Module,
    h: mx.array,
    target: mx.array,
    index: list[int],
    weight: mx.array | float = 1.0,
) -> float:
    """Mean squared error of the block's outputs on windows `index` of h against `target`,
    each hidden unit's weighted by `weight` (D,)."""
    total = 0.0
    for i in index:
        out = block(h[i : i + 1], "causal", None)
        total += mx.mean(mx.square(out - target[i : i + 1]) * weight).item()
    return total / len(index)


def tune_block(
    block: nn.Module, h: mx.array, local: mx.array, stream: mx.array, config: BlockTuning
) -> BlockTuned:
    """Tune the quantized block in place for `config.seconds`: its norms' gains towards
    `stream` (N, L, D), the float model's activations after the float block, then its scales
    and biases towards `local` (N, L, D), the float block's outputs on h (N, L, D), the
    quantized model's activations before it."""
    norms = tune_norms(block, h, stream, config, config.seconds * config.norm_share)
    held, train = _split(h.shape[0], config)
    if not train:
        return BlockTuned(norms, Tuned())
    with scales_training(block, per_group=True):
        result = train_kept(
            block,
            lambda x, y: mx.mean(mx.square(block(x, "causal", None) - y)),
            _batches(h, local, train, config.batch),
            lambda: block_error(block, h, local, held),
            config.seconds - norms.seconds,
            config.learning_rate,
            config.score_every,
            config.max_steps,
        )
    return BlockTuned(norms, Tuned(*result))


def summary(tuned: list[BlockTuned]) -> str:
    """One line on what tuning the blocks did, for convert's report."""

    def mean_change(stages: list[Tuned]) -> str:
        change = [t.after / t.before - 1 for t in stages if t.before > 0]
        return f"{100 * sum(change) / max(len(change), 1):+.1f}%"

    norms, scales = [t.norms for t in tuned], [t.scales for t in tuned]
    return (
        f"blocks tuned to the float model for "
        f"{sum(t.seconds for t in norms + scales):.0f}s: norms' gains "
        f"({sum(t.steps for t in norms)} steps) {mean_change(norms)}, scales and biases "
        f"({sum(t.steps for t in scales)} steps) {mean_change(scales)} on average in the "
        f"error on held-out calibration windows"
    )
