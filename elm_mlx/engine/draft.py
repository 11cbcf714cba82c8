"""A draft model for speculative decoding: a smaller model with the same vocabulary proposes
the next k tokens, one forward pass each, for the target model to verify in one pass.

Same interface as `lookup.PromptLookup`: `start(tokens)` once, then at each step
`propose(tokens, k) -> (m <= k tokens, None)`, where `tokens` is the whole history so far (it
only grows). Its tokens are chosen by the row's `pick` (the same noise per position as the
target's choice: see `speculative`), after the same logits processors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx

from ..models import PREFILL_STEP_SIZE, CausalLM, KVCache, make_cache
from .reference import prefill
from .sampling import LogitsProcessor

# logprobs (1, V) of the token at a position, the position -> the token chosen there (1,)
Pick = Callable[[mx.array, int], mx.array]


class DraftModel:
    """A smaller model of the same vocabulary proposes k tokens, one forward pass each, chosen
    as the target chooses (same logits processors, transform and per-position noise).

    Its cache holds the first `verified` history tokens, then `drafts` not yet verified; each
    call rewinds it past the drafts the history no longer agrees with.
    """

    def __init__(
        self,
        model: CausalLM,
        pick: Pick,
        processors: Sequence[LogitsProcessor] = (),
        prefill_step_size: int = PREFILL_STEP_SIZE,
    ):
        self.model = model
        self.pick = pick
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

    def propose(self, tokens: Sequence[int], k: int) -> tuple[list[int], None]:
        if k <= 0:
            return [], None
        y = self.sync(tokens)
        history = mx.array(list(tokens), mx.uint32) if self.processors else None
        drafts = []
        for i in range(k):
            logits = self.model(y[None], cache=self.cache)[:, -1, :]  # (1, V)
            for processor in self.processors:
                logits = processor(history, logits)
            y = self.pick(logits - mx.logsumexp(logits, axis=-1, keepdims=True), len(tokens) + i)
            mx.async_eval(y)
            drafts.append(y)
            if history is not None:
                history = mx.concatenate([history, y])
        proposal = mx.concatenate(drafts).tolist()
        # the cache took the last history token and every draft but the last
        self.verified, self.drafts = len(tokens), proposal[:-1]
        return proposal, None
