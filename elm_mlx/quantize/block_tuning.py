"""Tuning a quantized block's scales and biases to the float block's outputs, as calibration
goes block by block (the first stage of `elm convert --tune-seconds`).

GPTQ fits each layer to its own float output; a block's layers then meet in its attention and
its MLP's non-linearity, where their errors add up or cancel. Once GPTQ has chosen a block's
codes, its scales and biases (a factor and a shift per group, relative to the group's step) are
trained by Adam on the mean squared error between the quantized block's outputs and the float
block's, both run on the calibration activations that reach the block through the blocks
already quantized: the block-wise objective of OmniQuant (Shao et al. 2024, arXiv:2308.13137),
whose learnable clipping this is, and of AutoRound (Cheng et al. 2023, arXiv:2309.05516), which
tunes the same min/max factors block by block. The codes stay, so the layout is MLX's (mlx-lm
loads the folder). Windows spread over the calibration text are held out: the parameters kept
are those with the least error on them, GPTQ's unless beaten, so the stage never makes their
block error worse.

Against tuning the whole model to its next-token distribution (`distill`), a block's outputs
give a target per hidden unit, not per token, and a step costs one block's forward and
backward pass, not the model's: on this project's CPU the same seconds buy ~30x the steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .calibration_text import spread_index
from .layers import tune_scales


@dataclass(frozen=True)
class BlockTuning:
    """How each block's scales and biases are tuned (the seconds come from `--tune-seconds`)."""

    seconds: float = 0.0  # per block (0: no tuning)
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
class BlockTuned:
    """One block's tuning: its held-out error (mean squared, per hidden unit) before and kept."""

    steps: int
    seconds: float
    before: float
    after: float


def block_error(block: nn.Module, h: mx.array, target: mx.array, index: list[int]) -> float:
    """Mean squared error of the block's outputs on windows `index` of h against `target`."""
    total = 0.0
    for i in index:
        out = block(h[i : i + 1], "causal", None)
        total += mx.mean((out - target[i : i + 1]) ** 2).item()
    return total / len(index)


def tune_block(block: nn.Module, h: mx.array, target: mx.array, config: BlockTuning) -> BlockTuned:
    """Tune the quantized block's scales and biases in place so that its outputs on h (N, L, D)
    come closer to `target` (N, L, D), the float block's outputs on h, for `config.seconds`."""
    n = h.shape[0]
    held = spread_index(n, min(config.held_out_windows, n // 2))
    train = sorted(set(range(n)) - set(held))
    if not held or not train:
        return BlockTuned(0, 0.0, 0.0, 0.0)  # too few windows to both train and check

    def loss(x: mx.array, y: mx.array) -> mx.array:
        return mx.mean((block(x, "causal", None) - y) ** 2)

    def batch(step: int) -> tuple[mx.array, mx.array]:
        index = mx.array(
            [train[(step * config.batch + j) % len(train)] for j in range(config.batch)]
        )
        return h[index], target[index]

    steps, seconds, before, best = tune_scales(
        block,
        per_group=True,
        loss=loss,
        batch=batch,
        score=lambda: block_error(block, h, target, held),
        seconds=config.seconds,
        learning_rate=config.learning_rate,
        score_every=config.score_every,
        max_steps=config.max_steps,
    )
    return BlockTuned(steps, seconds, before, best)


def summary(tuned: list[BlockTuned]) -> str:
    """One line on what tuning the blocks did, for convert's report."""
    change = [t.after / t.before - 1 for t in tuned if t.before > 0]
    mean = 100 * sum(change) / max(len(change), 1)
    return (
        f"blocks' scales and biases tuned to the float blocks' outputs for "
        f"{sum(t.seconds for t in tuned):.0f}s ({sum(t.steps for t in tuned)} steps): their "
        f"error on held-out calibration windows {mean:+.1f}% on average"
    )
