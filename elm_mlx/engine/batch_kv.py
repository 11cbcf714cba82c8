"""A KV cache for a batch of rows of different lengths, for continuous batching.

Every row starts at position 0 and has a length of its own: row b's next tokens are written at
positions lengths[b], lengths[b] + 1, ... (a scatter; a plain slice when all rows are equal),
RoPE reads the per-row `offset`, and `make_mask` hides from each row the positions it does not
hold. So the model files need nothing beyond their `make_mask` hook, and a row that joins, leaves
or rewinds (speculative rejections) never disturbs the others.

Per-layer `BatchKVCache`; the functions below act on a model's list of them (all layers hold the
same rows and lengths).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from ..models import CausalLM, KVCache
from ..models.base import window_mask


def _round_up(n: int, step: int) -> int:
    return max(step, (n + step - 1) // step * step)


class BatchKVCache:
    """One layer's keys and values for B rows: (B, H, capacity, D), row b valid up to
    lengths[b]. Same interface as `KVCache` (`offset`, `update_and_fetch`, `make_mask`, `trim`,
    `state`, `nbytes`), plus row operations used by the batch engine."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None  # (B, H, capacity, D)
        self.values: mx.array | None = None
        self.lengths: list[int] = []  # host copy, for shapes and row bookkeeping
        self.offset = mx.array([], mx.int32)  # (B,) the same lengths, for RoPE

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _set_lengths(self, lengths: list[int], offset: mx.array | None = None) -> None:
        self.lengths = lengths
        self.offset = offset if offset is not None else mx.array(lengths, mx.int32)

    def _reserve(self, end: int) -> None:
        """Make room for positions up to `end` in every row."""
        capacity = self.keys.shape[2]
        if end <= capacity:
            return
        grow = _round_up(end - capacity, self.step)
        pad = [(0, 0), (0, 0), (0, grow), (0, 0)]
        self.keys, self.values = mx.pad(self.keys, pad), mx.pad(self.values, pad)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write keys/values (B, H, L, D) at each row's own length; return (B, H, S, D) with
        S = the longest row after the write (shorter rows are masked by `make_mask`)."""
        batch, heads, length, _ = keys.shape
        start = max(self.lengths)
        end = start + length
        if self.keys is None:
            shape = (batch, heads, _round_up(end, self.step))
            self.keys = mx.zeros((*shape, keys.shape[3]), keys.dtype)
            self.values = mx.zeros((*shape, values.shape[3]), values.dtype)
        self._reserve(end)
        if min(self.lengths) == start:  # aligned rows: a slice, as in KVCache
            self.keys[..., start:end, :] = keys
            self.values[..., start:end, :] = values
        else:
            cols = self.offset[:, None] + mx.arange(length)  # (B, L) each row's positions
            cols = cols[:, None, :, None]
            self.keys = mx.put_along_axis(
                self.keys, mx.broadcast_to(cols, keys.shape), keys, axis=2
            )
            self.values = mx.put_along_axis(
                self.values, mx.broadcast_to(cols, values.shape), values, axis=2
            )
        self._set_lengths([n + length for n in self.lengths], self.offset + length)
        return self.keys[..., :end, :], self.values[..., :end, :]

    def make_mask(self, length: int, window: int | None = None) -> str | mx.array | None:
        """The mask of `length` new queries: query j of row b sees positions <= lengths[b] + j
        (and, with a `window`, only the last `window` of them). Aligned rows get the kernel's
        own causal mask where the window allows, as a `KVCache` does."""
        start = max(self.lengths)
        aligned = min(self.lengths) == start
        return window_mask(length, window, start, None if aligned else self.offset)

    def trim(self, n: int) -> int:
        """Forget the last n positions of every row (as `KVCache.trim`)."""
        n = min(n, *self.lengths) if self.lengths else 0
        self._set_lengths([m - n for m in self.lengths])
        return n

    def is_trimmable(self) -> bool:
        return True

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        if self.keys is None:
            return ()
        end = max(self.lengths)
        return self.keys[..., :end, :], self.values[..., :end, :]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    # ------------------------------------------------------------------ row operations

    def set_lengths(self, lengths: Sequence[int], offset: mx.array | None = None) -> None:
        """Rewind rows to the given lengths (each at most its current one)."""
        if any(n > m for n, m in zip(lengths, self.lengths, strict=True)):
            raise ValueError("a row's length can only shrink")
        self._set_lengths(list(lengths), offset)

    def extend(self, keys: mx.array | None, values: mx.array | None, lengths: list[int]) -> None:
        """Append N rows: keys, values (N, H, S, D) hold row i's positions up to lengths[i]
        (None: N empty rows)."""
        if self.keys is None and keys is None:  # nothing written anywhere: the first write
            self._set_lengths(self.lengths + lengths)  # allocates
            return
        end = max([*self.lengths, *lengths, 1])
        if self.keys is None:  # the rows so far are empty
            shape = (self.rows, keys.shape[1], _round_up(end, self.step))
            self.keys = mx.zeros((*shape, keys.shape[3]), keys.dtype)
            self.values = mx.zeros((*shape, values.shape[3]), values.dtype)
        self._reserve(end)
        capacity = self.keys.shape[2]
        if keys is None:
            keys = mx.zeros((len(lengths), *self.keys.shape[1:]), self.keys.dtype)
            values = mx.zeros((len(lengths), *self.values.shape[1:]), self.values.dtype)
        keys, values = keys[..., :capacity, :], values[..., :capacity, :]
        pad = [(0, 0), (0, 0), (0, capacity - keys.shape[2]), (0, 0)]
        self.keys = mx.concatenate([self.keys, mx.pad(keys, pad)])
        self.values = mx.concatenate([self.values, mx.pad(values, pad)])
        self._set_lengths(self.lengths + lengths)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only the given rows, in that order, and shrink the capacity to fit them."""
        lengths = [self.lengths[i] for i in rows]
        if self.keys is not None:
            capacity = _round_up(max(lengths, default=0), self.step)
            index = mx.array(list(rows), mx.int32)
            self.keys = self.keys[..., :capacity, :][index]
            self.values = self.values[..., :capacity, :][index]
        self._set_lengths(lengths)

    def row(self, i: int, n: int) -> tuple[mx.array, mx.array]:
        """A copy of row i's first n positions (at most its length), (1, H, n, D) each."""
        n = min(n, self.lengths[i])
        return (
            mx.contiguous(self.keys[i : i + 1, :, :n, :]),
            mx.contiguous(self.values[i : i + 1, :, :n, :]),
        )


