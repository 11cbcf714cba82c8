"""Text embeddings from a causal model: the final hidden states of the model's body (embedding
-> blocks -> final norm, no output layer), pooled over a text's tokens and L2-normalised.

Texts are batched right-padded: under the causal mask a text's positions never see the padding
after them, so a text's vector is the same alone or in a batch (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import mlx.core as mx

from ..models import CausalLM, family_of

Pooling = Literal["mean", "last"]
POOLINGS: tuple[Pooling, ...] = ("mean", "last")
BATCH_TOKENS = 8192  # padded tokens per forward pass


def pool(hidden: mx.array, lengths: mx.array, pooling: Pooling) -> mx.array:
    """hidden (B, L, D) float32 of right-padded texts of `lengths` (B,) -> (B, D) unit vectors."""
    if pooling == "last":
        pooled = mx.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]  # (B, D)
    else:
        valid = mx.arange(hidden.shape[1])[None, :] < lengths[:, None]  # (B, L)
        summed = (hidden * valid[..., None]).sum(axis=1)  # (B, D)
        pooled = summed / lengths[:, None].astype(mx.float32)
    norm = mx.linalg.norm(pooled, axis=-1, keepdims=True)  # (B, 1)
    return pooled / mx.maximum(norm, 1e-12)


def _batches(order: list[int], lengths: list[int]) -> list[list[int]]:
    """Indices grouped so that a batch's padded size stays under BATCH_TOKENS (at least one)."""
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        if batch and (len(batch) + 1) * max(lengths[j] for j in [*batch, i]) <= BATCH_TOKENS:
            batch.append(i)
        else:
            batches.append([i])
    return batches


def embed(model: CausalLM, texts: Sequence[Sequence[int]], pooling: Pooling = "mean") -> mx.array:
    """(N, D) float32 unit vectors of N tokenized texts (each non-empty), in their order."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    body, _ = family_of(model).body_and_embedding(model)
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lengths.__getitem__)  # similar lengths pad little
    out: dict[int, mx.array] = {}
    for batch in _batches(order, lengths):
        width = max(lengths[i] for i in batch)
        tokens = mx.array([list(texts[i]) + [0] * (width - lengths[i]) for i in batch])  # (B, L)
        hidden = body(tokens, None).astype(mx.float32)  # (B, L, D)
        vectors = pool(hidden, mx.array([lengths[i] for i in batch]), pooling)
        mx.eval(vectors)
        out.update(zip(batch, vectors, strict=True))
    return mx.stack([out[i] for i in range(len(texts))])
