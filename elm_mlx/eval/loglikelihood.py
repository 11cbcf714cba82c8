"""Log-likelihoods of continuations given contexts (what multiple-choice benchmarks ask for),
and how evaluation work is split over processes under `mlx.launch`.

The choices of a question share its context: the context is run through the model once, and
its KV cache is copied into a batch where every choice continues from it. Truncation follows
lm-evaluation-harness: the input is the last `max_length` tokens of context + continuation
(minus the last token), so results match its Hugging Face model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..errors import EvaluationError
from ..models import PREFILL_STEP_SIZE, CausalLM, KVCache, make_cache

Pair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)
Progress = Callable[[int, int], None]  # (requests done, requests)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation options and their defaults (`elm eval` and the lm-eval model `elm`)."""

    batch_size: int = 16  # continuations scored in one forward pass
    max_gen_toks: int = 256  # lm-eval's default for generation tasks that set none
    window: int | None = None  # perplexity window (None: the model's context)
    stride: int | None = None  # perplexity stride (None: the window, no overlap)
    limit: float | None = None  # documents per task (a fraction if < 1)
    num_fewshot: int | None = None  # None: each task's own setting


def truncate(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple:
    """The context that fits: (context + continuation)[-(max_length + 1):] minus the
    continuation, as lm-evaluation-harness truncates."""
    if not context or not continuation:
        raise EvaluationError("a loglikelihood request needs a non-empty context and continuation")
    if len(continuation) > max_length:
        raise EvaluationError(
            f"a continuation of {len(continuation)} tokens does not fit the model's context "
            f"of {max_length}"
        )
    keep = max_length + 1 - len(continuation)
    return tuple(context[-keep:])


def owners(costs: Sequence[int], size: int) -> list[int]:
    """The process that handles each item: largest first, to the least loaded (deterministic,
    so every process computes the same split)."""
    load, owner = [0] * size, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(size), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += costs[i]
    return owner


def share(local: dict[int, Any], world: mx.distributed.Group | None) -> dict[int, Any]:
    """Every process's results, merged: each sends its {index: result} as JSON (exact for
    floats and strings) through an all_gather of bytes."""
    if world is None or world.size() == 1:
        return local
    data = json.dumps(list(local.items())).encode()
    sizes = mx.distributed.all_gather(mx.array([len(data)]), group=world, stream=mx.cpu)
    width = max(sizes.tolist())
    padded = mx.array(list(data) + [0] * (width - len(data)), dtype=mx.uint8)
    rows = mx.distributed.all_gather(padded[None], group=world, stream=mx.cpu).tolist()
    merged: dict[int, Any] = {}
    for row, n in zip(rows, sizes.tolist(), strict=True):
        merged.update({int(k): v for k, v in json.loads(bytes(row[:n]))})
    return merged


def _prefill(model: CausalLM, tokens: Sequence[int]) -> list[KVCache]:
    cache = make_cache(model)
    ids = mx.array(list(tokens), dtype=mx.uint32)
    for start in range(0, len(tokens), PREFILL_STEP_SIZE):
        model(ids[None, start : start + PREFILL_STEP_SIZE], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def _batch_cache(prefix: list[KVCache], batch: int) -> list[KVCache]:
    """`batch` rows that all continue from `prefix` (which stays untouched)."""
    caches = []
    for layer in prefix:
        c = KVCache()
        if layer.offset:
            keys, values = layer.state  # (1, H, P, D)
            c.state = (
                mx.broadcast_to(keys, (batch, *keys.shape[1:])),
                mx.broadcast_to(values, (batch, *values.shape[1:])),
            )
        caches.append(c)
    return caches


def _score_rows(
    model: CausalLM, prefix: list[KVCache], rows: list[tuple[list[int], list[int]]]
) -> list[tuple[float, bool]]:
    """(sum of log p(target), every target greedy) per row of (inputs, targets), all rows
    continuing from `prefix`; rows are right-padded, which the causal mask makes harmless."""
    width = max(len(inputs) for inputs, _ in rows)
    pad = [[0] * (width - len(inputs)) for inputs, _ in rows]
    x = mx.array([inputs + p for (inputs, _), p in zip(rows, pad, strict=True)], dtype=mx.uint32)
    y = mx.array([targets + p for (_, targets), p in zip(rows, pad, strict=True)], dtype=mx.int32)
    valid = mx.arange(width)[None] < mx.array([len(t) for _, t in rows])[:, None]  # (B, L)
    logits = model(x, cache=_batch_cache(prefix, len(rows))).astype(mx.float32)  # (B, L, V)
    picked = mx.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    logprobs = picked - mx.logsumexp(logits, axis=-1)
    scores = mx.where(valid, logprobs, 0.0).sum(axis=1)
    greedy = mx.where(valid, mx.argmax(logits, axis=-1) == y, True).all(axis=1)
    mx.eval(scores, greedy)
    return list(zip(scores.tolist(), greedy.tolist(), strict=True))


def loglikelihoods(
    model: CausalLM,
    pairs: Sequence[Pair],
    max_length: int,
    batch_size: int = EvalConfig.batch_size,
    world: mx.distributed.Group | None = None,
    progress: Progress | None = None,
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding would produce it) per pair.

    Pairs with the same (truncated) context are one group: the context minus its last token is
    prefilled once, then the group's continuations run `batch_size` at a time from a copy of
    that cache. Under `world`, groups are split over processes and results shared."""
    if batch_size < 1:
        raise EvaluationError(f"batch size must be >= 1, got {batch_size}")
    groups: dict[tuple, list[int]] = {}
    for i, (context, continuation) in enumerate(pairs):
        groups.setdefault(truncate(context, continuation, max_length), []).append(i)
    keys = list(groups)
    costs = [len(k) + sum(len(pairs[i][1]) for i in groups[k]) for k in keys]
    rank, size = (world.rank(), world.size()) if world is not None else (0, 1)
    mine = [k for k, owner in zip(keys, owners(costs, size), strict=True) if owner == rank]
    local: dict[int, tuple[float, bool]] = {}
    for context in mine:
        prefix = _prefill(model, context[:-1])
        rows: dict[tuple, list[int]] = {}  # identical rows (same continuation) run once
        for i in groups[context]:
            continuation = list(pairs[i][1])
            row = (context[-1], *continuation[:-1]), tuple(continuation)
            rows.setdefault(row, []).append(i)
        unique = list(rows)
        for start in range(0, len(unique), batch_size):
            chunk = unique[start : start + batch_size]
            results = _score_rows(model, prefix, [(list(a), list(b)) for a, b in chunk])
            for row, result in zip(chunk, results, strict=True):
                local.update(dict.fromkeys(rows[row], result))
        if progress is not None:
            progress(min(len(local) * size, len(pairs)), len(pairs))
    merged = share(local, world)
    return [tuple(merged[i]) for i in range(len(pairs))]
