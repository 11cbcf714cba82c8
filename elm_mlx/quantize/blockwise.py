"""Calibrated quantization of a float model, one transformer block at a time.

For each block, in order: run it (in float) on the calibration activations that reach it from
the blocks already quantized, accumulating each linear layer's input second moment
H = X^T X / N; quantize each layer with GPTQ on grids fitted to it (`layers.quantize_weight`);
then run the quantized block to get the next block's inputs ("sequential" GPTQ, so later
blocks compensate for what earlier ones lost). The output layer comes last, with H from the
final hidden states (the tied embedding of OpenELM, OLMo and SmolLM2 is that output layer).
Memory: the model, which shrinks as layers are quantized, plus one block's activations on the
calibration windows and one layer's H.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from ..models import CausalLM, family_of
from .grid import Setting
from .layers import float_stand_in, quantize_weight, quantized_module

Progress = Callable[[int, int], None]  # (blocks done, blocks in all)
BATCH = 4  # calibration windows per forward pass


class InputMoments(nn.Module):
    """Passes through to `linear`, adding up x^T x of its inputs in float32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        n = linear.weight.shape[1]
        self.moment = mx.zeros((n, n), mx.float32)
        self.count = 0

    def __call__(self, x: mx.array) -> mx.array:
        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)  # (tokens, n)
        self.moment = self.moment + flat.T @ flat
        self.count += flat.shape[0]
        return self.linear(x)

    def second_moment(self) -> np.ndarray:
        return np.array(self.moment, dtype=np.float64) / max(self.count, 1)


def module_paths(model: nn.Module) -> dict[int, str]:
    return {id(m): path for path, m in model.named_modules()}


def linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The block's Linear layers as (path inside the block, layer)."""
    return [(p, m) for p, m in block.named_modules() if isinstance(m, nn.Linear)]


def run_block(block: nn.Module, h: mx.array) -> mx.array:
    """The block applied to every calibration window h (N, L, D), a few windows at a time."""
    outs = []
    for i in range(0, h.shape[0], BATCH):
        out = block(h[i : i + BATCH], "causal", None)
        mx.eval(out)
        outs.append(out)
    return mx.concatenate(outs)


def quantize_block(
    block: nn.Module, prefix: str, h: mx.array, plan: Mapping[str, Setting], dtype: mx.Dtype
) -> mx.array:
    """Quantize the block's planned layers in place; return its output on h (quantized)."""
    wrapped = [(p, InputMoments(m)) for p, m in linears(block) if f"{prefix}.{p}" in plan]
    block.update_modules(tree_unflatten(wrapped))
    try:
        for i in range(0, h.shape[0], BATCH):
            mx.eval(block(h[i : i + BATCH], "causal", None), [w.moment for _, w in wrapped])
    finally:
        block.update_modules(tree_unflatten([(p, w.linear) for p, w in wrapped]))
    quantized = []
    for p, w in wrapped:
        moment = w.second_moment()
        w.moment = mx.zeros((0,))  # free it before the next layer's GPTQ state
        q = quantize_weight(w.linear.weight, plan[f"{prefix}.{p}"], dtype, moment)
        quantized.append((p, quantized_module(w.linear, q)))
    block.update_modules(tree_unflatten([(p, float_stand_in(m)) for p, m in quantized]))
    out = run_block(block, h)
    block.update_modules(tree_unflatten(quantized))
    return out


def output_layers(model: CausalLM) -> tuple[nn.Module, nn.Module | None, nn.Module]:
    """(token embedding, untied output layer or None, final norm)."""
    body, embedding = family_of(model).body_and_embedding(model)
    return embedding, getattr(model, "lm_head", None), body.norm


def calibrate(
    model: CausalLM,
    windows: mx.array,
    plan: Mapping[str, Setting],
    dtype: mx.Dtype,
    progress: Progress | None = None,
) -> None:
    """Quantize, in place, every layer `plan` names (module path -> setting), calibrated on
    the token windows (N, L); scales and biases are stored in `dtype`."""
    paths = module_paths(model)
    embedding, head, norm = output_layers(model)
    h = embedding(windows).astype(mx.float32)  # (N, L, D)
    mx.eval(h)
    blocks = model.layers
    for i, block in enumerate(blocks):
        h = quantize_block(block, paths[id(block)], h, plan, dtype)
        if progress is not None:
            progress(i + 1, len(blocks))
    final = norm(h).reshape(-1, h.shape[-1]).astype(mx.float32)  # (tokens, D)
    moment = np.array(final.T @ final, dtype=np.float64) / final.shape[0]
    del h, final
    updates = []
    if head is not None and paths[id(head)] in plan:
        q = quantize_weight(head.weight, plan[paths[id(head)]], dtype, moment)
        updates.append((paths[id(head)], quantized_module(head, q)))
    if paths[id(embedding)] in plan:
        # tied: the embedding is the output layer, fitted to its inputs; untied: a lookup table
        h_emb = moment if head is None else None
        q = quantize_weight(embedding.weight, plan[paths[id(embedding)]], dtype, h_emb)
        updates.append((paths[id(embedding)], quantized_module(embedding, q)))
    model.update_modules(tree_unflatten(updates))


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
