"""How much each layer's quantization error costs the model: per layer and candidate setting,
an estimate of the increase of the calibration loss.

Second order, with the Kronecker-factored curvature of K-FAC (Martens & Grosse 2015): when the
weight of a linear layer y = W x moves by dW, the summed loss grows by about
    1/2 tr(G dW H dW^T),  H = E[x x^T] over its inputs,  G = Sum_tokens g g^T, g = dLoss/dy,
the empirical Fisher of its outputs. Keeping both diagonals (rounding errors of different
inputs are nearly uncorrelated: on SmolLM2 the full H changes the estimate by under 5%) gives
    E_l(s) = 1/2 Sum_o,j G_oo H_jj dW_oj^2,
with dW the error of rounding to the grids `grid.fit_grid` picks for setting s. GPTQ later
removes a similar share of it everywhere (about 4x on SmolLM2), which leaves the ranking. The
same idea drives HAWQ's Hessian-aware bit allocation (Dong et al. 2019) and mlx-lm's dynamic
quantization (a gradient-times-error score), here without a weight-sized gradient. A tied
embedding counts twice: in the logits (output Fisher: the softmax's (p - y)^2) and in the rows
looked up (the gradient reaching the first block, per token id).

Memory: the activations at each block boundary for a few windows, and one block's backward
pass at a time (no weight gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from ..models import CausalLM
from .blockwise import linears, module_paths, output_layers
from .grid import Setting, codes_on, dequantize, fit_grid

Progress = Callable[[int, int], None]  # (blocks done, blocks in all)


@dataclass
class LayerOptions:
    """A layer's candidates as (cost in bits, estimated loss increase, setting)."""

    size: int  # weights
    options: list[tuple[float, float, Setting]]


