"""Quantized keys and values (affine, MLX's `mx.quantize` layout, groups along the head
dimension), and attention over them.

At 4 bits the keys are rotated by an orthonormal Hadamard transform H before quantizing (QuaRot):
outliers spread over the whole head, so the groups quantize with less error. Queries are rotated
by the same H, so (qH)(kH)^T = q k^T and nothing else changes; values are left as they are.

Attention picks the smaller temporary: few queries (decoding, speculation) multiply straight by
the packed keys and values (`mx.quantized_matmul`; scores (B, Hq, L, S)), many queries (prompt
chunks) dequantize one layer's keys and values into the fused kernel, which never materialises
the scores; so prompt processing peaks below a full-precision cache (mlx-lm#1587).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class KVQuantizer:
    bits: int
    group_size: int

    def rotates(self, head_dim: int) -> bool:
        """Rotate at 4 bits, where the head size is one the transform is its own inverse for."""
        return self.bits < 8 and _is_power_of_two(head_dim)

    def rotate(self, x: mx.array) -> mx.array:
        """x (..., D) -> x H with H orthonormal and symmetric (H H = I), when `rotates`."""
        return mx.hadamard_transform(x) if self.rotates(x.shape[-1]) else x

    def encode(self, keys: mx.array, values: mx.array) -> list[mx.array]:
        """(B, H, L, D) each -> packed keys, scales, biases, then the same for values."""
        return self.pack(self.rotate(keys), values)

    def pack(self, rotated: mx.array, values: mx.array) -> list[mx.array]:
        """`encode` of keys already rotated."""
        kw = {"group_size": self.group_size, "bits": self.bits}
        return [*mx.quantize(rotated, **kw), *mx.quantize(values, **kw)]

    def decode(self, store: list[mx.array]) -> tuple[mx.array, mx.array]:
        """The keys (rotated, as the queries will be) and values of `encode`'s arrays."""
        kw = {"group_size": self.group_size, "bits": self.bits}
        return mx.dequantize(*store[:3], **kw), mx.dequantize(*store[3:], **kw)


def scores_mask(mask: str | mx.array | None, length: int, size: int) -> mx.array | None:
    """The boolean (…, L, S) form of an attention mask ("causal": bottom-right aligned; None:
    all keys)."""
    if isinstance(mask, str):
        queries = mx.arange(size - length, size)[:, None]
        return mx.arange(size)[None] <= queries  # (L, S)
    return mx.ones((length, size), mx.bool_) if mask is None else mask


def quantized_attention(
    queries: mx.array,
    store: list[mx.array],
    head: list[mx.array] | None,
    quant: KVQuantizer,
    scale: float,
    mask: str | mx.array | None,
    tail: list[mx.array] | None = None,
) -> mx.array:
    """Attention of queries (B, Hq, L, D), already rotated, over packed keys and values (`store`,
    each (B, Hkv, S, *)) whose first F positions are replaced by `head` (full-precision keys,
    values (B, Hkv, F, D)), then over full-precision `tail` keys and values (B, Hkv, T, D) (the
    mask then covers S + T), without dequantizing the cache; -> (B, Hq, L, D)."""
    batch, n_heads, length, dim = queries.shape
    n_kv = store[0].shape[1]
    size = store[0].shape[2]
    kw = {"group_size": quant.group_size, "bits": quant.bits}
    q = (queries * scale).reshape(batch, n_kv, n_heads // n_kv, length, dim)  # GQA groups
    packed = [a[:, :, None] for a in store]  # (B, Hkv, 1, S, *)
    scores = mx.quantized_matmul(q, *packed[:3], transpose=True, **kw)  # (B, Hkv, R, L, S)
    f = min(head[0].shape[2], size) if head else 0
    if f:
        first = q @ head[0][:, :, None, :f].swapaxes(-1, -2)  # (B, Hkv, R, L, F)
        scores = mx.concatenate([first, scores[..., f:]], axis=-1)
    if tail:
        recent = q @ tail[0][:, :, None].swapaxes(-1, -2)  # (B, Hkv, R, L, T)
        scores = mx.concatenate([scores, recent], axis=-1)
    if (m := scores_mask(mask, length, size)) is not None:
        m = m[:, :, None] if m.ndim == 4 else m  # (B, 1, L, S) -> (B, 1, 1, L, S)
        scores = mx.where(m, scores, mx.finfo(scores.dtype).min)
    weights = mx.softmax(scores, axis=-1, precise=True)
    out = None
    if f < size:  # (a product over no positions faults in MLX's CPU kernel)
        rest = [a[..., f:, :] for a in packed[3:]]
        out = mx.quantized_matmul(weights[..., f:size], *rest, transpose=False, **kw)
    if f:
        first = weights[..., :f] @ head[1][:, :, None, :f]
        out = first if out is None else out + first
    if tail:
        recent = weights[..., size:] @ tail[1][:, :, None]
        out = recent if out is None else out + recent
    return out.reshape(batch, n_heads, length, dim)


def prefers_packed(queries: mx.array, n_kv_heads: int) -> bool:
    """Whether multiplying by the packed cache makes a smaller temporary than dequantizing it:
    scores (Hq * L floats per key) against keys and values (2 * Hkv * D per key)."""
    _, n_heads, length, dim = queries.shape
    return n_heads * length <= 2 * n_kv_heads * dim
