"""Quantized layer -> float layer: the one place that undoes MLX's quantized Linear and
Embedding (used by `elm fuse --dequantize`, LoRA fusing, and calibrated quantization's float
stand-ins)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def dequantized_weight(
    layer: nn.QuantizedLinear | nn.QuantizedEmbedding, dtype: mx.Dtype | None = None
) -> mx.array:
    """The float weight (out, in) or (vocab, dim) a quantized layer computes with; `dtype`
    upcasts the scales and biases first (None: their stored dtype)."""
    scales, biases = layer.scales, layer.biases
    if dtype is not None:
        scales, biases = scales.astype(dtype), biases.astype(dtype)
    return mx.dequantize(
        layer.weight, scales, biases, group_size=layer.group_size, bits=layer.bits,
        mode=layer.mode,
    )  # fmt: skip


def float_layer(module: nn.Module, dtype: mx.Dtype | None = None) -> nn.Module:
    """A float nn.Linear / nn.Embedding computing what a quantized one does (other modules are
    returned as they are)."""
    if not isinstance(module, QUANTIZED):
        return module
    weight = dequantized_weight(module, dtype)
    if isinstance(module, nn.QuantizedEmbedding):
        out = nn.Embedding(*weight.shape)
    else:
        out = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
        if "bias" in module:
            out.bias = module.bias
    out.weight = weight
    return out
