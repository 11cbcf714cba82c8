"""Perplexity of a text under a model, in windows of the model's context.

Each token after the first is predicted exactly once. Windows are end-aligned: a window that
scores tokens up to position `end` sees up to `window` tokens before it, so with `stride <
window` every scored token keeps at least `window - stride` tokens of context (the sliding-window
method of Hugging Face's perplexity guide), and the last window always gets a full context (as
lm-evaluation-harness's rolling windows do). A window is fed through the KV cache in chunks, so
memory stays bounded by the chunk, not the window; `new_cache` makes that cache (a quantized or
windowed one, to measure what it costs: every chunk attends to it, as generation does). Imports
only models, tokenizer and errors: `elm convert` uses it without the generation engine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

from ..errors import EvaluationError, OptionError
from ..models import PREFILL_STEP_SIZE, CausalLM, context_length, make_cache
from ..tokenizer import Tokenizer

Progress = Callable[[int, int], None]  # (tokens scored so far, tokens to score)
NewCache = Callable[[CausalLM], list]  # a model's per-layer caches for one sequence


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # scored tokens (all but the first)
    bytes: int  # UTF-8 bytes of the text
    bits_per_byte: float  # total NLL in bits / bytes
    seconds: float

    @property
    def total_nll(self) -> float:
        return self.nll * self.tokens


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_new) per window over n token ids: the window feeds ids[start:end]
    and scores the predictions of ids[first_new + 1 : end + 1]."""
    spans, done = [], 0  # `done`: input positions whose prediction is already scored
    last = n - 1  # the last id has nothing to predict
    end = min(window, last)
    while done < last:
        spans.append((max(0, end - window), end, done))
        done, end = end, min(end + stride, last)
    return spans


def check_window(model: CausalLM, window: int | None, stride: int | None) -> tuple[int, int]:
    """(window, stride) with defaults filled in: the model's context, and no overlap."""
    limit = context_length(model)
    window = limit if window is None else window
    if not 1 <= window <= limit:
        raise OptionError("window", f"must be between 1 and the model's context {limit}")
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise OptionError("stride", f"must be between 1 and the window ({window})")
    return window, stride


def score_tokens(
    model: CausalLM,
    ids: Sequence[int],
    window: int,
    stride: int,
    progress: Progress | None = None,
    world: mx.distributed.Group | None = None,
    new_cache: NewCache = make_cache,
) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, number of scored tokens) of ids[1:].

    Under `world` (data parallel), each process scores every size-th window and the sums are
    added over processes."""
    spans = windows(len(ids), window, stride)
    rank, size = (world.rank(), world.size()) if world is not None else (0, 1)
    tokens = mx.array(list(ids), dtype=mx.uint32)
    total, scored, todo = 0.0, 0, len(ids) - 1
    for start, end, first_new in spans[rank::size]:
        cache = new_cache(model)
        for c0 in range(start, end, PREFILL_STEP_SIZE):
            c1 = min(c0 + PREFILL_STEP_SIZE, end)
            logits = model(tokens[None, c0:c1], cache=cache)[0].astype(mx.float32)  # (L, V)
            keep = max(first_new, c0) - c0  # positions before `first_new` are context only
            logits, targets = logits[keep:], tokens[c0 + keep + 1 : c1 + 1]
            if targets.size == 0:
                mx.eval([c.state for c in cache])
                continue
            picked = mx.take_along_axis(logits, targets[:, None].astype(mx.int32), axis=-1)
            nll = (mx.logsumexp(logits, axis=-1) - picked[:, 0]).sum()
            total += nll.item()
            scored += targets.size
            if progress is not None:
                progress(min(scored * size, todo), todo)
    if size > 1:
        sums = mx.distributed.all_sum(mx.array([total, float(scored)]), group=world)
        total, scored = sums[0].item(), round(sums[1].item())
    return total, scored


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids perplexity scores: the text as the tokenizer encodes it (with BOS if it adds one,
    in which case every token of the text is scored)."""
    from transformers.utils import logging as hf_logging

    # transformers warns of "indexing errors" past the model's context: windows handle that.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return list(tokenizer.encode(text))
    finally:
        hf_logging.set_verbosity(verbosity)


def perplexity(
    model: CausalLM,
    tokenizer: Tokenizer,
    text: str,
    window: int | None = None,
    stride: int | None = None,
    progress: Progress | None = None,
    world: mx.distributed.Group | None = None,
    source: str = "the text",
    new_cache: NewCache = make_cache,
) -> PerplexityResult:
    """Perplexity of `text` (windows of the model's context unless `window`; `stride` < window
    overlaps them). `progress(done, total)` is called as tokens are scored; `source` names the
    text in errors."""
    window, stride = check_window(model, window, stride)
    ids = encode_text(tokenizer, text)
    if len(ids) < 2:
        raise EvaluationError(
            f"{source} has {len(ids)} token{'s' * (len(ids) != 1)}: perplexity needs at least 2 "
            "(one to predict from, one to predict); give a longer text"
        )
    tic = time.perf_counter()
    total, scored = score_tokens(model, ids, window, stride, progress, world, new_cache)
    seconds = time.perf_counter() - tic
    n_bytes = len(text.encode("utf-8"))
    nll = total / scored
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=scored,
        bytes=n_bytes,
        bits_per_byte=total / math.log(2) / max(n_bytes, 1),
        seconds=seconds,
    )
