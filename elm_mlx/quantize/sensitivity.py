"""How much each layer's quantization error costs the model, measured: per layer and candidate
setting, the KL divergence of the model's next-token distribution from the float model's.

For each quantizable layer l, the float model is run on a calibration slice with that one layer
rounded to the probe setting (the uniform setting asked for), everything else float, and the mean
KL(float || perturbed) over the slice's positions is measured: K_l. Blocks below l are not run
again (their outputs are kept), so a layer costs a forward pass from its block up. For small
perturbations the KL is quadratic in the weight error, so the other candidates' costs follow
from the probe's by the ratio of their weighted rounding errors,
    E_l(s) = K_l * m_l(s) / m_l(probe),  m_l(s) = Sum_o,j H_jj dW_oj(s)^2,
with H = E[x x^T] over the layer's inputs (dW: the error of rounding to the grids `grid.fit_grid`
picks for s). A measured K_l takes in what a curvature estimate must approximate: how the
network downstream amplifies or absorbs that layer's error (HAWQ's Hessian-aware allocation,
Dong et al. 2019, and mlx-lm's dynamic quantization rank layers by such estimates; the measured
loss of quantizing one layer is the ranking of e.g. SqueezeLLM's and LLM-MQ's sensitivity
studies). A tied embedding is measured once, in both roles (lookup and logits).

The output layer (an untied head, or the tied embedding) is probed as calibration will fit it:
by GPTQ on the second moment of the float model's final hidden states over calibration windows
(`CalibrationConfig.output_probe_windows`), not rounded to nearest. GPTQ removes ~60% of that layer's loss, on held-out prose as
well as in sample (BENCHMARKS.md, issue 17, third round), where a block layer's gain ranges from
none to 10x and does not carry to held-out text (ninth round: probing the blocks by GPTQ did
not pay). Probed by rounding, the tied embedding of the noisy SmolLM2 (a fifth of its weights)
looked worth 5 bits in some calibration samples, and those plans, the blocks' bits moved to it,
lost 10-16% more KL on held-out text than the same samples' plans with the embedding probed as
it is fitted (thirteenth round).

Memory: the float activations at each block boundary on the slice, and two slices of logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from ..models import CausalLM
from .blockwise import linears, module_paths, output_layers, run_block
from .grid import Setting, codes_on, dequantize, fit_grid
from .layers import quantize_weight

Progress = Callable[[int, int], None]  # (layers done, layers in all)


@dataclass
class LayerOptions:
    """A layer's candidates as (cost in bits, estimated loss increase, setting)."""

    size: int  # weights
    options: list[tuple[float, float, Setting]]


