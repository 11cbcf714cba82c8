"""A prompt cache shared across requests: the KV entries of finished requests (prompt + answer),
kept so that a request which starts the same way (a chat client re-sending the conversation
with one more turn) prefills only what is new.

Matching is by token ids: a new prompt reuses the longest common prefix it has with any entry
(not only whole entries, since a chat template closes the answer's turn with tokens that the
model did not generate), leaving at least its last token to be fed. Entries are bounded by
bytes and evicted least recently used first; an entry that a newer one extends is dropped.

An entry remembers the KV settings (`KVConfig`) it was computed under and serves only requests
under the same ones: a quantized or windowed cache's keys and values differ from the full
cache's after the first layer (each chunk attended to quantized entries, or to a window).
An entry of a windowed row that dropped positions (OLMo 3's sliding layers past their window,
or `--max-kv-size`) holds zeros there and serves only prefixes from its `start` on, whose
continuations never look back that far. A quantized row's entry holds its keys and values in
full precision as `BatchKVCache.row` gives them: the recent window's (kv_recent.py) as the
cache held them, older positions dequantized. Reused, they are quantized again: the window
comes back as it was, an older position's codes may move by one step (MLX's affine scales are
not idempotent), and a prefix shorter than the entry gets the entry's values for its own window.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count

import mlx.core as mx

from ..models import KVCache
from ..tokenizer import common_prefix
from .batch_kv import KVConfig


@dataclass
class _Entry:
    tokens: list[int]  # the positions the layers hold
    layers: list[tuple[mx.array, mx.array]]  # per layer keys, values: (1, H, len(tokens), D)
    nbytes: int
    kv: KVConfig  # the settings they were computed under
    start: int = 0  # the shortest prefix it serves (windowed layers dropped the ones before)


class PromptCache:
    """LRU store of KV entries keyed by the tokens they hold, bounded by `max_bytes` (and by
    `max_entries`, if given)."""

    def __init__(self, max_bytes: int = 1 << 30, max_entries: int | None = None):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self._keys = count()

    def __len__(self) -> int:
        return len(self.entries)

    def fetch(
        self, prompt: Sequence[int], kv: KVConfig | None = None
    ) -> tuple[int, list[KVCache] | None]:
        """(n, a model's list of `KVCache`s holding the first n tokens of `prompt`): the longest
        prefix any entry made under the KV settings `kv` shares with it, at most all tokens but
        the last; (0, None) if none."""
        prompt, kv = list(prompt), kv or KVConfig()
        best, n = None, 0
        for key, entry in self.entries.items():
            if entry.kv != kv:
                continue
            m = min(common_prefix(entry.tokens, prompt), len(prompt) - 1)
            if m > n and m >= entry.start:
                best, n = key, m
        if best is None:
            return 0, None
        self.entries.move_to_end(best)
        caches = []
        for keys, values in self.entries[best].layers:
            cache = KVCache()
            cache.state = (keys[..., :n, :], values[..., :n, :])
            caches.append(cache)
        return n, caches

    def insert(
        self,
        tokens: Sequence[int],
        layers: list[tuple[mx.array, mx.array]],
        kv: KVConfig | None = None,
        start: int = 0,
    ) -> None:
        """Keep the entries (per layer keys, values (1, H, len(tokens), D), copies the cache may
        own) of `tokens`, computed under the KV settings `kv`, serving prefixes from `start`
        tokens on, evicting least recently used entries to stay within `max_bytes`."""
        tokens, kv = list(tokens), kv or KVConfig()
        if not tokens:
            return
        for key, entry in list(self.entries.items()):
            if entry.kv != kv:
                continue
            shared = common_prefix(entry.tokens, tokens)
            if shared == len(tokens) and entry.start <= start:  # one holds all of it already
                self.entries.move_to_end(key)
                return
            if shared == len(entry.tokens) and start <= entry.start:  # the new one extends it
                self._drop(key)
        nbytes = sum(k.nbytes + v.nbytes for k, v in layers)
        if nbytes > self.max_bytes:
            return
        self.entries[next(self._keys)] = _Entry(tokens, layers, nbytes, kv, start)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes or len(self.entries) > (self.max_entries or 1 << 62):
            self._drop(next(iter(self.entries)))

    def tokens(self) -> list[int]:
        """The tokens of the most recently used entry ([] when empty)."""
        return list(self.entries[next(reversed(self.entries))].tokens) if self.entries else []

    def _drop(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0
