"""Prompt lookup: propose the next tokens by copying what followed the most recent earlier
occurrence of the last n tokens (Saxena 2023, "Prompt Lookup Decoding"). Pure Python over
token ids, no MLX: the proposal is deterministic and cheap, so it pays off whenever the answer
repeats its input (edits, extraction, summaries, code)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence


def lookup(tokens: Sequence[int], num: int, max_ngram: int = 3) -> list[int]:
    """The definition, for reading and testing: find the most recent earlier occurrence of the
    last n tokens (n = max_ngram down to 1) and copy the `num` tokens that followed it.

    The copy may run into the tokens being proposed (as in LZ77), so a loop of period p
    proposes `num` tokens, not p."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        suffix = list(tokens[-n:])
        for end in range(len(tokens) - 1, n - 1, -1):  # end: where the earlier n-gram stops
            if list(tokens[end - n : end]) == suffix:
                return copy_from(tokens, end, num)
    return []


def copy_from(tokens: Sequence[int], start: int, num: int) -> list[int]:
    out: list[int] = []
    for i in range(start, start + num):
        out.append(tokens[i] if i < len(tokens) else out[i - len(tokens)])
    return out


_MOD = (1 << 61) - 1  # a Mersenne prime: n-gram hashes as polynomials modulo it


class PromptLookup:
    """`lookup` with an index of the last position of every n-gram, kept up to date as the
    token history grows (histories only grow: accepted tokens are never taken back).

    Cost: indexing a token is O(max_ngram) and a proposal O(max_ngram + k), whatever k, the
    history length or the alphabet: n-grams are keyed by rolling hashes (the hash of the n
    tokens before a position extends the one of n - 1 by one multiply-add), with a base drawn
    at random per proposer so that crafted token ids cannot force collisions; a hit is
    confirmed against the tokens themselves before it is copied.

    The proposer interface shared with the draft model: `start(tokens)` once, then
    `propose(tokens, k) -> (m <= k tokens, None)` (None: a one-hot proposal distribution)."""

    def __init__(self, max_ngram: int = 3):
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1, got {max_ngram}")
        self.max_ngram = max_ngram
        self.base = (1 << 20) + secrets.randbelow(_MOD - (1 << 21))
        # one dict per n (index n - 1): hash of an n-gram -> the end of its latest copy
        self.last_end: list[dict[int, int]] = [{} for _ in range(max_ngram)]
        self.indexed = 0  # n-grams ending at or before this position are in the index

    def start(self, tokens: Sequence[int]) -> None:
        self.index(tokens)

    def _hashes(self, tokens: Sequence[int], end: int) -> list[int]:
        """The hashes of the 1..max_ngram tokens before `end` (fewer near the start)."""
        out, h, power = [], 0, 1
        for n in range(1, min(self.max_ngram, end) + 1):
            h = (h + (int(tokens[end - n]) + 1) * power) % _MOD
            power = power * self.base % _MOD
            out.append(h)
        return out

    def index(self, tokens: Sequence[int]) -> None:
        """Add the n-grams that end before the last token (the suffix itself is not earlier)."""
        for end in range(self.indexed + 1, len(tokens)):
            for n, h in enumerate(self._hashes(tokens, end)):
                self.last_end[n][h] = end
        self.indexed = max(self.indexed, len(tokens) - 1)

    def propose(self, tokens: Sequence[int], k: int) -> tuple[list[int], None]:
        self.index(tokens)
        if k <= 0 or len(tokens) < 2:
            return [], None
        hashes = self._hashes(tokens, len(tokens))[: len(tokens) - 1]
        for n in range(len(hashes), 0, -1):
            end = self.last_end[n - 1].get(hashes[n - 1])
            if end is not None and list(tokens[end - n : end]) == list(tokens[-n:]):
                return copy_from(tokens, end, k), None
        return [], None
