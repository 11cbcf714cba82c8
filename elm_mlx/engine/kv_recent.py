"""The recent positions of a quantized KV cache kept in full precision (KIVI: Liu et al. 2024,
"KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv:2402.02750, keeps a
full-precision residual of the last R tokens and quantizes tokens as they age out of it).

The quantized store still holds every position (codes are per position, so when a position is
quantized does not change its codes); this keeps, per row, a full-precision copy of the last
`capacity = size + slack` positions, and attention reads a key (and its value) from the copy
for every query less than `size` positions after it, from the store for the others. A query
at position q thus sees positions q - size + 1 .. q in full precision whatever the chunking,
so prompt chunks, speculation and token-by-token decoding compute the same thing; a sequence
shorter than `size` attends exactly as a full-precision cache does.

Rewinds (speculative rejections, prefill padding) need nothing: the copy is aligned to each
row's position `end` at its last write, and the `slack` positions beyond the window keep a
rewind of up to `slack` exact. A row rewound further reads the window positions the copy no
longer holds (below `low`) from the store. Positions are the row's own (not slots), so a
windowed cache's compaction does not touch the copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from .kv_quant import KVQuantizer, prefers_packed, quantized_attention, scores_mask

FAR = -(1 << 30)  # the position of a copy entry that holds nothing: no query sees it


@dataclass
class Recent:
    """What one write gives attention: the copy before the write followed by the new keys and
    values, (B, H, T, D) each, their positions (B, T) (FAR where they hold nothing valid), and
    the lowest position of each row they hold (B,)."""

    keys: mx.array
    values: mx.array
    positions: mx.array
    low: mx.array

    def mask(self, mask: mx.array, store: mx.array, queries: mx.array, size: int) -> mx.array:
        """The mask over [store slots, these entries] (B, 1, L, S + T): `mask` (B|1, 1, L, S)
        the store's, `store` (B, S) the positions its slots hold, `queries` (B, L) theirs. A key
        within `size` of a query is read from here, the others from the store."""
        q = queries[:, None, :, None]  # (B, 1, L, 1)
        s = store[:, None, None, :]  # (B, 1, 1, S)
        near_s = (s > q - size) & (s >= self.low[:, None, None, None])
        p = self.positions[:, None, None, :]  # (B, 1, 1, T)
        near = (p <= q) & (p > q - size)
        shape = (queries.shape[0], 1, queries.shape[1], store.shape[1])
        return mx.concatenate([mx.broadcast_to(mask, shape) & ~near_s, near], axis=-1)


class RecentKV:
    """The full-precision copy of each row's last `capacity` positions, (B, H, capacity, D):
    entry i of row b holds position end[b] - capacity + i, if at least low[b]."""

    slack = 64  # rewinds kept exact: speculation rewinds at most MAX_PROPOSAL (config.py)
    query_block = 128  # queries per attention call when the scores are materialised

    def __init__(self, size: int) -> None:
        self.size, self.capacity = size, size + self.slack
        self.arrays: list[mx.array] | None = None  # keys (rotated as the store's), values
        self.end: list[int] = []
        self.low: list[int] = []

    def _positions(self, lengths: Sequence[int]) -> mx.array:
        """(B, capacity) the positions the copy holds for rows now `lengths` long (FAR where it
        holds nothing, or what a rewind left behind)."""
        end, low = mx.array(self.end)[:, None], mx.array(self.low)[:, None]
        p = end - self.capacity + mx.arange(self.capacity)[None]
        return mx.where((p >= low) & (p < mx.array(list(lengths))[:, None]), p, FAR)

    def write(
        self,
        keys: mx.array,
        values: mx.array,
        lengths: Sequence[int],
        real: Sequence[int] | None = None,
    ) -> Recent:
        """New keys (rotated) and values (B, H, L, D) written after rows `lengths` long, of
        which the first real[b] are row b's (the rest padding, rewound after; None: all): what
        attention reads, and the copy moves to each row's last real positions."""
        batch, heads, length, dim = keys.shape
        if self.arrays is None:
            self.arrays = [mx.zeros((batch, heads, self.capacity, dim), a.dtype)
                           for a in (keys, values)]  # fmt: skip
        start = mx.array(list(lengths))[:, None]  # (B, 1)
        new = start + mx.arange(length)[None]  # (B, L)
        positions = mx.concatenate([self._positions(lengths), new], axis=1)  # (B, C + L)
        # what the copy holds below each row's start ([low, start): none if it ends before)
        low = [min(lo, n) if e >= n else n
               for lo, e, n in zip(self.low, self.end, lengths, strict=True)]  # fmt: skip
        old = self.arrays
        both = [mx.concatenate([a, b], axis=2) for a, b in zip(old, (keys, values), strict=True)]
        recent = Recent(*both, positions, mx.array(low))
        real = list(real) if real is not None else [length] * batch
        old_end = mx.array(self.end)[:, None]
        self.end = [n + r for n, r in zip(lengths, real, strict=True)]
        # entry i after the write holds position p = end - C + i: a new one at p - start, an
        # older one at p - (old end - C). Gathered from each (not from `both`, which then
        # lives only as long as attention needs it)
        p = mx.array(self.end)[:, None] - self.capacity + mx.arange(self.capacity)[None]
        shape = (batch, heads, self.capacity, dim)
        at_old = mx.clip(p - old_end + self.capacity, 0, self.capacity - 1)[:, None, :, None]
        at_new = mx.clip(p - start, 0, length - 1)[:, None, :, None]
        is_new = (p >= start)[:, None, :, None]
        self.arrays = [
            mx.where(
                is_new,
                mx.take_along_axis(b, mx.broadcast_to(at_new, shape), 2),
                mx.take_along_axis(a, mx.broadcast_to(at_old, shape), 2),
            )
            for a, b in zip(old, (keys, values), strict=True)
        ]
        self.low = [max(lo, e - self.capacity) for lo, e in zip(low, self.end, strict=True)]
        return recent

    def attend(
        self,
        queries: mx.array,
        keys: mx.array,
        values: mx.array,
        scale: float,
        mask: str | mx.array | None,
        written: tuple[Recent, mx.array, mx.array],
        store: list[mx.array],
        head: list[mx.array] | None,
        quant: KVQuantizer,
    ) -> mx.array:
        """Attention of queries (B, Hq, L, D) (rotated) over a quantized cache's slots (`store`
        packed, `keys`, `values` dequantized (B, Hkv, S, D), `mask` theirs) and this copy, as
        the last `write` gave it (`written`: it, the positions the slots hold (B, S), the
        queries' (B, L)); -> (B, Hq, L, D)."""
        recent, held, positions = written
        base = scores_mask(mask, queries.shape[2], keys.shape[2])
        mask = recent.mask(base, held, positions, self.size)  # (B, 1, L, S + T)
        tail = [recent.keys, recent.values]
        if prefers_packed(queries, keys.shape[1]):
            out = quantized_attention(queries, store, head, quant, scale, mask, tail)
        else:
            keys, values = (
                mx.concatenate([a, b], axis=2) for a, b in zip((keys, values), tail, strict=True)
            )
            out = _blockwise_attention(queries, keys, values, scale, mask, self.query_block)
        # the copy's new entries are made with this layer's output, not at the end of the pass
        # (else every layer's new keys and values would wait for them: a prompt chunk's worth)
        return mx.depends(out, self.state)

    # ------------------------------------------------------------------ rows

    def extend(self, keys: mx.array | None, values: mx.array | None, lengths: list[int]) -> None:
        """Append rows: keys (rotated), values (N, H, S, D) holding row i's positions up to
        lengths[i] (None: empty rows)."""
        if keys is None:
            self.append(None, lengths, [0] * len(lengths))
            return
        p = mx.array(lengths)[:, None] - self.capacity + mx.arange(self.capacity)[None]
        index = mx.clip(p, 0, keys.shape[2] - 1)[:, None, :, None]  # (N, 1, C, 1)
        shape = (*keys.shape[:2], self.capacity, keys.shape[3])
        arrays = [mx.take_along_axis(a, mx.broadcast_to(index, shape), 2) for a in (keys, values)]
        self.append(arrays, lengths, [max(0, n - self.capacity) for n in lengths])

    def append(self, arrays: list[mx.array] | None, end: list[int], low: list[int]) -> None:
        """Append rows as `take` gives them (None: rows that hold nothing yet)."""
        if arrays is not None and self.arrays is None and self.end:  # earlier rows: zeros
            self.arrays = [mx.zeros((len(self.end), *a.shape[1:]), a.dtype) for a in arrays]
        if arrays is None and self.arrays is not None:
            arrays = [mx.zeros((len(end), *a.shape[1:]), a.dtype) for a in self.arrays]
        if arrays is not None:
            self.arrays = (
                arrays
                if self.arrays is None
                else [mx.concatenate([a, b]) for a, b in zip(self.arrays, arrays, strict=True)]
            )
        self.end, self.low = self.end + list(end), self.low + list(low)

    def take(self, rows: Sequence[int]) -> tuple:
        """Rows as `append` takes them."""
        index = mx.array(list(rows), mx.int32)
        arrays = [a[index] for a in self.arrays] if self.arrays is not None else None
        return arrays, [self.end[i] for i in rows], [self.low[i] for i in rows]

    def keep(self, rows: Sequence[int]) -> None:
        self.arrays, self.end, self.low = self.take(rows)

    def held(self, i: int, n: int, first: int = 0) -> tuple[int, list[mx.array]]:
        """(the first position, keys and values (1, H, m, D)) of the copy's positions of row i
        from `first` on and below n ([] when none)."""
        lo = max(self.low[i], self.end[i] - self.capacity, first)
        hi = min(self.end[i], n)
        if self.arrays is None or hi <= lo:
            return lo, []
        first = lo - (self.end[i] - self.capacity)
        return lo, [a[i : i + 1, :, first : first + hi - lo] for a in self.arrays]

    @property
    def state(self) -> list[mx.array]:
        return self.arrays or []

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


def _blockwise_attention(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: mx.array, block: int
) -> mx.array:
    """Attention (B, Hq, L, D) under a mask array, `block` queries at a time, each block after
    the one before: a kernel without a fused path (MLX's CPU backend) then holds the scores of
    one block at a time, so a prompt chunk stays below the full cache's peak."""
    outs: list[mx.array] = []
    for i in range(0, queries.shape[2], block):
        q = queries[:, :, i : i + block]
        q = mx.depends(q, outs[-1]) if outs else q
        m = mask[:, :, i : i + block]
        outs.append(mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=m))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
