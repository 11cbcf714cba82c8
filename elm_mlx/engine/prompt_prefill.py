"""Prompt prefill for the batch engine: the prompts admitted to the batch are prefilled
together, one forward pass feeding each its next chunk (rows of a batch cache, each at its own
position, padded to the longest chunk and rewound after), so that several short prompts cost
about one pass rather than one each. A prompt is done when all its tokens but the last are in
the cache (the last is its first decode input, as after `step.prefill`); it then moves to the
decoding batch."""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx

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

    def __init__(self, model: CausalLM, cost: StepCost, kv: KVConfig | None = None):
        self.model, self.cost = model, cost
        self.cache = make_batch_cache(model, kv)
        self.items: list[Pending] = []

    def __len__(self) -> int:
        return len(self.items)

    @property
    def todo(self) -> bool:
        return any(item.todo for item in self.items)

    def add(self, item: Pending, cache: list[KVCache] | None = None) -> None:
        """Admit a prompt; `cache` holds its first `item.fed` tokens (from the prompt cache)."""
        add_rows(self.cache, [cache if cache is not None else make_cache(self.model)])
        self.items.append(item)

    def feed(self, share: int = 1) -> None:
        """One forward pass of the next prompt tokens of every row, each its request's
        `prefill_step_size` divided by `share`; timed into `cost`."""
        chunks = []
        for item in self.items:
            width = max(1, item.config.prefill_step_size // share)
            chunks.append(item.prompt[item.fed : item.fed + min(width, item.todo)])
        longest = max(map(len, chunks))
        if not longest:
            return
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
