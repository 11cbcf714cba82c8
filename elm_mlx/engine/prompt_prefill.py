"""Prompt prefill for the batch engine: the prompts admitted to the batch are prefilled
together, one forward pass feeding each its next chunk (rows of a batch cache, each at its own
position, padded to the longest chunk and rewound after), so that several short prompts cost
about one pass rather than one each. A prompt is done when all its tokens but the last are in
the cache (the last is its first decode input, as after `step.prefill`); it then moves to the
decoding batch.

While rows decode, they wait for each pass, so one long prompt must not stall them: like vLLM's
chunked prefill, which bounds a step by a token budget with the decode rows served first, the
passes are bounded, but by time (`PrefillPolicy`), since what a chunk costs beside a decode step
depends on the backend (a 512-token pass ~50 decode steps on a CPU, a few on Metal). Each decode
step earns the prefill `share` x its cost (`StepCost`, fitted from the engine's timings) as
credit; a pass runs once the credit pays for twice a pass's fixed cost (so at least half of it
feeds tokens) or for all the prompts still need, as wide as the credit pays, each prompt at most
its `prefill_step_size`, and spends what it costs. Decoding rows thus slow by at most 1 + share
on average, and every prompt progresses (each step adds credit). With no row decoding, each
prompt gets its full `prefill_step_size` every pass. A chunk of any width leaves the same cache,
so the tokens do not depend on the policy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx

from ..errors import OptionError
from ..models import CausalLM, KVCache, make_cache
from .batch_kv import (
    BatchKVCache,
    KVConfig,
    add_rows,
    keep_rows,
    make_batch_cache,
    mark_padding,
    move_rows,
    set_lengths,
)
from .config import GenerationConfig
from .reference import generation_stream
from .spec_budget import StepCost


@dataclass(frozen=True)
class PrefillPolicy:
    """How much prefill may slow the rows that decode (see the module docstring)."""

    share: float = 0.5  # prefill seconds per second of decoding while rows decode

    def validate(self) -> None:
        if not self.share > 0:
            raise OptionError("prefill_share", f"must be > 0, got {self.share}")


@dataclass(eq=False)
class Pending:
    """A request whose prompt is being prefilled."""

    id: int
    prompt: list[int]
    config: GenerationConfig
    logprobs: int | None
    keep_logprobs: bool = False
    cached: int = 0  # prompt tokens whose entries came from the prompt cache
    fed: int = 0  # prompt tokens in the cache

    @property
    def todo(self) -> int:
        return len(self.prompt) - 1 - self.fed


class Prefill:
    """The prompts being prefilled, in the rows of their own batch cache."""

    def __init__(
        self,
        model: CausalLM,
        cost: StepCost,
        kv: KVConfig | None = None,
        policy: PrefillPolicy | None = None,
    ):
        self.model, self.cost = model, cost
        self.policy = policy or PrefillPolicy()
        self.policy.validate()
        self.cache = make_batch_cache(model, kv)
        self.items: list[Pending] = []
        self.credit = 0.0  # seconds of prefill the decode steps have paid for

    def __len__(self) -> int:
        return len(self.items)

    @property
    def todo(self) -> bool:
        return any(item.todo for item in self.items)

    def add(self, item: Pending, cache: list[KVCache] | None = None) -> None:
        """Admit a prompt; `cache` holds its first `item.fed` tokens (from the prompt cache)."""
        add_rows(self.cache, [cache if cache is not None else make_cache(self.model)])
        self.items.append(item)

    def _wanted(self) -> list[int]:
        """Each prompt's next chunk width without a budget: its `prefill_step_size`."""
        return [min(item.config.prefill_step_size, item.todo) for item in self.items]

    def earn(self, decode_tokens: int) -> None:
        """Credit for a decode step that fed `decode_tokens` tokens (while prompts wait), up to
        what one unbounded pass costs."""
        if not self.todo:
            return
        full = self.cost(len(self.items) * max(self._wanted()))
        self.credit = min(self.credit + self.policy.share * self.cost(decode_tokens), full)

    def plan(self, decoding: bool) -> list[int] | None:
        """The chunk widths of the next pass, or None for no pass this step."""
        wanted = self._wanted()
        if not any(wanted):
            self.credit = 0.0
            return None
        if not decoding:
            return wanted
        # the pass is padded to its widest chunk: rows x width tokens
        width = min(self.cost.within(self.credit) / len(self.items), max(wanted))
        if width < 1:
            return None
        widths = [min(w, int(width)) for w in wanted]
        if widths != wanted and self.cost(len(widths) * max(widths)) < 2 * self.cost(0):
            return None  # mostly fixed cost: wait for more credit
        return widths

    def feed(self, widths: list[int]) -> None:
        """One forward pass of each row's next `widths[i]` prompt tokens, timed into `cost`;
        its estimated cost comes off the credit."""
        chunks = [
            item.prompt[item.fed : item.fed + w] for item, w in zip(self.items, widths, strict=True)
        ]
        longest = max(map(len, chunks))
        if not longest:
            return
        # (with no row decoding, a pass is not paid for and may cost more than the credit)
        self.credit = max(self.credit - self.cost(len(chunks) * longest), 0.0)
        inputs = [chunk + [0] * (longest - len(chunk)) for chunk in chunks]
        mark_padding(self.cache, list(map(len, chunks)))
        tic = time.perf_counter()
        with mx.stream(generation_stream()):
            self.model(mx.array(inputs, mx.uint32), cache=self.cache)
            mx.eval([c.state for c in self.cache])
        self.cost.add(len(inputs) * longest, time.perf_counter() - tic)
        for item, chunk in zip(self.items, chunks, strict=True):
            item.fed += len(chunk)
        set_lengths(self.cache, [item.fed for item in self.items])  # forget the padding

    def take_done(self, dst: list[BatchKVCache]) -> list[Pending]:
        """Move the prompts done to the end of `dst`, in order; return them."""
        done = [i for i, item in enumerate(self.items) if not item.todo]
        if not done:
            return []
        move_rows(self.cache, done, dst)
        return self.remove([self.items[i] for i in done])

    def remove(self, items: list[Pending]) -> list[Pending]:
        stay = [i for i, item in enumerate(self.items) if item not in items]
        keep_rows(self.cache, stay)
        self.items = [self.items[i] for i in stay]
        return items
