"""Proposers for speculative decoding: guess the next few tokens cheaply, for the target model
to verify in one forward pass.

- `PromptLookup`: copies what followed the most recent earlier occurrence of the last n tokens
  (pure Python over token ids; a deterministic proposal).
- `DraftModel`: a smaller model with the same vocabulary samples the tokens (with its own cache).

Both are told the prompt once, `start(tokens)`, then asked at each step
`propose(tokens, k) -> (m <= k tokens, their proposal logprobs (m, V) or None for one-hot)`,
where `tokens` is the whole history so far (it only grows).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from .errors import GenerationError
from .generate import prefill
from .models import CausalLM, KVCache, make_cache
from .sample import LogitsProcessor, Transform


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
    token history grows (histories only grow: accepted tokens are never taken back)."""

    def __init__(self, max_ngram: int = 3):
        if max_ngram < 1:
            raise GenerationError(f"max_ngram must be >= 1, got {max_ngram}")
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


class DraftModel:
    """A smaller model of the same vocabulary samples k tokens, one forward pass each, after the
    same logits processors and sampling transform as the target (so q is comparable with p).

    Its cache holds the first `verified` history tokens, then `drafts` not yet verified; each
    call rewinds it past the drafts the history no longer agrees with.
    """

    def __init__(
        self,
        model: CausalLM,
        transform: Transform | None,
        processors: Sequence[LogitsProcessor] = (),
        prefill_step_size: int = 512,
    ):
        self.model = model
        self.transform = transform  # None: greedy
        self.processors = list(processors)
        self.prefill_step_size = prefill_step_size
        self.cache: list[KVCache] = make_cache(model)
        self.verified = 0
        self.drafts: list[int] = []

    def start(self, tokens: Sequence[int]) -> None:
        self.sync(tokens)

    def sync(self, tokens: Sequence[int]) -> mx.array:
        """Bring the cache to all of `tokens` but the last, which is returned (to be fed with the
        first draft step)."""
        keep = 0  # drafts that the history took
        while (
            keep < len(self.drafts)
            and self.verified + keep < len(tokens) - 1
            and self.drafts[keep] == tokens[self.verified + keep]
        ):
            keep += 1
        for c in self.cache:
            c.trim(len(self.drafts) - keep)
        new = mx.array(list(tokens[self.verified + keep :]), mx.uint32)
        last = prefill(self.model, new, self.cache, self.prefill_step_size)
        self.verified, self.drafts = len(tokens) - 1, []
        return last

    def propose(self, tokens: Sequence[int], k: int) -> tuple[list[int], mx.array | None]:
        if k <= 0:
            return [], None
        y = self.sync(tokens)
        history = mx.array(list(tokens), mx.uint32) if self.processors else None
        drafts, logprobs = [], []
        for _ in range(k):
            logits = self.model(y[None], cache=self.cache)[:, -1, :]  # (1, V)
            for processor in self.processors:
                logits = processor(history, logits)
            q = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            if self.transform is None:
                y = mx.argmax(q, axis=-1)
            else:
                q = self.transform(q)
                y = mx.random.categorical(q, axis=-1)
            mx.async_eval(y)
            drafts.append(y)
            logprobs.append(q)
            if history is not None:
                history = mx.concatenate([history, y])
        proposal = mx.concatenate(drafts).tolist()
        # the cache took the last history token and every draft but the last
        self.verified, self.drafts = len(tokens), proposal[:-1]
        return proposal, mx.concatenate(logprobs, axis=0)  # (k, V)


def vocab_size(model: CausalLM) -> int:
    """The width of the model's logits, from one throwaway forward pass."""
    return model(mx.array([[0]], mx.uint32), cache=make_cache(model)).shape[-1]
