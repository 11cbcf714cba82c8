"""Prompt prefill for the batch engine: the prompts admitted to the batch are prefilled
together, one forward pass feeding each its next chunk (rows of a batch cache, each at its own
position, padded to the longest chunk and rewound after), so that several short prompts cost
about one pass rather than one each. A prompt is done when all its tokens but the last are in
the cache (the last is its first decode input, as after `step.prefill`); it then moves to the
decoding batch.

While rows decode, they wait for each pass, so one long prompt must not stall them: like vLLM's
chunked prefill, which bounds a step by a token budget with the decode rows served first, the
passes are bounded, but by time (`PrefillPolicy`), since what a chunk costs beside a decode step
depends on the backend and on the prompt's position (a 512-token pass ~50-100 decode steps on a
CPU, a few on Metal; attention grows with the position). Each decode step earns the prefill
`share` x its time as credit; a pass runs once the credit pays for twice a pass's fixed cost
(about a decode step's, so that most of it feeds tokens) or for a full chunk, as wide as the
credit pays at the last pass's time per token, and its time comes off the credit (an overdraft
delays the next). Decoding rows thus slow by at most 1 + share on average, and every prompt
progresses (each step adds credit). A full chunk is each prompt's `prefill_step_size`, but no
wider than what the prompt nearest its end still needs, within twice its cost, so that a short
prompt does not wait for a long one's chunk; while nothing decodes every pass is full (with
`bound_idle`, passes grow to that from the paid passes' time). A chunk of any width leaves the
same cache, so the tokens do not depend on the policy.
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
    # requests may arrive during a pass (a server): a pass while nothing decodes takes at most
    # the time of the decode steps between two paid passes (2 / share), so that a newcomer
    # waits about as long as a decoding row does, doubled with each such pass in a row (a
    # prompt alone soon gets full chunks); without, such passes are full chunks
    bound_idle: bool = False

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
        self.rate: float | None = None  # seconds per token fed, as the last pass took
        self.step_s: float | None = None  # the last decode step's seconds
        self.idle_passes = 0  # passes since the last decode step

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

    def earn(self, seconds: float) -> None:
        """Credit for a decode step that took `seconds` (while prompts wait), up to what the
        next pass waits for."""
        self.step_s, self.idle_passes = seconds, 0
        if self.todo:
            self.credit = min(self.credit + self.policy.share * seconds, self._due())

    def _width(self) -> int:
        """The widest chunk of a pass: the prompt nearest its end does not wait for a chunk
        of another that would cost more than twice its own (nor is padded to one)."""
        wanted, rows = [w for w in self._wanted() if w], len(self.items)
        bound = 2 * self.cost(rows * min(wanted))
        return max(w for w in wanted if self.cost(rows * w) <= bound)

    def _rate(self, width: int) -> float:
        """Seconds per token fed: the last pass's (the cost per token grows with the
        prompt's position, so the cost model's line does not tell), or the model's guess."""
        n = len(self.items) * width
        return self.rate if self.rate is not None else self.cost(n) / n

    def _due(self) -> float:
        """The credit a pass waits for: twice a pass's fixed cost (about a decode step's, so
        that most of it feeds tokens), or a full chunk."""
        width = self._width()
        fixed = self.step_s if self.step_s is not None else self.cost(1)
        return min(2 * fixed, self._rate(width) * len(self.items) * width)

    def plan(self, decoding: bool) -> list[int] | None:
        """The chunk widths of the next pass, or None for no pass this step."""
        wanted = self._wanted()
        if not any(wanted):
            self.credit = 0.0
            return None
        width = self._width()
        if decoding:
            if self.credit < self._due():
                return None
            seconds = self.credit
        elif self.policy.bound_idle:
            seconds = self._due() / self.policy.share * 2.0**self.idle_passes
        else:
            return [min(w, width) for w in wanted]
        rows = len(self.items)  # the pass is padded to its widest chunk: rows x width
        width = max(1, min(width, int(seconds / self._rate(width) / rows)))
        return [min(w, width) for w in wanted]

    def feed(self, widths: list[int], paid: bool) -> None:
        """One forward pass of each row's next `widths[i]` prompt tokens, timed into `cost`;
        `paid`: its time comes off the credit (it may overdraw it)."""
        chunks = [
            item.prompt[item.fed : item.fed + w] for item, w in zip(self.items, widths, strict=True)
        ]
        longest = max(map(len, chunks))
        if not longest:
            return
        inputs = [chunk + [0] * (longest - len(chunk)) for chunk in chunks]
        mark_padding(self.cache, list(map(len, chunks)))
        tic = time.perf_counter()
        with mx.stream(generation_stream()):
            self.model(mx.array(inputs, mx.uint32), cache=self.cache)
            mx.eval([c.state for c in self.cache])
        n, seconds = len(inputs) * longest, time.perf_counter() - tic
        self.cost.add(n, seconds)
        charged = self.cost.charge(n, seconds)
        self.rate = charged / n
        self.credit = self.credit - charged if paid else 0.0
        self.idle_passes = 0 if paid else min(self.idle_passes + 1, 16)
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
        if not self.items:  # new prompts start at other positions
            self.rate = None
        return items
