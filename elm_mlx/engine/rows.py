"""The steps of the batch engine: one batched forward pass over every row, then each row's
tokens chosen with its own sampler, seed and logits processors.

A row's cache holds all its tokens but the last, which is its next input (as after `prefill`).

- A plain step (no row proposes) feeds (B, 1). `launch` builds it and starts computing it
  asynchronously, `collect` reads its tokens back. The engine launches step t + 1, whose
  inputs are step t's tokens still being computed, before it collects step t: building one
  step overlaps computing the other, as in `generate_step`.
- A speculative step (some row proposes) feeds (B, 1 + w): each row's next input, then its
  proposal, padded to the longest one (`speculate`, synchronous: proposals need the tokens);
  afterwards each row is rewound to its accepted tokens (`rewind`).

Token choice per row is the single-request one: greedy is the argmax of the model's logprobs
(after the logits processors), sampling draws from the row's `make_transform` distribution, and
a proposal is accepted as in `speculative.verify` (argmax match, or min(1, p/q) then a residual
draw). A sampling row draws its plain tokens with its own PRNG key, split once per token as
`mx.random.seed` + `stream_generate` would, so a seeded request gives the same tokens as
alone, whatever runs beside it; speculative sampling draws from MLX's global generator.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from ..models import CausalLM
from .batch_kv import BatchKVCache, set_lengths
from .config import GenerationConfig
from .draft import DraftModel
from .lookup import PromptLookup
from .reference import generation_stream
from .sampling import LogitsProcessor, Transform, make_transform
from .spec_budget import RowLength, StepCost, Want, speculation_width
from .speculative import make_proposer, verify
from .stops import TextStream


@dataclass(eq=False)  # rows are compared by identity
class Row:
    """The decoding state of one request in the batch."""

    id: int
    config: GenerationConfig
    tokens: list[int]  # prompt + generated; the last one is the next input
    text: TextStream
    prompt_tokens: int
    cached_tokens: int
    logprobs: int | None  # None: no logprobs; n >= 0: the chosen token's and the n most likely
    transform: Transform | None = None  # None: greedy
    key: mx.array | None = None  # the sampling PRNG key
    processors: list[LogitsProcessor] = field(default_factory=list)
    seen: mx.array | None = None  # `tokens` plus tokens still in flight, for the processors
    proposer: PromptLookup | DraftModel | None = None
    lengths: RowLength | None = None
    draft_s: float = 0.0  # running seconds per drafted token
    done: bool = False

    @classmethod
    def start(
        cls,
        rid: int,
        model: CausalLM,
        prompt: list[int],
        config: GenerationConfig,
        text: TextStream,
        cached_tokens: int = 0,
        logprobs: int | None = None,
    ) -> Row:
        """A row about to join, with its sampler, seed and proposer."""
        row = cls(rid, config, list(prompt), text, len(prompt), cached_tokens, logprobs)
        if config.temperature > 0:
            row.transform = make_transform(
                config.temperature, config.top_p, config.top_k, config.min_p
            )
            seed = config.seed
            if seed is None:  # from the global generator: `mx.random.seed` fixes a whole run
                seed = mx.random.randint(0, 2**31 - 1, ()).item()
            row.key = mx.random.key(seed)
        row.processors = config.logits_processors()
        if config.speculative:
            row.proposer, solo = make_proposer(model, config, row.transform)
            row.lengths = RowLength(solo.max_k, solo.probe_budget)
            with mx.stream(generation_stream()):
                row.proposer.start(row.tokens)
        return row

    @property
    def left(self) -> int:
        return self.config.max_tokens - self.text.count

    def history(self) -> mx.array:
        return self.seen if self.seen is not None else mx.array(self.tokens, mx.uint32)


@dataclass
class Run:
    """What a step gives one row: `tokens` to emit in order (its accepted proposal, then one
    chosen token), how many were proposed, and logprobs per token if the row asked."""

    tokens: list[int]
    proposed: int = 0
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None  # per token: (id, logprob), best first


@dataclass
class Launch:
    """A plain step being computed: each row's next token, and logprobs if asked."""

    rows: list[Row]
    tokens: mx.array  # (B,)
    picked: tuple[mx.array, mx.array, mx.array] | None  # see `_pick`
    started: float  # when it was launched
    done_at: float | None = None  # when its results were found computed