class Probe(nn.Module):
    """Wraps a Linear: adds up x^2 of its inputs per input (plain calls), and adds `delta` to
    its output (so that the gradient w.r.t. delta is dLoss/dy)."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear
        self.delta: mx.array | None = None
        self.energy = mx.zeros((linear.weight.shape[1],), mx.float32)
        self.count = 0

    def __call__(self, x: mx.array) -> mx.array:
        if self.delta is not None:
            return self.linear(x) + self.delta
        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        self.energy = self.energy + (flat * flat).sum(0)
        self.count += flat.shape[0]
        return self.linear(x)

    def input_moment(self) -> np.ndarray:
        """diag E[x x^T]"""
        return np.array(self.energy) / max(self.count, 1)


def candidate_options(
    w: mx.array,
    h_diag: np.ndarray,
    g: np.ndarray | None,
    candidates: Sequence[Setting],
    dtype: mx.Dtype,
    lookups: tuple[np.ndarray, np.ndarray] | None = None,
) -> LayerOptions:
    """Each candidate's cost and estimated loss increase for the weight w (out, n), given the
    diagonal of its input moment (n,), its output Fisher g (out,) if it is an output/linear
    layer, and for an embedding the Fisher of the rows looked up (`lookups`: row ids and their
    summed squared gradients (ids, n))."""
    scale_bytes = mx.zeros((), dtype).itemsize
    w_np = np.array(w.astype(mx.float32))
    options = []
    for s in candidates:
        if not s.fits(w_np.shape[1]):
            continue
        # unclipped grids only: a ranking needs no clipping search, and it halves the time
        scales, biases = fit_grid(w_np, h_diag, s, dtype, shrinks=(1.0,))
        dw2 = (dequantize(codes_on(w_np, scales, biases, s.bits), scales, biases) - w_np) ** 2
        err = 0.0 if g is None else 0.5 * float(g @ dw2 @ h_diag)
        if lookups is not None:
            ids, fisher = lookups
            err += 0.5 * float((fisher * dw2[ids]).sum())
        options.append((w_np.size * s.bits_per_weight(scale_bytes), err, s))
    return LayerOptions(w_np.size, options)


def estimate(
    model: CausalLM,
    windows: mx.array,
    candidates: Sequence[Setting],
    dtype: mx.Dtype,
    progress: Progress | None = None,
) -> dict[str, LayerOptions]:
    """LayerOptions for every Linear of every block and for the embedding (and an untied output
    layer), measured on the float model with the token windows (N, L)."""
    paths = module_paths(model)
    blocks = model.layers
    probes = []
    for block in blocks:
        wrapped = [(p, Probe(m)) for p, m in linears(block)]
        block.update_modules(tree_unflatten(wrapped))
        probes.append(wrapped)
    try:
        return _estimate(model, windows, candidates, dtype, progress, paths, probes)
    finally:
        for block, wrapped in zip(blocks, probes, strict=True):
            block.update_modules(tree_unflatten([(p, probe.linear) for p, probe in wrapped]))


def _with_deltas(block: nn.Module, wrapped: list[tuple[str, Probe]]) -> Callable:
    """block(h) with `deltas[k]` added to the output of its k-th linear layer."""

    def run(h: mx.array, *deltas: mx.array) -> mx.array:
        for (_, probe), d in zip(wrapped, deltas, strict=True):
            probe.delta = d
        return block(h, "causal", None)

    return run


def _estimate(model, windows, candidates, dtype, progress, paths, probes):
    embedding, head, norm = output_layers(model)
    blocks = model.layers
    inputs = [embedding(windows).astype(mx.float32)]  # (N, L, D) at each block boundary
    for block, wrapped in zip(blocks, probes, strict=True):
        inputs.append(block(inputs[-1], "causal", None))
        mx.eval(inputs[-1], [probe.energy for _, probe in wrapped])

    # The top: the summed next-token loss through the final norm and the output layer.
    logits_of = head if head is not None else embedding.as_linear
    targets = windows[:, 1:]

    def top_loss(h: mx.array) -> mx.array:
        logits = logits_of(norm(h))[:, :-1]
        return nn.losses.cross_entropy(logits, targets, reduction="sum")

    _, (grad,) = mx.vjp(top_loss, [inputs[-1]], [mx.array(1.0)])
    final = norm(inputs[-1])[:, :-1].astype(mx.float32)  # (N, L-1, D)
    probs = mx.softmax(logits_of(final), axis=-1)  # (N, L-1, V)
    onehot = mx.arange(probs.shape[-1])[None, None] == targets[..., None]
    g_head = np.array(((probs - onehot) ** 2).sum((0, 1)))  # (V,)
    h_head = np.array((final * final).mean((0, 1)))  # (D,)
    del probs, onehot, final

    result: dict[str, LayerOptions] = {}
    for i in range(len(blocks) - 1, -1, -1):
        block, wrapped, h_in = blocks[i], probes[i], inputs[i]

        deltas = [mx.zeros((*h_in.shape[:2], p.linear.weight.shape[0])) for _, p in wrapped]
        _, (grad, *grad_deltas) = mx.vjp(_with_deltas(block, wrapped), [h_in, *deltas], [grad])
        mx.eval(grad, grad_deltas)
        for (p, probe), gd in zip(wrapped, grad_deltas, strict=True):
            probe.delta = None
            g = np.array((gd * gd).sum((0, 1)))  # (out,)
            result[f"{paths[id(block)]}.{p}"] = candidate_options(
                probe.linear.weight, probe.input_moment(), g, candidates, dtype
            )
        inputs[i + 1] = None  # free the activations above
        if progress is not None:
            progress(len(blocks) - i, len(blocks))

    # Embedding rows: the gradient reaching block 0, added up per token id.
    ids = np.array(windows).reshape(-1)
    g_in = np.array(grad.astype(mx.float32)).reshape(len(ids), -1) ** 2
    uniq, inverse = np.unique(ids, return_inverse=True)
    fisher = np.zeros((len(uniq), g_in.shape[1]), np.float64)
    np.add.at(fisher, inverse, g_in)
    lookups = (uniq, fisher)
    if head is None:  # tied: one matrix, both roles
        result[paths[id(embedding)]] = candidate_options(
            embedding.weight, h_head, g_head, candidates, dtype, lookups
        )
    else:
        result[paths[id(head)]] = candidate_options(head.weight, h_head, g_head, candidates, dtype)
        flat = np.ones(embedding.weight.shape[1], np.float32)
        result[paths[id(embedding)]] = candidate_options(
            embedding.weight, flat, None, candidates, dtype, lookups
        )
    return result
