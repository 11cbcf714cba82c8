"""A KV cache for a batch of rows of different lengths, for continuous batching; optionally
quantized (`KVConfig.bits`) and windowed (`KVConfig.max_size`).

Every row starts at position 0 and has a length of its own: row b's next tokens are written at
slots slots[b], slots[b] + 1, ... (a scatter; a plain slice when all rows are equal), RoPE
reads the per-row `offset` (its length in positions), and `make_mask` hides from each row the
slots it does not hold. So the model files need nothing beyond their `make_mask` hook (and
`attention(..., cache)`, which lets a quantized cache attend), and a row that joins, leaves or
rewinds (speculative rejections) never disturbs the others.

Quantized: keys and values are stored packed (see kv_quant.py), the first `full_tokens`
positions also in full precision, which attention uses instead, and each row's last positions
too (kv_recent.py, KIVI's full-precision window): a query reads the `recent_tokens` positions
up to its own in full precision.

Windowed: a row keeps its first `sinks` positions (attention sinks) and, of the others, the last
`max_size - sinks`; the mask shows a query exactly those, whatever the cache still holds. Slots
are compacted (the oldest non-sink positions dropped) only once a row holds `step` slots more
than it must, and `margin` more are kept, so rewinds of up to `margin` tokens stay exact. Slot
s of row b holds position s (s < sinks) or s + dropped[b]. OLMo 3's sliding layers get such a
cache without sinks, their window long, so memory follows the architecture.

Per-layer `BatchKVCache`; the functions below act on a model's list of them (all layers of a kind
hold the same rows, lengths and drops).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from ..errors import OptionError
from ..models import CausalLM, KVCache
from ..models.base import layer_windows, window_mask
from .kv_quant import BITS, GROUP_SIZES, KVQuantizer, prefers_packed, quantized_attention
from .kv_recent import RecentKV


def _round_up(n: int, step: int) -> int:
    return max(step, (n + step - 1) // step * step)


@dataclass(frozen=True)
class KVConfig:
    """How the batch cache stores keys and values (GenerationConfig's kv_* fields)."""

    bits: int | None = None  # 8 or 4: quantized keys and values (None: the model's dtype)
    group_size: int = 64  # quantization group, along the head dimension
    full_tokens: int = 4  # the first positions of each row also kept in full precision
    recent_tokens: int = 64  # a query sees this many positions up to its own in full precision
    max_size: int | None = None  # a window: the first `sinks` positions and the last ones
    sinks: int = 4

    def validate(self) -> None:
        if self.bits is not None and self.bits not in BITS:
            raise OptionError("kv_bits", f"must be one of {BITS}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise OptionError(
                "kv_group_size", f"must be one of {GROUP_SIZES}, got {self.group_size}"
            )
        if self.full_tokens < 0:
            raise OptionError("kv_full_tokens", f"must be >= 0, got {self.full_tokens}")
        if self.recent_tokens < 0:
            raise OptionError("kv_recent_tokens", f"must be >= 0, got {self.recent_tokens}")
        if self.max_size is not None and self.max_size <= self.sinks:
            raise OptionError(
                "max_kv_size",
                f"must exceed the {self.sinks} sink tokens it keeps, got {self.max_size}",
            )


class BatchKVCache:
    """One layer's keys and values for B rows, row b at lengths[b] positions. Same interface as
    `KVCache` (`offset`, `update_and_fetch`, `make_mask`, `trim`, `state`, `nbytes`), plus row
    operations used by the batch engine."""

    step = 256
    margin = 32  # positions past the window kept, for rewinds

    def __init__(
        self,
        quant: KVQuantizer | None = None,
        full_tokens: int = 0,
        max_size: int | None = None,
        sinks: int = 0,
        recent_tokens: int = 0,
    ) -> None:
        self.quant, self.max_size = quant, max_size
        self.sinks = sinks if max_size is not None else 0
        self.full_tokens = min(full_tokens, self.sinks if max_size is not None else full_tokens)
        if max_size is not None:  # no query sees further back than the window
            recent_tokens = min(recent_tokens, max_size - self.sinks)
        self.recent = RecentKV(recent_tokens) if quant is not None and recent_tokens else None
        self.padding: list[int] | None = None  # the next write's real lengths (`mark_padding`)
        if quant is None:
            self.full_tokens = 0
        self.store: list[mx.array] | None = None  # encoded keys and values, (B, H, capacity, *)
        self.head: list[mx.array] | None = None  # full-precision first keys, values (B, H, F, D)
        self.lengths: list[int] = []  # host copy, for shapes and row bookkeeping
        self.dropped: list[int] = []  # positions dropped after the sinks, per row
        self.offset = mx.array([], mx.int32)  # (B,) the same lengths, for RoPE
        self._packed: tuple | None = None  # the last write's packed keys, values, head, recent

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def slots(self) -> list[int]:
        return [n - d for n, d in zip(self.lengths, self.dropped, strict=True)]

    def _set_lengths(self, lengths: list[int], offset: mx.array | None = None) -> None:
        self.lengths = lengths
        self.offset = offset if offset is not None else mx.array(lengths, mx.int32)

    # ------------------------------------------------------------------ storage

    def _encode(self, keys: mx.array, values: mx.array) -> list[mx.array]:
        """Keys (rotated when quantized: `_rotate`) and values as the store holds them."""
        if self.quant is None:
            return [keys, values]
        dim = keys.shape[-1]
        if dim % self.quant.group_size:
            raise OptionError(
                "kv_group_size", f"{self.quant.group_size} must divide the head size {dim}"
            )
        return self.quant.pack(keys, values)

    def _rotate(self, keys: mx.array) -> mx.array:
        return self.quant.rotate(keys) if self.quant is not None else keys

    def _decode(self, store: list[mx.array]) -> tuple[mx.array, mx.array]:
        return (store[0], store[1]) if self.quant is None else self.quant.decode(store)

    def _reserve(self, end: int) -> None:
        """Make room for slots up to `end` in every row."""
        capacity = self.store[0].shape[2]
        if end > capacity:
            pad = [(0, 0), (0, 0), (0, _round_up(end - capacity, self.step)), (0, 0)]
            self.store = [mx.pad(a, pad) for a in self.store]

    @staticmethod
    def _write(arrays: list[mx.array], parts: list[mx.array], at: list[int]) -> list[mx.array]:
        """Write parts (B, H, L, *) into arrays (B, H, capacity, *) at row b's slot at[b]."""
        start, length = max(at), parts[0].shape[2]
        if min(at) == start:  # aligned rows: a slice, as in KVCache
            for a, p in zip(arrays, parts, strict=True):
                a[..., start : start + length, :] = p
            return arrays
        cols = (mx.array(at)[:, None] + mx.arange(length))[:, None, :, None]  # (B, 1, L, 1)
        return [
            mx.put_along_axis(a, mx.broadcast_to(cols, p.shape), p, axis=2)
            for a, p in zip(arrays, parts, strict=True)
        ]

    def _write_head(self, keys: mx.array, values: mx.array) -> None:
        """The full-precision copy (keys rotated) of the positions below `full_tokens` (slots =
        positions)."""
        f = self.full_tokens
        if self.head is None:
            self.head = [mx.zeros((*a.shape[:2], f, a.shape[3]), a.dtype) for a in (keys, values)]
        end = max(self.lengths) + keys.shape[2]
        pad = [(0, 0), (0, 0), (0, max(0, end - f)), (0, 0)]
        head = self._write([mx.pad(a, pad) for a in self.head], [keys, values], self.lengths)
        self.head = [a[..., :f, :] for a in head]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write keys/values (B, H, L, D) after each row's last slot; return (B, H, S, D) with
        S = the most slots a row holds after the write (what a row does not hold is masked by
        `make_mask`). A quantized cache returns them dequantized, lazily: `attend` may use the
        packed ones instead."""
        if self.quant is None and self.max_size is None and self.store is not None:
            return self._update_plain(keys, values)
        batch, heads, length, _ = keys.shape
        rotated = self._rotate(keys)  # (one array for the store and the recent copy)
        parts = self._encode(rotated, values)
        slots = self.slots()
        end = max(slots) + length
        recent = None
        if self.recent is not None:  # what attention reads in full precision, and where
            window = self.recent.write(rotated, values, self.lengths, self.padding)
            s = mx.arange(end)[None]  # (1, S) slots -> (B, S) positions
            held = mx.where(s < self.sinks, s, s + mx.array(self.dropped)[:, None])
            recent = window, held, self.offset[:, None] + mx.arange(length)[None]
        self.padding = None
        if self.store is None:
            cap = _round_up(end, self.step)
            self.store = [mx.zeros((batch, heads, cap, *p.shape[3:]), p.dtype) for p in parts]
        self._reserve(end)
        self.store = self._write(self.store, parts, slots)
        if self.full_tokens and min(self.lengths) < self.full_tokens:
            self._write_head(rotated, values)
        self._set_lengths([n + length for n in self.lengths], self.offset + length)
        fetched = self._fetch(end)
        if self.quant is not None:  # what `attend` multiplies by, before any compaction
            self._packed = [a[..., :end, :] for a in self.store], self.head, recent
        self._compact(slots)  # for the next call; the mask of this one is made
        return fetched

    def _update_plain(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """`update_and_fetch` of a full-precision cache that drops nothing, once allocated:
        the general path's steps that apply, for the decode step's Python cost (every layer,
        every token)."""
        length, lengths = keys.shape[2], self.lengths
        end = max(lengths) + length
        self._reserve(end)
        self.store = self._write(self.store, [keys, values], lengths)
        self.padding = None
        self._set_lengths([n + length for n in lengths], self.offset + length)
        return self.store[0][..., :end, :], self.store[1][..., :end, :]

    def _fetch(self, end: int) -> tuple[mx.array, mx.array]:
        keys, values = self._decode([a[..., :end, :] for a in self.store])
        if self.head is not None:
            f = min(self.full_tokens, end)
            keys, values = (
                mx.concatenate([h[..., :f, :], a[..., f:, :]], axis=2)
                for h, a in zip(self.head, (keys, values), strict=True)
            )
        return keys, values

    def attend(
        self,
        queries: mx.array,
        keys: mx.array,
        values: mx.array,
        scale: float,
        mask: str | mx.array | None,
    ) -> mx.array:
        """Attention of queries (B, Hq, L, D) over this cache after `update_and_fetch` returned
        keys, values; -> (B, Hq, L, D)."""
        if self.quant is None:
            return mx.fast.scaled_dot_product_attention(
                queries, keys, values, scale=scale, mask=mask
            )
        queries = self.quant.rotate(queries)
        (store, head, recent), self._packed = self._packed, None
        if recent is not None:  # the last positions in full precision
            args = (queries, keys, values, scale, mask, recent, store, head, self.quant)
            return self.recent.attend(*args)
        if prefers_packed(queries, keys.shape[1]):
            return quantized_attention(queries, store, head, self.quant, scale, mask)
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)

    def _compact(self, held: list[int]) -> None:
        """Drop the oldest non-sink slots of rows that `held` (before the last write: the new
        slots may be padding or rejected proposals, rewound next) `step` more than the window
        needs, keeping `margin` more than it needs."""
        if self.max_size is None:
            return
        keep = self.max_size + self.margin
        if max(held) <= keep + self.step:
            return
        drop = [max(0, s - keep) for s in held]
        cap = _round_up(max(s - d for s, d in zip(self.slots(), drop, strict=True)), self.step)
        s = mx.arange(cap)[None]  # (1, cap) new slots
        src = mx.where(s < self.sinks, s, s + mx.array(drop)[:, None])  # (B, cap) old slots
        src = mx.minimum(src, self.store[0].shape[2] - 1)[:, None, :, None]  # (B, 1, cap, 1)
        self.store = [
            mx.take_along_axis(a, mx.broadcast_to(src, (*a.shape[:2], cap, a.shape[3])), axis=2)
            for a in self.store
        ]
        self.dropped = [d + n for d, n in zip(self.dropped, drop, strict=True)]

    def make_mask(self, length: int, window: int | None = None) -> str | mx.array | None:
        """The mask of `length` new queries: query j of row b, at position p = lengths[b] + j,
        sees the slots holding positions <= p (with a `window`, only the last `window` of them),
        of a windowed cache only the sinks and the last `max_size - sinks`. Aligned rows that
        dropped nothing get the kernel's own causal mask where the windows allow."""
        slots = self.slots()
        start = max(slots)
        if not any(self.dropped) and (
            self.max_size is None or max(self.lengths) + length <= self.max_size
        ):
            aligned = min(slots) == start
            return window_mask(length, window, start, None if aligned else self.offset)
        s = mx.arange(start + length)[None]  # (1, S)
        pos = mx.where(s < self.sinks, s, s + mx.array(self.dropped)[:, None])[:, None, :]
        q = (self.offset[:, None] + mx.arange(length))[:, :, None]  # (B, L, 1)
        mask = pos <= q  # (B, L, S)
        if window is not None:
            mask &= pos > q - window
        if self.max_size is not None:
            mask &= (pos < self.sinks) | (pos > q - (self.max_size - self.sinks))
        return mask[:, None]  # (B, 1, L, S)

    def trim(self, n: int) -> int:
        """Forget the last n positions of every row (as `KVCache.trim`)."""
        n = min(n, *self._rewindable()) if self.lengths else 0
        self._set_lengths([m - n for m in self.lengths])
        return n

    def _rewindable(self) -> list[int]:
        """How far each row can rewind: its whole length, or down to its sinks once it dropped."""
        return [s - self.sinks if d else s for s, d in zip(self.slots(), self.dropped, strict=True)]

    def is_trimmable(self) -> bool:
        return True

    @property
    def state(self) -> tuple[mx.array, ...]:
        if self.store is None:
            return ()
        end = max(self.slots())
        recent = self.recent.state if self.recent is not None else []
        return (*[a[..., :end, :] for a in self.store], *(self.head or []), *recent)

    @property
    def nbytes(self) -> int:
        recent = self.recent.nbytes if self.recent is not None else 0
        return sum(a.nbytes for a in (self.store or []) + (self.head or [])) + recent

    # ------------------------------------------------------------------ row operations

    def set_lengths(self, lengths: Sequence[int], offset: mx.array | None = None) -> None:
        """Rewind rows to the given lengths (each at most its current one, and no further back
        than the positions a windowed row still holds)."""
        for n, m, r in zip(lengths, self.lengths, self._rewindable(), strict=True):
            if n > m or m - n > r:
                raise ValueError(f"a row of {m} positions cannot rewind to {n}")
        self._set_lengths(list(lengths), offset)

    def extend(self, keys: mx.array | None, values: mx.array | None, lengths: list[int]) -> None:
        """Append N rows: keys, values (N, H, S, D) in full precision hold row i's positions up
        to lengths[i] (None: N empty rows)."""
        if keys is None:
            if self.recent is not None:
                self.recent.extend(None, None, lengths)
            self._append(None, None, lengths, [0] * len(lengths))
            return
        head = None
        keys_r = self._rotate(keys)
        if self.full_tokens:
            f = self.full_tokens
            pad = [(0, 0), (0, 0), (0, max(0, f - keys.shape[2])), (0, 0)]
            head = [mx.pad(a[..., :f, :], pad) for a in (keys_r, values)]
        if self.recent is not None:
            self.recent.extend(keys_r, values, lengths)
        self._append(self._encode(keys_r, values), head, lengths, [0] * len(lengths))

    def _append(
        self,
        store: list[mx.array] | None,
        head: list[mx.array] | None,
        lengths: list[int],
        dropped: list[int],
    ) -> None:
        """Append rows given as stored arrays (N, H, S, *) (None: rows that hold nothing)."""
        slots = [n - d for n, d in zip(lengths, dropped, strict=True)]
        if store is None and self.store is None:  # nothing written anywhere: the first write
            self.dropped += dropped  # allocates
            self._set_lengths(self.lengths + lengths)
            return
        end = max([*self.slots(), *slots, 1])
        ref = store if store is not None else self.store
        if self.store is None:  # the rows so far are empty
            cap = _round_up(end, self.step)
            self.store = [
                mx.zeros((self.rows, a.shape[1], cap, *a.shape[3:]), a.dtype) for a in ref
            ]
        self._reserve(end)
        capacity = self.store[0].shape[2]
        if store is None:
            store = [mx.zeros((len(lengths), *a.shape[1:]), a.dtype) for a in self.store]
        store = [a[..., :capacity, :] for a in store]
        pad = [(0, 0), (0, 0), (0, capacity - store[0].shape[2]), (0, 0)]
        self.store = [
            mx.concatenate([a, mx.pad(b, pad)]) for a, b in zip(self.store, store, strict=True)
        ]
        if self.full_tokens:
            # (N, H, F, D) full-precision rows; D from the packed keys, the dtype from scales
            packed, scales = self.store[0], self.store[1]
            dim = packed.shape[3] * 32 // self.quant.bits
            shape = (packed.shape[1], self.full_tokens, dim)
            rows = self.head or [mx.zeros((self.rows, *shape), scales.dtype)] * 2
            head = head or [mx.zeros((len(lengths), *shape), scales.dtype)] * 2
            self.head = [mx.concatenate([a, b]) for a, b in zip(rows, head, strict=True)]
        self.dropped += dropped
        self._set_lengths(self.lengths + lengths)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only the given rows, in that order, and shrink the capacity to fit them."""
        if self.recent is not None:
            self.recent.keep(rows)
        lengths = [self.lengths[i] for i in rows]
        dropped = [self.dropped[i] for i in rows]
        if self.store is not None:
            capacity = _round_up(
                max((n - d for n, d in zip(lengths, dropped, strict=True)), default=0), self.step
            )
            index = mx.array(list(rows), mx.int32)
            self.store = [a[..., :capacity, :][index] for a in self.store]
            if self.head is not None:
                self.head = [a[index] for a in self.head]
        self.dropped = dropped
        self._set_lengths(lengths)

    def take(self, rows: Sequence[int]) -> tuple:
        """Rows as `_append` takes them (stored arrays, head, lengths, dropped)."""
        lengths = [self.lengths[i] for i in rows]
        dropped = [self.dropped[i] for i in rows]
        if self.store is None:
            return None, None, lengths, dropped
        index = mx.array(list(rows), mx.int32)
        end = _round_up(max(n - d for n, d in zip(lengths, dropped, strict=True)), self.step)
        store = [a[..., :end, :][index] for a in self.store]
        head = [a[index] for a in self.head] if self.head is not None else None
        return store, head, lengths, dropped

    def row(self, i: int, n: int) -> tuple[mx.array, mx.array, int] | None:
        """A copy of row i's first n positions (at most its length), (1, H, n, D) each, in full
        precision as a `KVCache` holds them, and the shortest prefix of them that a continuation
        may take. Positions a windowed row dropped are zeros: a query at or after that prefix
        does not see them (its window starts after them), so they are never read. None when
        no prefix of the n is usable."""
        n, dropped = min(n, self.lengths[i]), self.dropped[i]
        start = dropped + self.max_size - 1 if dropped else 0  # (see `make_mask`)
        if n < start:
            return None
        keys, values = self._fetch(n - dropped)
        keys, values = keys[i : i + 1], values[i : i + 1]
        if self.recent is not None:  # the positions its full-precision copy holds
            lo, held = self.recent.held(i, n, self.sinks + dropped if dropped else 0)
            if held:
                at = lo - dropped  # (contiguous in slots: all past the sinks when dropped)
                keys, values = (
                    mx.concatenate([a[..., :at, :], h, a[..., at + h.shape[2] :, :]], axis=2)
                    for a, h in zip((keys, values), held, strict=True)
                )
        if dropped:  # slot s >= sinks holds position s + dropped
            s = self.sinks
            gap = mx.zeros((*keys.shape[:2], dropped, keys.shape[3]), keys.dtype)
            keys, values = (mx.concatenate([a[..., :s, :], gap, a[..., s:, :]], axis=2)
                            for a in (keys, values))  # fmt: skip
        if self.quant is not None:
            keys = self.quant.rotate(keys)  # H H = I: back to the model's keys
        return mx.contiguous(keys), mx.contiguous(values), start


def make_batch_cache(model: CausalLM, kv: KVConfig | None = None) -> list[BatchKVCache]:
    """The batch cache of each layer: quantized and windowed as `kv` says; layers that attend
    to a window of their own (OLMo 3's sliding layers) keep only that window."""
    kv = kv or KVConfig()
    kv.validate()
    quant = KVQuantizer(kv.bits, kv.group_size) if kv.bits is not None else None
    caches = []
    for window in layer_windows(model):
        if window is not None and (kv.max_size is None or window <= kv.max_size):
            caches.append(BatchKVCache(quant, 0, window, 0, kv.recent_tokens))
        else:
            caches.append(
                BatchKVCache(quant, kv.full_tokens, kv.max_size, kv.sinks, kv.recent_tokens)
            )
    return caches


def one_row_cache(model: CausalLM, kv: KVConfig | None = None) -> list[BatchKVCache]:
    """A batch cache holding one empty row: a single sequence through a quantized or windowed
    cache (a prompt to cache, a text to score)."""
    cache = make_batch_cache(model, kv)
    for layer in cache:
        layer.extend(None, None, [0])
    return cache


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
    """Append rows of `src` to `dst`, of the same kind (they stay in `src` too: `keep_rows`
    drops them)."""
    whole = not dst[0].rows and list(rows) == list(range(src[0].rows))
    for a, b in zip(src, dst, strict=True):
        if b.recent is not None:
            b.recent.append(*a.recent.take(rows))
        if whole and a.store is not None:  # all of src into an empty dst: hand the arrays over
            b.store, b.head, b.dropped = a.store, a.head, list(a.dropped)
            b._set_lengths(list(a.lengths))
            continue
        b._append(*a.take(rows))


def keep_rows(cache: list[BatchKVCache], rows: Sequence[int]) -> None:
    for layer in cache:
        layer.keep(rows)


def mark_padding(cache: list[BatchKVCache], lengths: Sequence[int]) -> None:
    """The next forward pass gives row b lengths[b] new tokens, then padding that is rewound
    after (`set_lengths`): the full-precision windows keep the rows' own last positions."""
    for layer in cache:
        layer.padding = list(lengths)


def set_lengths(cache: list[BatchKVCache], lengths: Sequence[int]) -> None:
    """Rewind each row to its given length (speculative rejections, padding)."""
    offset = mx.array(list(lengths), mx.int32)  # one array shared by every layer
    for layer in cache:
        layer.set_lengths(lengths, offset)


def row_cache(
    cache: list[BatchKVCache], i: int, n: int
) -> tuple[list[tuple[mx.array, mx.array]], int] | None:
    """Row i's first n keys and values in every layer, copied out of the batch, and the
    shortest prefix of them a continuation may take (0, or more where windowed layers dropped
    positions, which are zeros); None when no prefix is usable."""
    rows = [layer.row(i, n) for layer in cache]
    if any(row is None for row in rows):
        return None
    return [(k, v) for k, v, _ in rows], max(start for _, _, start in rows)
