"""Calibrated quantization of a float model, one transformer block at a time.

For each block, in order: run it (in float) on the calibration activations that reach it from
the blocks already quantized, accumulating each linear layer's input second moment
H = X^T X / N; quantize each layer with GPTQ on grids fitted to it (`layers.quantize_weight`);
then run the quantized block to get the next block's inputs ("sequential" GPTQ, so later
blocks compensate for what earlier ones lost). The output layer comes last, with H from the
final hidden states (the tied embedding of OpenELM, OLMo and SmolLM2 is that output layer).
Memory: the model, which shrinks as layers are quantized, plus one block's activations on the
calibration windows and one layer's H.

Asymmetric calibration (GPTAQ, `asymmetric` > 0; Li et al. 2025, arXiv:2504.02692): GPTQ fits
each layer to its own float weights applied to the quantized model's inputs X_q, so a layer
never undoes the drift its inputs carry from the blocks before. Here the float model's
activations are carried through the float blocks alongside, and each layer is fitted towards
the float model's output X_f W^T instead (`gptq.asymmetric_target`), which needs the cross
moment (X_f - X_q)^T X_q of the same tokens: per BATCH windows, a float pass records each
layer's inputs and the quantized pass pairs them. Memory: the float model's activations too,
and one BATCH of recorded inputs per layer.

With a tuning budget (`block_tuning`), each block's norms' gains are then trained towards the
float model's activations after it and its scales and biases to the float block's outputs on
the same inputs, before the next block's inputs are computed; memory: the float model's
activations and the float block's outputs too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from ..models import CausalLM, family_of
from .block_tuning import BlockTuned, BlockTuning, tune_block
from .gptq import asymmetric_target
from .grid import Setting
from .layers import float_stand_in, float_weights, quantize_weight, quantized_module

Progress = Callable[[int, int], None]  # (blocks done, blocks in all)
BATCH = 4  # calibration windows per forward pass


class InputMoments(nn.Module):
    """Stands in for `linear` while its block is calibrated. On the quantized stream it runs
    the layer's quantized stand-in once there is one, else the float layer, and while `active`
    adds up x^T x of its inputs in float32 and, with `asymmetric`, (x_f - x)^T x, x_f being
    what the layer saw in the float model on the same tokens: `float_pass` runs the float
    layer and records its inputs for the quantized pass that follows to pair with (a layer
    runs once per forward)."""

    def __init__(self, linear: nn.Linear, asymmetric: bool = False):
        super().__init__()
        self.linear = linear
        n = linear.weight.shape[1]
        self.moment = mx.zeros((n, n), mx.float32)
        self.cross = mx.zeros((n, n), mx.float32) if asymmetric else None
        self.count = 0
        self.active = True
        self.float_pass = False
        self.reference: mx.array | None = None  # (tokens, n) the float model's inputs
        self.stand_in: nn.Module | None = None  # the quantized layer, as float
        self.calls: list[tuple[InputMoments, mx.array]] | None = None  # order of calls

    def __call__(self, x: mx.array) -> mx.array:
        if self.calls is not None:
            self.calls.append((self, x))
        if self.float_pass:
            if self.active and self.cross is not None:
                self.reference = x.reshape(-1, x.shape[-1]).astype(mx.float32)
            return self.linear(x)
        if self.active:
            flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)  # (tokens, n)
            self.moment = self.moment + flat.T @ flat
            if self.cross is not None and self.reference is not None:
                self.cross = self.cross + (self.reference - flat).T @ flat
            self.count += flat.shape[0]
        return (self.linear if self.stand_in is None else self.stand_in)(x)

    def second_moment(self) -> np.ndarray:
        return np.array(self.moment, dtype=np.float64) / max(self.count, 1)

    def cross_moment(self) -> np.ndarray:
        """(X_f - X)^T X / N (n, n)."""
        assert self.cross is not None
        return np.array(self.cross, dtype=np.float64) / max(self.count, 1)


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


def towards_float(
    weight: mx.array, moment: np.ndarray, cross: np.ndarray, share: float
) -> mx.array:
    """The layer's weight (out, n) moved `share` of the way to its asymmetric target."""
    w32 = np.array(weight.astype(mx.float32))
    return mx.array(asymmetric_target(w32, moment, cross, share))


def input_stages(block: nn.Module, wrapped: list[InputMoments], h: mx.array) -> list[list[int]]:
    """Indices into `wrapped` in the order the block calls them, grouped by shared input
    (Llama's q, k and v; gate and up): each group's inputs depend only on groups before it."""
    calls: list[tuple[InputMoments, mx.array]] = []
    for w in wrapped:
        w.calls = calls
    try:
        block(h[:1, :8], "causal", None)  # builds the graph only: call order, not values
    finally:
        for w in wrapped:
            w.calls = None
    index = {id(w): k for k, w in enumerate(wrapped)}
    stages: list[list[int]] = []
    for k, (w, x) in enumerate(calls):
        if k and x is calls[k - 1][1]:
            stages[-1].append(index[id(w)])
        else:
            stages.append([index[id(w)]])
    return stages