class Energy(nn.Module):
    """Passes through to `linear`, adding up x^2 of its inputs per input: diag E[x x^T]."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear
        self.energy = mx.zeros((linear.weight.shape[1],), mx.float32)
        self.count = 0

    def __call__(self, x: mx.array) -> mx.array:
        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        self.energy = self.energy + (flat * flat).sum(0)
        self.count += flat.shape[0]
        return self.linear(x)

    def diagonal(self) -> np.ndarray:
        return np.array(self.energy) / max(self.count, 1)


def rounded(w: np.ndarray, h_diag: np.ndarray, s: Setting, dtype: mx.Dtype) -> np.ndarray:
    """w (out, n) rounded to the nearest point of the grids fitted for s (unclipped: a ranking
    needs no clipping search, and it halves the time)."""
    scales, biases = fit_grid(w, h_diag, s, dtype, shrinks=(1.0,))
    return dequantize(codes_on(w, scales, biases, s.bits), scales, biases)


def weighted_errors(
    w: np.ndarray, h_diag: np.ndarray, candidates: Sequence[Setting], dtype: mx.Dtype
) -> dict[Setting, float]:
    """m(s) = Sum_o,j H_jj (w - round_s(w))_oj^2 for each candidate that fits w (out, n)."""
    return {
        s: float(((rounded(w, h_diag, s, dtype) - w) ** 2).sum(0) @ h_diag)
        for s in candidates
        if s.fits(w.shape[1])
    }


def measure(
    model: CausalLM,
    tokens: mx.array,
    candidates: Sequence[Setting],
    probe: Setting,
    dtype: mx.Dtype,
    progress: Progress | None = None,
    windows: mx.array | None = None,
) -> dict[str, LayerOptions]:
    """LayerOptions for every Linear of every block and for the embedding (and an untied output
    layer), measured on the float model with the token windows (N, L); the output layer is
    probed by GPTQ on the final hidden states of `windows` (M, L') (the calibration windows;
    by default `tokens`)."""
    paths = module_paths(model)
    embedding, head, norm = output_layers(model)
    logits_of = head if head is not None else embedding.as_linear
    blocks = model.layers

    # The float pass: each block's input, each linear layer's diag E[x x^T], the reference.
    inputs = [embedding(tokens).astype(mx.float32)]  # (N, L, D) at each block boundary
    energies: list[list[tuple[str, Energy]]] = []
    for block in blocks:
        wrapped = [(p, Energy(m)) for p, m in linears(block)]
        block.update_modules(tree_unflatten(wrapped))
        inputs.append(block(inputs[-1], "causal", None))
        mx.eval(inputs[-1], [e.energy for _, e in wrapped])
        block.update_modules(tree_unflatten([(p, e.linear) for p, e in wrapped]))
        energies.append(wrapped)
    final = norm(inputs[-1])
    reference = nn.log_softmax(logits_of(final).astype(mx.float32))  # (N, L, V)
    p_ref = mx.exp(reference)
    h_head = np.array((final.astype(mx.float32) ** 2).mean((0, 1)))  # (D,)
    mx.eval(reference, p_ref)
    output = head if head is not None else embedding
    moment = final_moment(model, tokens if windows is None else windows)  # (D, D)

    def kl_from(i: int, h: mx.array | None = None) -> float:
        """Mean KL(float || model) per position, running blocks i.. on h (by default the float
        input of block i)."""
        h = inputs[i] if h is None else h
        for block in blocks[i:]:
            h = block(h, "causal", None)
        logprobs = nn.log_softmax(logits_of(norm(h)).astype(mx.float32))
        return (p_ref * (reference - logprobs)).sum(-1).mean().item()

    def options(module: nn.Module, h_diag: np.ndarray, start: int) -> LayerOptions:
        """The module's candidates, its probe's KL measured from block `start` up."""
        w = np.array(module.weight.astype(mx.float32))
        errors = weighted_errors(w, h_diag, candidates, dtype)
        unit = 0.0
        if errors:  # probed at the probe setting, or the fitting one nearest to it
            near = min(
                errors,
                key=lambda s: (abs(s.bits - probe.bits), abs(s.group_size - probe.group_size)),
            )
            original = module.weight
            if module is output:  # as calibration fits it
                module.weight = quantize_weight(original, near, dtype, moment).dequantized()
            else:
                module.weight = mx.array(rounded(w, h_diag, near, dtype))
            try:
                h = embedding(tokens).astype(mx.float32) if module is embedding else None
                unit = kl_from(start, h) / max(errors[near], 1e-30)
            finally:
                module.weight = original
        scale_bytes = mx.zeros((), dtype).itemsize
        return LayerOptions(
            w.size,
            [(w.size * s.bits_per_weight(scale_bytes), unit * m, s) for s, m in errors.items()],
        )

    layers = [
        (f"{paths[id(block)]}.{p}", e.linear, e.diagonal(), i)
        for i, (block, wrapped) in enumerate(zip(blocks, energies, strict=True))
        for p, e in wrapped
    ]
    if head is not None:
        layers.append((paths[id(head)], head, h_head, len(blocks)))
        flat = np.ones(embedding.weight.shape[1], np.float32)  # a lookup: rows used unweighted
        layers.append((paths[id(embedding)], embedding, flat, 0))
    else:  # tied: one matrix in both roles, weighted as the output layer
        layers.append((paths[id(embedding)], embedding, h_head, 0))
    result: dict[str, LayerOptions] = {}
    for done, (path, module, h_diag, start) in enumerate(layers, 1):
        result[path] = options(module, h_diag, start)
        if progress is not None:
            progress(done, len(layers))
    return result


def final_moment(model: CausalLM, windows: mx.array) -> np.ndarray:
    """E[x x^T] (D, D) of the float model's final hidden states x (after the last norm) over
    the token windows (N, L)."""
    embedding, _, norm = output_layers(model)
    h = embedding(windows).astype(mx.float32)  # (N, L, D)
    for block in model.layers:
        h = run_block(block, h)
    x = norm(h).reshape(-1, h.shape[-1]).astype(mx.float32)  # (tokens, D)
    return np.array(x.T @ x, dtype=np.float64) / x.shape[0]
