"""Samplers and logits processors: plain callables.

- A logits processor maps (tokens so far (N,), logits (B, V)) -> logits (B, V).
- A distribution transform maps logprobs (B, V) -> the logprobs actually sampled from (B, V),
  after temperature, top-k, top-p and min-p; speculative sampling needs it to compare p and q.
- A sampler maps logprobs (B, V) -> token ids (B,).

The engine samples by position: the token at position t of a request seeded with s is
argmax(transform(logprobs) + g), with g Gumbel noise drawn from a key made of (s, t) alone
(`choose`). That is exact sampling from the transformed distribution (the Gumbel-max trick),
and since the noise depends on nothing else, a seeded request draws the same tokens alone or in
a batch of any size, and with or without speculation (`speculative`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import mlx.core as mx

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
Transform = Callable[[mx.array], mx.array]
Sampler = Callable[[mx.array], mx.array]


class Constraint(Protocol):
    """What a row's output must match (a JSON schema, a regular expression, a grammar), as a
    matcher over token ids that the row advances with each token it emits."""

    def mask(self) -> mx.array:
        """(V,) bool: the tokens allowed next."""
        ...

    def advance(self, token: int) -> None: ...

    def rollback(self, n: int) -> None:
        """Undo the last n advances (a proposal checked ahead)."""
        ...

    @property
    def done(self) -> bool:
        """The output is complete and nothing may follow."""
        ...


def make_transform(
    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> Transform:
    """Logprobs -> normalised logprobs of the sampling distribution (temperature > 0)."""

    def transform(logprobs: mx.array) -> mx.array:
        x = logprobs / temperature if temperature > 0 else logprobs
        if top_k and top_k < x.shape[-1]:
            # the k-th largest value by a partition (linear time), not a full sort; ties with it
            # are kept
            kth = mx.partition(x, -top_k, axis=-1)[..., -top_k][..., None]
            x = mx.where(x < kth, -mx.inf, x)
        if min_p > 0.0:
            # keep tokens with p >= min_p * p_max, i.e. logp >= log(min_p) + logp_max
            threshold = mx.max(x, axis=-1, keepdims=True) + math.log(min_p)
            x = mx.where(x < threshold, -mx.inf, x)
        if 0.0 < top_p < 1.0:
            order = mx.argsort(-x, axis=-1)
            sorted_x = mx.take_along_axis(x, order, axis=-1)
            probs = mx.softmax(sorted_x, axis=-1)
            # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
            drop_sorted = (mx.cumsum(probs, axis=-1) - probs) >= top_p
            drop = mx.put_along_axis(mx.zeros_like(drop_sorted), order, drop_sorted, axis=-1)
            x = mx.where(drop, -mx.inf, x)
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    return transform


def make_sampler(
    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> Sampler:
    """Greedy at temperature 0, otherwise a draw from `make_transform`'s distribution."""
    if temperature <= 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    transform = make_transform(temperature, top_p, top_k, min_p)
    return lambda logprobs: mx.random.categorical(transform(logprobs), axis=-1)


_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """A 64-bit seed for one position of one request (SplitMix64 of the pair), so that
    neighbouring seeds and positions give unrelated keys."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def choose(
    logprobs: mx.array, transform: Transform | None, seed: int | None, start: int
) -> mx.array:
    """Tokens (W,) for W consecutive positions start, start + 1, ... from their logprobs (W, V):
    the argmax when greedy (transform None), else a draw keyed by (seed, position)."""
    if transform is None:
        return mx.argmax(logprobs, axis=-1)
    width, vocab = logprobs.shape
    noise = [
        mx.random.gumbel((1, vocab), key=mx.random.key(position_seed(seed, start + j)))
        for j in range(width)
    ]
    x = transform(logprobs)
    return mx.argmax(x + (noise[0] if width == 1 else mx.concatenate(noise)), axis=-1)


def repetition_penalty(penalty: float) -> LogitsProcessor:
    """Hugging Face semantics: every token seen so far (prompt included) has its logit divided
    by `penalty` when positive and multiplied by it when negative."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        idx = mx.broadcast_to(tokens[None], (logits.shape[0], tokens.size))
        selected = mx.take_along_axis(logits, idx, axis=-1)
        selected = mx.where(selected > 0, selected / penalty, selected * penalty)
        return mx.put_along_axis(logits, idx, selected, axis=-1)

    return process


def make_logits_processors(repetition_penalty_value: float | None = None) -> list[LogitsProcessor]:
    processors: list[LogitsProcessor] = []
    if repetition_penalty_value is not None and repetition_penalty_value != 1.0:
        processors.append(repetition_penalty(repetition_penalty_value))
    return processors