def quantize_block(
    block: nn.Module,
    prefix: str,
    h: mx.array,
    plan: Mapping[str, Setting],
    dtype: mx.Dtype,
    h_float: mx.array | None = None,
    asymmetric: float = 0.0,
) -> tuple[mx.array, mx.array | None]:
    """Quantize the block's planned layers in place; return its outputs on h (N, L, D), now
    quantized, and given the float model's activations h_float (N, L, D), the float block's
    outputs on them.

    Without h_float every layer is fitted at once to its inputs on h through the float block.
    With it (GPTAQ), layers are fitted in the order the block runs them, each to its inputs
    through the layers already quantized (GPTQ's "true sequential", as GPTAQ does: a layer that
    undoes the drift of its inputs from the float model's must see what the quantized layers
    before it leave of that drift, or both would undo it), to a target moved the share
    `asymmetric` of the way towards the float model's output (`gptq.asymmetric_target`)."""
    pair = h_float is not None
    layers = [(p, InputMoments(m, pair)) for p, m in linears(block) if f"{prefix}.{p}" in plan]
    wrapped = [w for _, w in layers]
    block.update_modules(tree_unflatten(layers))
    quantized: list[tuple[str, nn.Module]] = []
    float_outs: list[mx.array] = []
    try:
        stages = input_stages(block, wrapped, h) if pair else [list(range(len(wrapped)))]
        for s, stage in enumerate(stages):
            for k, w in enumerate(wrapped):
                w.active = k in stage
            for i in range(0, h.shape[0], BATCH):
                if pair:  # the float block first: the stage's layers record their inputs
                    for w in wrapped:
                        w.float_pass = True
                    out = block(h_float[i : i + BATCH], "causal", None)
                    mx.eval(out, [wrapped[k].reference for k in stage])
                    if s == 0:
                        float_outs.append(out)
                    for w in wrapped:
                        w.float_pass = False
                stats = [wrapped[k].moment for k in stage]
                stats += [wrapped[k].cross for k in stage if pair]
                mx.eval(block(h[i : i + BATCH], "causal", None), stats)
                for k in stage:
                    wrapped[k].reference = None
            for k in stage:
                path, w = layers[k]
                w.active = False
                moment, weight = w.second_moment(), w.linear.weight
                if pair:
                    weight = towards_float(weight, moment, w.cross_moment(), asymmetric)
                w.moment = w.cross = mx.zeros((0,))  # free them before the next GPTQ state
                q = quantize_weight(weight, plan[f"{prefix}.{path}"], dtype, moment)
                quantized.append((path, quantized_module(w.linear, q)))
                w.stand_in = float_stand_in(quantized[-1][1])
        out = run_block(block, h)
    finally:
        block.update_modules(tree_unflatten([(p, w.linear) for p, w in layers]))
    block.update_modules(tree_unflatten(quantized))
    return out, (mx.concatenate(float_outs) if pair else None)


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
    asymmetric: float = 0.0,
    tune: BlockTuning | None = None,
) -> list[BlockTuned]:
    """Quantize, in place, every layer `plan` names (module path -> setting), calibrated on
    the token windows (N, L); scales and biases are stored in `dtype`. With `asymmetric` > 0
    the float model's activations are carried alongside, and each block layer is fitted (that
    share of the way) to the float model's outputs rather than to its own weights applied to
    the quantized model's inputs (GPTAQ, `gptq.asymmetric_target`). With `tune.seconds`, each
    block is then tuned to the float model (`block_tuning`); returns what that did per block."""
    paths = module_paths(model)
    embedding, head, norm = output_layers(model)
    h = embedding(windows).astype(mx.float32)  # (N, L, D)
    mx.eval(h)
    tuning = tune is not None and tune.seconds > 0
    # (N, L, D) the float model's activations, block by block: GPTAQ's and the norms' target
    h_float = h if asymmetric > 0 or tuning else None
    blocks = model.layers
    tuned: list[BlockTuned] = []
    for i, block in enumerate(blocks):
        h_in = h
        if tuning:  # the float block, before it is quantized
            local, stream = run_block(block, h), run_block(block, h_float)  # (N, L, D) each
        h, float_out = quantize_block(
            block, paths[id(block)], h, plan, dtype, h_float if asymmetric > 0 else None, asymmetric
        )
        if tuning:
            tuned.append(tune_block(block, h_in, local, stream, tune))
            with float_weights(block):  # the next block's inputs, through the tuned block
                h = run_block(block, h_in)
            h_float = stream
            del local
        else:
            h_float = float_out
        del h_in
        if progress is not None:
            progress(i + 1, len(blocks))
    final = norm(h).reshape(-1, h.shape[-1]).astype(mx.float32)  # (tokens, D)
    moment = np.array(final.T @ final, dtype=np.float64) / final.shape[0]
    updates = []
    if head is not None and paths[id(head)] in plan:
        weight = head.weight
        if asymmetric > 0:
            # an untied output layer is fitted as the blocks' layers are; a tied one is not,
            # being the input embedding too, which the correction would move as well
            final_float = norm(h_float).reshape(-1, h.shape[-1]).astype(mx.float32)
            cross = np.array((final_float - final).T @ final, dtype=np.float64) / final.shape[0]
            weight = towards_float(weight, moment, cross, asymmetric)
            del final_float
        q = quantize_weight(weight, plan[paths[id(head)]], dtype, moment)
        updates.append((paths[id(head)], quantized_module(head, q)))
    del h, h_float, final
    if paths[id(embedding)] in plan:
        # tied: the embedding is the output layer, fitted to its inputs; untied: a lookup table
        h_emb = moment if head is None else None
        q = quantize_weight(embedding.weight, plan[paths[id(embedding)]], dtype, h_emb)
        updates.append((paths[id(embedding)], quantized_module(embedding, q)))
    model.update_modules(tree_unflatten(updates))
    return tuned
