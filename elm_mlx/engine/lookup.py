"""Prompt lookup: propose the next tokens by copying what followed the most recent earlier
occurrence of the last n tokens (Saxena 2023, "Prompt Lookup Decoding"). Pure Python over
token ids, no MLX: the proposal is deterministic and cheap, so it pays off whenever the answer
repeats its input (edits, extraction, summaries, code)."""

from __future__ import annotations

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


class PromptLookup:
    """`lookup` with an index of the last position of every n-gram, kept up to date as the
    token history grows (histories only grow: accepted tokens are never taken back).

    The proposer interface shared with the draft model: `start(tokens)` once, then
    `propose(tokens, k) -> (m <= k tokens, None)` (None: a one-hot proposal distribution)."""

    def __init__(self, max_ngram: int = 3):
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1, got {max_ngram}")
        self.max_ngram = max_ngram
        self.last_end: dict[tuple[int, ...], int] = {}  # n-gram -> the end of its latest copy
        self.indexed = 0  # n-grams ending at or before this position are in the index

    def start(self, tokens: Sequence[int]) -> None:
        self.index(tokens)

    def index(self, tokens: Sequence[int]) -> None:
        """Add the n-grams that end before the last token (the suffix itself is not earlier)."""
        for end in range(self.indexed + 1, len(tokens)):
            for n in range(1, min(self.max_ngram, end) + 1):
                self.last_end[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, len(tokens) - 1)

    def propose(self, tokens: Sequence[int], k: int) -> tuple[list[int], None]:
        self.index(tokens)
        if k <= 0:
            return [], None
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            end = self.last_end.get(tuple(tokens[-n:]))
            if end is not None:
                return copy_from(tokens, end, k), None
        return [], None