def make_batch_cache(model: CausalLM) -> list[BatchKVCache]:
    return [BatchKVCache() for _ in model.layers]


def _stack(caches: Sequence[KVCache], name: str) -> mx.array:
    """The `keys` or `values` of single-row caches, (N, H, longest, D), zero-padded."""
    end = max(c.offset for c in caches)
    ref = next(c for c in caches if c.offset)  # for the shape of empty rows
    parts = []
    for c in caches:
        a = getattr(c if c.offset else ref, name)[..., : c.offset, :]
        parts.append(mx.pad(a, [(0, 0), (0, 0), (0, end - c.offset), (0, 0)]))
    return mx.concatenate(parts)


def add_rows(cache: list[BatchKVCache], rows: Sequence[list[KVCache]]) -> None:
    """Append rows, each given as a model's list of single-row `KVCache`s."""
    for i, layer in enumerate(cache):
        caches = [row[i] for row in rows]
        lengths = [c.offset for c in caches]
        if not any(lengths):
            layer.extend(None, None, lengths)
        else:
            layer.extend(_stack(caches, "keys"), _stack(caches, "values"), lengths)


def move_rows(src: list[BatchKVCache], rows: Sequence[int], dst: list[BatchKVCache]) -> None:
    """Append rows of `src` to `dst` (they stay in `src` too: `keep_rows` drops them)."""
    index = mx.array(list(rows), mx.int32)
    whole = not dst[0].rows and list(rows) == list(range(src[0].rows))
    for a, b in zip(src, dst, strict=True):
        lengths = [a.lengths[i] for i in rows]
        if whole and a.keys is not None:  # all of src into an empty dst: hand the arrays over
            b.keys, b.values = a.keys, a.values
            b._set_lengths(lengths)
            continue
        if a.keys is None:
            b.extend(None, None, lengths)
            continue
        end = _round_up(max(lengths), a.step)
        b.extend(a.keys[..., :end, :][index], a.values[..., :end, :][index], lengths)


def keep_rows(cache: list[BatchKVCache], rows: Sequence[int]) -> None:
    for layer in cache:
        layer.keep(rows)


def set_lengths(cache: list[BatchKVCache], lengths: Sequence[int]) -> None:
    """Rewind each row to its given length (speculative rejections, padding)."""
    offset = mx.array(list(lengths), mx.int32)  # one array shared by every layer
    for layer in cache:
        layer.set_lengths(lengths, offset)


def row_cache(cache: list[BatchKVCache], i: int, n: int) -> list[tuple[mx.array, mx.array]]:
    """Row i's first n keys and values in every layer, copied out of the batch."""
    return [layer.row(i, n) for layer in cache]