def _draw(row: Row, logprobs: mx.array) -> mx.array:
    """One token from a sampling row's distribution (1, V) -> (1,), with its own key."""
    row.key, sub = mx.random.split(row.key)
    return mx.random.categorical(row.transform(logprobs), key=sub)


def _pick(logprobs: mx.array, tokens: mx.array, top: int) -> tuple[mx.array, mx.array, mx.array]:
    """logprobs (N, V) and tokens (N,) -> each token's logprob (N,), and the ids (N, top) and
    logprobs (N, top) of the `top` most likely tokens (unordered)."""
    chosen = mx.take_along_axis(logprobs, tokens[:, None].astype(mx.int32), axis=-1)[:, 0]
    if not top:
        return chosen, mx.zeros((tokens.size, 0), mx.int32), mx.zeros((tokens.size, 0))
    ids = mx.argpartition(-logprobs, kth=top - 1, axis=-1)[:, :top]
    return chosen, ids, mx.take_along_axis(logprobs, ids, axis=-1)


def _fill(rows: Sequence[Row], runs: list[Run], picked: tuple[mx.array, ...]) -> None:
    """Give each asking row's run its tokens' logprobs, from `_pick` over those tokens in
    order."""
    chosen, ids, values = (a.tolist() for a in picked)
    at = 0
    for row, run in zip(rows, runs, strict=True):
        if row.logprobs is None:
            continue
        span = range(at, at + len(run.tokens))
        run.logprobs = [chosen[k] for k in span]
        if row.logprobs:
            run.top = [
                sorted(zip(ids[k], values[k], strict=True), key=lambda p: -p[1])[: row.logprobs]
                for k in span
            ]
        at += len(run.tokens)


def _asking(rows: Sequence[Row]) -> int | None:
    """The most top logprobs any row asks for, None if no row asks for logprobs."""
    asks = [row.logprobs for row in rows if row.logprobs is not None]
    return max(asks) if asks else None


def launch(model: CausalLM, cache: list[BatchKVCache], rows: list[Row], inputs: mx.array) -> Launch:
    """Start a plain step: inputs (B,) -> each row's next token, computed asynchronously."""
    with mx.stream(generation_stream()):
        logits = model(inputs[:, None], cache=cache)[:, -1, :]  # (B, V)
        if any(row.processors for row in rows):
            out = []
            for i, row in enumerate(rows):
                x = logits[i : i + 1]
                for processor in row.processors:
                    x = processor(row.history(), x)
                out.append(x)
            logits = mx.concatenate(out)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (B, V)
        tokens = mx.argmax(logprobs, axis=-1)  # (B,)
        if any(row.transform is not None for row in rows):
            tokens = mx.concatenate(
                [
                    tokens[i : i + 1] if row.transform is None else _draw(row, logprobs[i : i + 1])
                    for i, row in enumerate(rows)
                ]
            )
        for i, row in enumerate(rows):
            if row.processors:
                row.seen = mx.concatenate([row.history(), tokens[i : i + 1]])
        top = _asking(rows)
        picked = None if top is None else _pick(logprobs, tokens, top)
        keys = [row.key for row in rows if row.key is not None]
        mx.async_eval(tokens, keys, picked or ())
    return Launch(rows, tokens, picked, time.perf_counter())


def collect(step: Launch) -> list[Run]:
    """A launched step's results, per row."""
    runs = [Run([token]) for token in step.tokens.tolist()]
    if step.picked is not None:
        _fill(step.rows, runs, step.picked)
    return runs


def marginal_token_cost(cost: StepCost, rows: int, draft_s: float) -> float:
    """One more proposed token per row, relative to a plain step: the batch widens by one."""
    plain = cost(rows)
    return (cost(2 * rows) - plain + draft_s) / plain


def plan(rows: Sequence[Row], cost: StepCost, tolerance: float) -> list[int]:
    """How many tokens each row proposes this step: what it wants, within the batch's budget."""
    wants = []
    for row in rows:
        if row.lengths is None:
            wants.append(Want(0))
            continue
        row.lengths.token_cost = marginal_token_cost(cost, len(rows), row.draft_s)
        k = min(row.lengths.next_k(), row.left - 1)  # a run is at most k + 1 tokens
        wants.append(Want(k, row.lengths.rate, row.draft_s))
    width = speculation_width(wants, cost, tolerance)
    return [min(want.k, width) for want in wants]


