"""Samplers and logits processors: plain callables.

- A logits processor maps (tokens so far (N,), logits (B, V)) -> logits (B, V).
- A distribution transform maps logprobs (B, V) -> the logprobs actually sampled from (B, V),
  after temperature, top-k, top-p and min-p; speculative sampling needs it to compare p and q.
- A sampler maps logprobs (B, V) -> token ids (B,).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
Transform = Callable[[mx.array], mx.array]
Sampler = Callable[[mx.array], mx.array]


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
