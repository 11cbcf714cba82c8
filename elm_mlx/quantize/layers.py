"""Quantizing one layer: from a float weight and its calibration statistics to MLX's quantized
module; the float stand-ins used to run quantized layers fast on the CPU backend, and those
whose scales and biases train (the tuning stages, `block_tuning` and `distill`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_unflatten

from ..dequantize import float_layer
from .gptq import gptq
from .grid import Setting, codes_on, fit_grid, pack


@dataclass
class QuantizedWeight:
    """A weight on its grid: packed codes, and per-group scales and biases in the stored dtype."""

    weight: mx.array  # (out, n * bits / 32) uint32
    scales: mx.array  # (out, n / group_size)
    biases: mx.array
    setting: Setting

    def dequantized(self) -> mx.array:
        s = self.setting
        return mx.dequantize(self.weight, self.scales, self.biases, s.group_size, s.bits)


def quantize_weight(
    w: mx.array, setting: Setting, dtype: mx.Dtype, h: np.ndarray | None = None
) -> QuantizedWeight:
    """`w` (out, n) on per-group grids chosen by `grid.fit_grid`; with the input second moment
    `h` (n, n) the codes come from GPTQ, without it from rounding to nearest."""
    w_np = np.array(w.astype(mx.float32))
    importance = np.ones(w_np.shape[1], np.float32) if h is None else np.diag(h)
    scales, biases = fit_grid(w_np, importance, setting, dtype)
    if h is None:
        codes = codes_on(w_np, scales, biases, setting.bits)
    else:
        codes = gptq(w_np, h, scales, biases, setting.bits)
    return QuantizedWeight(
        pack(codes, setting.bits),
        mx.array(scales).astype(dtype),
        mx.array(biases).astype(dtype),
        setting,
    )


def weight_error(w: mx.array, q: QuantizedWeight, h: np.ndarray) -> float:
    """tr(dW H dW^T) / tr(W H W^T): the relative output error on the calibration inputs."""
    w32 = w.astype(mx.float32)
    dw = q.dequantized().astype(mx.float32) - w32
    hm = mx.array(h.astype(np.float32))
    num = ((dw @ hm) * dw).sum()
    den = ((w32 @ hm) * w32).sum()
    return (num / mx.maximum(den, 1e-30)).item()


def quantized_module(module: nn.Module, q: QuantizedWeight) -> nn.Module:
    """The nn.QuantizedLinear / nn.QuantizedEmbedding holding `q` in place of `module`."""
    s = q.setting
    if isinstance(module, nn.Embedding):
        out = nn.QuantizedEmbedding(*module.weight.shape, group_size=s.group_size, bits=s.bits)
    else:
        rows, cols = module.weight.shape
        bias = "bias" in module
        out = nn.QuantizedLinear(cols, rows, bias=bias, group_size=s.group_size, bits=s.bits)
        if bias:
            out.bias = module.bias
    out.weight, out.scales, out.biases = q.weight, q.scales, q.biases
    out.freeze()
    return out


def float_stand_in(module: nn.Module) -> nn.Module:
    """A float Linear/Embedding computing exactly what a quantized one does (its dequantized
    weight): MLX's CPU backend runs quantized matmuls ~10x slower than float ones. In float32,
    as the loader computes on the CPU backend (scales upcast before use)."""
    return float_layer(module, mx.float32)


def swap_quantized(
    model: nn.Module, stand_in: Callable[[nn.Module], nn.Module]
) -> list[tuple[str, nn.Module]]:
    """Swap every quantized layer for `stand_in(layer)`; returns the swaps to undo it."""
    swaps = [
        (p, m)
        for p, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    ]
    model.update_modules(tree_unflatten([(p, stand_in(m)) for p, m in swaps]))
    return swaps


def dequantized_view(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Swap every quantized layer for its float stand-in; returns the swaps to undo it."""
    return swap_quantized(model, float_stand_in)


@contextmanager
def float_weights(module: nn.Module) -> Iterator[None]:
    """Within it, `module`'s quantized layers compute through their float stand-ins (the same
    values, ~10x faster on the CPU backend); on leaving, the quantized layers are back."""
    swaps = dequantized_view(module)
    try:
        yield
    finally:
        module.update_modules(tree_unflatten(swaps))