def _propose(row: Row, k: int) -> tuple[list[int], mx.array | None]:
    if not k:
        return [], None
    tic = time.perf_counter()
    draft, q = row.proposer.propose(row.tokens, k)
    if isinstance(row.proposer, DraftModel):
        seconds = (time.perf_counter() - tic) / k
        row.draft_s = seconds if not row.draft_s else 0.8 * row.draft_s + 0.2 * seconds
    return draft, q


def _processed(logits: mx.array, row: Row, draft: list[int]) -> mx.array:
    """A row's logits (L, V) after its processors, each position seeing the tokens before it
    (padding positions are left as they are: nothing reads them)."""
    if not row.processors:
        return logits
    seen = mx.array(row.tokens + draft, mx.uint32)
    out = []
    for j in range(logits.shape[0]):
        x = logits[j : j + 1]
        if j <= len(draft):
            for processor in row.processors:
                x = processor(seen[: len(row.tokens) + j], x)
        out.append(x)
    return mx.concatenate(out, axis=0)


def speculate(
    model: CausalLM,
    cache: list[BatchKVCache],
    rows: Sequence[Row],
    ks: Sequence[int],
    cost: StepCost,
) -> list[Run]:
    """A synchronous step in which row i proposes up to ks[i] tokens; times its forward pass
    into `cost`. The caller rewinds the cache once it has taken the tokens."""
    with mx.stream(generation_stream()):
        proposals = [_propose(row, k) for row, k in zip(rows, ks, strict=True)]
        width = 1 + max(len(d) for d, _ in proposals)
        inputs = [
            [row.tokens[-1], *d, *[0] * (width - 1 - len(d))]
            for row, (d, _) in zip(rows, proposals, strict=True)
        ]
        tic = time.perf_counter()
        logits = model(mx.array(inputs, mx.uint32), cache=cache)  # (B, W, V)
        if any(row.processors for row in rows):
            logits = mx.stack(
                [
                    _processed(logits[i], row, d)
                    for i, (row, (d, _)) in enumerate(zip(rows, proposals, strict=True))
                ]
            )
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (B, W, V)
        greedy = mx.argmax(logprobs, axis=-1)  # (B, W)
        draws = {
            i: _draw(row, logprobs[i, :1])
            for i, (row, (draft, _)) in enumerate(zip(rows, proposals, strict=True))
            if row.transform is not None and not draft
        }
        mx.eval(greedy, draws, [row.key for row in rows if row.key is not None])
        cost.add(len(rows) * width, time.perf_counter() - tic)
        greedy = greedy.tolist()
        runs = []
        for i, (row, (draft, q)) in enumerate(zip(rows, proposals, strict=True)):
            m = len(draft)
            if row.transform is None:
                choice = greedy[i][: m + 1]
                accept = [c == d for c, d in zip(choice[:m], draft, strict=True)]
            elif draft:
                accept, choice, _ = verify(
                    logits[i, : m + 1], row.tokens, draft, q, (), row.transform
                )
            else:
                accept, choice = [], [draws[i].item()]
            n = accept.index(False) if False in accept else m
            runs.append(Run([*draft[:n], choice[n]], m))
        top = _asking(rows)
        if top is not None:
            where = [
                i * width + j
                for i, (row, run) in enumerate(zip(rows, runs, strict=True))
                if row.logprobs is not None
                for j in range(len(run.tokens))
            ]
            tokens = [
                t
                for row, run in zip(rows, runs, strict=True)
                if row.logprobs is not None
                for t in run.tokens
            ]
            flat = logprobs.reshape(-1, logprobs.shape[-1])[mx.array(where, mx.int32)]
            _fill(rows, runs, _pick(flat, mx.array(tokens, mx.uint32), top))
    for row in rows:
        row.seen = None  # rebuilt from `tokens` when next needed
    return runs


def rewind(cache: list[BatchKVCache], rows: Sequence[Row]) -> None:
    """After a speculative step: each row keeps all its tokens but the last."""
    set_lengths(cache, [len(row.tokens) - 1 for row in rows])
