"""Quantizing one layer: from a float weight and its calibration statistics to MLX's quantized
module, and the float stand-ins used to run quantized layers fast on the CPU backend."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

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