class Tunable(nn.Module):
    """A quantized Linear or Embedding computed through its dequantized weight, in float32, so
    that it trains fast on the CPU backend (and exactly on any). What trains is relative to
    each group's step (as AutoRound tunes its clipping factors): scales s0 * exp(log_scale)
    and biases b0 + s0 * shift, so one learning rate suits layers of any magnitude; one factor
    and shift per output row (`per_group` False: few parameters, for few tokens) or per group."""

    def __init__(self, q: nn.Module, per_group: bool = False):
        super().__init__()
        self.weight = q.weight
        self.scales0 = q.scales.astype(mx.float32)
        self.biases0 = q.biases.astype(mx.float32)
        shape = self.scales0.shape if per_group else (self.scales0.shape[0], 1)
        self.log_scale = mx.zeros(shape)
        self.shift = mx.zeros(shape)
        if "bias" in q:
            self.bias = q.bias
        self.group_size, self.bits = q.group_size, q.bits
        self.lookup = isinstance(q, nn.QuantizedEmbedding)

    def scales_and_biases(self) -> tuple[mx.array, mx.array]:
        return self.scales0 * mx.exp(self.log_scale), self.biases0 + self.scales0 * self.shift

    def __call__(self, x: mx.array) -> mx.array:
        if self.lookup:  # only the rows looked up, as nn.QuantizedEmbedding
            scales, biases = self.scales_and_biases()
            return mx.dequantize(self.weight[x], scales[x], biases[x], self.group_size, self.bits)
        return self.as_linear(x)

    def as_linear(self, x: mx.array) -> mx.array:
        scales, biases = self.scales_and_biases()
        w = mx.dequantize(self.weight, scales, biases, self.group_size, self.bits)
        y = x @ w.T
        return y + self.bias if "bias" in self else y


@contextmanager
def scales_training(model: nn.Module, per_group: bool = False) -> Iterator[None]:
    """Within it, `model`'s quantized layers are `Tunable` ones and only their factors and
    shifts train; on leaving, the quantized layers come back with the scales and biases those
    hold (rounded to the stored dtype: the codes, shapes and dtypes stay)."""
    originals = swap_quantized(model, lambda q: Tunable(q, per_group))
    model.freeze()
    for _, m in model.named_modules():
        if isinstance(m, Tunable):
            m.unfreeze(keys=["log_scale", "shift"], recurse=False)
    try:
        yield
    finally:
        tuned = dict(model.named_modules())
        for path, q in originals:
            scales, biases = tuned[path].scales_and_biases()
            q.scales, q.biases = scales.astype(q.scales.dtype), biases.astype(q.biases.dtype)
        model.update_modules(tree_unflatten(originals))
        mx.eval(model.parameters())


def train_kept(
    module: nn.Module,
    loss: Callable[..., mx.array],
    batch: Callable[[int], tuple[mx.array, ...]],
    score: Callable[[], float],
    seconds: float,
    learning_rate: float,
    score_every: int,
    max_steps: int | None = None,
    min_steps: int = 0,
    progress: Callable[[float, float], None] | None = None,
) -> tuple[int, float, float, float]:
    """Train `module`'s trainable parameters by Adam on `loss(*batch(step))` while a step and a
    scoring still fit in `seconds` (at least `min_steps`, at most `max_steps`), scoring every
    `score_every` steps with `score` (lower is better) and keeping the best parameters, the
    starting ones unless beaten. Returns (steps, seconds, score before, score kept)."""
    tic = time.perf_counter()
    before = best = score()
    kept = module.trainable_parameters()  # updates replace parameters, never change them
    grad_fn = nn.value_and_grad(module, loss)
    optimizer = optim.Adam(learning_rate=learning_rate)
    steps, step_s, score_s = 0, 0.0, 0.0
    while steps < min_steps or time.perf_counter() - tic + step_s + score_s < seconds:
        if max_steps is not None and steps >= max_steps:
            break
        t0 = time.perf_counter()
        _, grads = grad_fn(*batch(steps))
        optimizer.update(module, grads)
        mx.eval(module.trainable_parameters(), optimizer.state)
        steps += 1
        step_s = time.perf_counter() - t0
        if steps % score_every == 0:
            t0 = time.perf_counter()
            if (now := score()) < best:
                best, kept = now, module.trainable_parameters()
            score_s = time.perf_counter() - t0
        if progress is not None:
            progress(time.perf_counter() - tic, seconds)
    if steps % score_every and (now := score()) < best:
        best, kept = now, module.trainable_parameters()
    module.update(kept)
    return steps, time.perf_counter() - tic, before, best
