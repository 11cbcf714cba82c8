"""Training losses: cross-entropy over the trained targets, and per-row log-probabilities
(for preference losses), computed in chunks of positions.

The output layer's logits, (B, L, vocab) in fp32, are the largest tensors of a training step
on a small model (400 MB for 2048 tokens of a 49k vocabulary). The chunked loss never holds
more than one chunk of them: its forward pass also computes the gradient with respect to the
hidden states, chunk by chunk, and the backward pass just scales that gradient. The FLOPs are
those of the plain loss; only the peak memory drops. The output layer must be frozen, as it is
under LoRA (its own gradient is not computed).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..models import family_of

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB in fp32


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module, Callable[[mx.array], mx.array]]:
    """(body, head module, head function): model(x) == head_fn(body(x, None))."""
    body, embedding = family_of(model).body_and_embedding(model)
    if "lm_head" in model:
        return body, model.lm_head, model.lm_head
    return body, embedding, embedding.as_linear


def cross_entropy_sum(
    model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array, grad: bool = True
) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over the positions where mask is 1, and their count.

    inputs, targets, mask: (B, L). Uses the chunked loss when the output layer is frozen;
    `grad=False` (validation) skips the hidden-state gradient it would compute.
    """
    body, head, head_fn = body_and_head(model)
    if tree_flatten(head.trainable_parameters()):
        logits = model(inputs).astype(mx.float32)  # (B, L, V)
        return (nn.losses.cross_entropy(logits, targets) * mask).sum(), mask.sum()
    h = body(inputs, None)  # (B, L, D)
    h = h.reshape(-1, h.shape[-1])  # (B*L, D)
    loss = chunked_cross_entropy(head_fn, h, targets.reshape(-1), mask.reshape(-1), grad)
    return loss, mask.sum()


def chunked_cross_entropy(
    head: Callable[[mx.array], mx.array],
    h: mx.array,
    targets: mx.array,
    mask: mx.array,
    grad: bool = True,
    rows: int | None = None,
) -> mx.array:
    """sum(mask * CE(head(h), targets)) for h (N, D), targets and mask (N,), chunk by chunk."""
    rows = rows or max(1, CHUNK_ELEMENTS // head(h[:1]).shape[-1])  # positions per chunk

    def chunks(h: mx.array, targets: mx.array, mask: mx.array, with_grad: bool):
        losses, grads = [], []
        for i in range(0, h.shape[0], rows):
            hc, tc, mc = h[i : i + rows], targets[i : i + rows], mask[i : i + rows]
            logits = head(hc).astype(mx.float32)  # (rows, V)
            lse = mx.logsumexp(logits, axis=-1)  # (rows,)
            picked = mx.take_along_axis(logits, tc[:, None], axis=-1).squeeze(-1)
            losses.append(((lse - picked) * mc).sum())
            if with_grad:
                # d(loss)/d(logits) = softmax - one_hot, on the trained positions only
                dlogits = mx.exp(logits - lse[:, None])
                dlogits = dlogits - (mx.arange(logits.shape[-1]) == tc[:, None])
                dlogits = (dlogits * mc[:, None]).astype(hc.dtype)
                grads.append(mx.vjp(head, [hc], [dlogits])[1][0])  # (rows, D)
        return sum(losses[1:], losses[0]), grads

    if not grad:
        return chunks(h, targets, mask, False)[0]

    @mx.custom_function
    def loss_and_grad(h: mx.array, targets: mx.array, mask: mx.array):
        loss, grads = chunks(h, targets, mask, True)
        return loss, mx.concatenate(grads)

    @loss_and_grad.vjp
    def _(primals, cotangents, outputs):
        h, targets, mask = primals
        return (
            outputs[1] * cotangents[0].astype(h.dtype),
            mx.zeros_like(targets),
            mx.zeros_like(mask),
        )

    return loss_and_grad(h, targets, mask)[0]


def sequence_logprobs(
    model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array, grad: bool = True
) -> tuple[mx.array, mx.array]:
    """Per row: the summed log-probability of the targets where mask is 1, and their count.

    inputs, targets, mask: (B, L) -> (B,), (B,). Chunked as the loss above when the output
    layer is frozen; `grad=False` (validation, DPO's reference) builds no backward pass.
    """
    body, head, head_fn = body_and_head(model)
    if tree_flatten(head.trainable_parameters()):
        logits = model(inputs).astype(mx.float32)  # (B, L, V)
        logps = -nn.losses.cross_entropy(logits, targets)  # (B, L)
    else:
        h = body(inputs, None)  # (B, L, D)
        flat = chunked_logprobs(head_fn, h.reshape(-1, h.shape[-1]), targets.reshape(-1), grad)
        logps = flat.reshape(targets.shape)  # (B, L)
    return (logps * mask).sum(axis=-1), mask.sum(axis=-1)


def chunked_logprobs(
    head: Callable[[mx.array], mx.array],
    h: mx.array,
    targets: mx.array,
    grad: bool = True,
    rows: int | None = None,
) -> mx.array:
    """log softmax(head(h))[targets] for h (N, D), targets (N,) -> (N,), chunk by chunk.

    Unlike the summed loss, each position's weight in the backward pass is known only then,
    so the backward pass computes each chunk's logits again (one more head matmul) rather
    than keeping them."""
    rows = rows or max(1, CHUNK_ELEMENTS // head(h[:1]).shape[-1])  # positions per chunk

    def forward(h: mx.array, targets: mx.array) -> mx.array:
        out = []
        for i in range(0, h.shape[0], rows):
            logits = head(h[i : i + rows]).astype(mx.float32)  # (rows, V)
            picked = mx.take_along_axis(logits, targets[i : i + rows, None], axis=-1)
            out.append(picked.squeeze(-1) - mx.logsumexp(logits, axis=-1))
        return mx.concatenate(out)

    if not grad:
        return forward(h, targets)

    @mx.custom_function
    def logprobs(h: mx.array, targets: mx.array):
        return (forward(h, targets),)

    @logprobs.vjp
    def _(primals, cotangents, outputs):
        h, targets = primals
        weight = cotangents[0].astype(mx.float32)  # (N,)
        grads = []
        for i in range(0, h.shape[0], rows):
            hc, tc, wc = h[i : i + rows], targets[i : i + rows], weight[i : i + rows]
            logits = head(hc).astype(mx.float32)  # (rows, V)
            # d(logp[t])/d(logits) = one_hot(t) - softmax
            probs = mx.exp(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
            dlogits = (mx.arange(logits.shape[-1]) == tc[:, None]) - probs
            dlogits = (dlogits * wc[:, None]).astype(hc.dtype)
            grads.append(mx.vjp(head, [hc], [dlogits])[1][0])  # (rows, D)
        return mx.concatenate(grads), mx.zeros_like(targets)

    return logprobs(h, targets)[0]
