"""The rows of the scheduler and the one step that advances them.

A row is one request's decoding state, and owns everything that is per request: its options,
its token choice (greedy, or sampling keyed by its seed and the position), its logits
processors, its constraint, its proposer and proposal length, its statistics. A row's cache
entries hold all its tokens but the last, which is its next input (as after `prefill`).

One step feeds every row its next input and its proposal, if it has one, padded to the longest:
(B, 1 + w). `launch` starts its forward pass, and `decide` builds each row's logits after its
processors and constraint, its logprobs, and the token it chooses at each position (lazily). `collect` reads the choices back and keeps, per row, the proposed tokens that
equal the model's choices, then the first choice that differs (`speculative.accepted`). With no
proposals (w = 0) a step's only input per row is the token the previous step chose, so the
scheduler launches step t + 1 before it collects step t: building one step overlaps computing
the other, as in `generate_step`. A constrained row's mask for step t + 1 needs token t, so
that step's choice waits until token t is collected and its matcher advanced, while the
forward pass of t + 1 runs (the mask is computed meanwhile, then applied before the choice).
After a step with proposals each row is rewound to its tokens (`rewind`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from ..models import CausalLM, vocab_size
from .batch_kv import BatchKVCache, set_lengths
from .config import GenerationConfig
from .draft import DraftModel
from .lookup import PromptLookup
from .reference import generation_stream
from .sampling import Constraint, LogitsProcessor, Transform, choose
from .spec_budget import RowLength, StepCost, Want, speculation_width
from .speculative import SpeculativeStats, accepted, make_proposer
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
    keep_logprobs: bool = False  # hand out each token's logprobs over the vocabulary (V,)
    transform: Transform | None = None  # None: greedy
    seed: int = 0  # keys the sampling noise of each position
    processors: list[LogitsProcessor] = field(default_factory=list)
    constraint: Constraint | None = None
    seen: mx.array | None = None  # `tokens` plus the token in flight, for the processors
    length: int = 0  # len(tokens) plus the token in flight: the position chosen next
    proposer: PromptLookup | DraftModel | None = None
    lengths: RowLength | None = None
    draft_s: float = 0.0  # running seconds per drafted token
    stats: SpeculativeStats | None = None
    done: bool = False

    @classmethod
    def start(
        cls,
        rid: int,
        model: CausalLM,
        tokenizer,
        prompt: list[int],
        config: GenerationConfig,
        cached_tokens: int = 0,
        logprobs: int | None = None,
        keep_logprobs: bool = False,
    ) -> Row:
        """A row about to join, with its sampler, seed, constraint and proposer."""
        text = TextStream(
            tokenizer.detokenizer, config.stop, tokenizer.eos_token_ids, config.max_tokens
        )
        row = cls(rid, config, list(prompt), text, len(prompt), cached_tokens, logprobs)
        row.keep_logprobs = keep_logprobs
        row.length = len(prompt)
        row.transform = config.transform()
        if row.transform is not None:
            # unseeded: from the global generator, so that `mx.random.seed` fixes a whole run
            seed = config.seed
            row.seed = mx.random.randint(0, 2**31 - 1, ()).item() if seed is None else seed
        row.processors = config.logits_processors()
        if config.constraint is not None:
            row.constraint = config.constraint.build(tokenizer, vocab_size(model))
        if config.speculative:
            row.proposer, solo = make_proposer(model, config, row.pick)
            row.lengths = RowLength(solo.max_k, solo.probe_budget)
            row.stats = SpeculativeStats()
            with mx.stream(generation_stream()):
                row.proposer.start(row.tokens)
        return row

    @property
    def left(self) -> int:
        return self.config.max_tokens - self.text.count

    def pick(self, logprobs: mx.array, start: int) -> mx.array:
        """The tokens (W,) this row chooses at positions start, ... from logprobs (W, V)."""
        return choose(logprobs, self.transform, self.seed, start)

    def history(self) -> mx.array:
        return self.seen if self.seen is not None else mx.array(self.tokens, mx.uint32)

    def processed(self, logits: mx.array, draft: list[int], masks: mx.array | None) -> mx.array:
        """The row's logits (W, V) after its processors and constraint, position j seeing the
        tokens before it (padding positions are left as they are: nothing reads them)."""
        if not self.processors and masks is None:
            return logits
        history = self.history()
        if draft:
            history = mx.concatenate([history, mx.array(draft, mx.uint32)])
        base = history.size - len(draft)
        out = []
        for j in range(logits.shape[0]):
            x = logits[j : j + 1]
            if j <= len(draft):
                for processor in self.processors:
                    x = processor(history[: base + j], x)
                if masks is not None and j < masks.shape[0]:
                    x = mx.where(masks[j], x, -mx.inf)
            out.append(x)
        return mx.concatenate(out, axis=0)

    def constrain(self, draft: list[int]) -> tuple[list[int], mx.array | None]:
        """The constraint's masks (m + 1, V) at the next input's position and after each draft
        token, the draft cut at its first token the constraint does not allow."""
        if self.constraint is None:
            return draft, None
        masks, kept = [self.constraint.mask()], 0
        for token in draft:
            if not masks[-1][token].item():
                break
            self.constraint.advance(token)
            kept += 1
            masks.append(self.constraint.mask())
        self.constraint.rollback(kept)
        return draft[:kept], mx.stack(masks)


@dataclass
class Run:
    """What a step gives one row: `tokens` to emit in order (its accepted proposal, then one
    chosen token), how many were proposed, and logprobs per token if the row asked."""

    tokens: list[int]
    proposed: int = 0
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None  # per token: (id, logprob), best first
    distributions: list[mx.array] | None = None  # per token: logprobs (V,), if kept


@dataclass
class Launch:
    """A step being computed: its forward pass, then (`decide`) each row's choice."""

    rows: list[Row]
    drafts: list[list[int]]
    logits: mx.array  # (B, W, V) the model's
    masks: list[mx.array | None]  # per row: its constraint's masks (m + 1, V), once read
    started: float  # when it was launched
    choice: mx.array | None = None  # (B, W) each row's token at each position
    logprobs: mx.array | None = None  # (B, W, V)
    picked: tuple[mx.array, mx.array, mx.array] | None = None  # see `_pick`
    done_at: float | None = None  # when its results were found computed

    @property
    def speculative(self) -> bool:
        return any(self.drafts)


def _pick(logprobs: mx.array, tokens: mx.array, top: int) -> tuple[mx.array, mx.array, mx.array]:
    """logprobs (..., V) and tokens (...) -> each token's logprob (...), and the ids (..., top)
    and logprobs (..., top) of the `top` most likely tokens (unordered)."""
    chosen = mx.take_along_axis(logprobs, tokens[..., None].astype(mx.int32), axis=-1)[..., 0]
    if not top:
        empty = mx.zeros((*tokens.shape, 0))
        return chosen, empty.astype(mx.int32), empty
    ids = mx.argpartition(-logprobs, kth=top - 1, axis=-1)[..., :top]
    return chosen, ids, mx.take_along_axis(logprobs, ids, axis=-1)


def _asking(rows: Sequence[Row]) -> int | None:
    """The most top logprobs any row asks for, None if no row asks for logprobs."""
    asks = [row.logprobs for row in rows if row.logprobs is not None]
    return max(asks) if asks else None


def launch(
    model: CausalLM,
    cache: list[BatchKVCache],
    rows: list[Row],
    first: mx.array,
    drafts: list[list[int]],
) -> Launch:
    """Start a step: the forward pass of each row's next input first (B,) (possibly still being
    computed), then its draft, padded to the longest. The choices follow at once (`decide`),
    unless a constrained row without a proposal waits for its mask, which needs the token in
    flight: then only the pass is started, and the caller decides once that token is known."""
    masks: list[mx.array | None] = [None] * len(rows)
    for i, row in enumerate(rows):
        if drafts[i]:  # a proposal is cut where its constraint refuses it: before the pass
            drafts[i], masks[i] = row.constrain(drafts[i])
    width = 1 + max(map(len, drafts), default=0)
    with mx.stream(generation_stream()):
        inputs = first[:, None]  # (B, 1)
        if width > 1:
            rest = [d + [0] * (width - 1 - len(d)) for d in drafts]
            inputs = mx.concatenate([inputs, mx.array(rest, mx.uint32)], axis=1)  # (B, W)
        logits = model(inputs, cache=cache)  # (B, W, V)
    step = Launch(rows, drafts, logits, masks, time.perf_counter())
    if any(row.constraint is not None and m is None for row, m in zip(rows, masks, strict=True)):
        mx.async_eval(logits)  # the pass runs while the token in flight is handled
    else:
        decide(step)
        mx.async_eval(step.choice, step.picked or ())
    return step


def decide(step: Launch) -> None:
    """Each row's logits after its processors and constraint, its logprobs, and the token it
    chooses at each position, as a lazy graph (once per step): `launch` starts it at once; a
    step decided later is computed with the next step's pass or when collected (on the CPU
    backend evaluating it at once would wait for its pass). A constrained row's mask is read
    here: its matcher must have every token before the step's (finished rows skip)."""
    if step.choice is not None:
        return
    rows, masks = step.rows, step.masks
    for i, row in enumerate(rows):
        if masks[i] is None and row.constraint is not None and not row.done:
            masks[i] = row.constrain([])[1]
    with mx.stream(generation_stream()):
        logits = step.logits
        if any(row.processors or m is not None for row, m in zip(rows, masks, strict=True)):
            logits = mx.stack(
                [row.processed(logits[i], step.drafts[i], masks[i]) for i, row in enumerate(rows)]
            )
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (B, W, V)
        choice = mx.argmax(logprobs, axis=-1)  # (B, W): the greedy rows' choice
        if any(row.transform is not None for row in rows):
            choice = mx.stack(
                [
                    choice[i] if row.transform is None else row.pick(logprobs[i], row.length)
                    for i, row in enumerate(rows)
                ]
            )
        if choice.shape[1] == 1:  # the choice is in flight: the next step's processors see it
            for i, row in enumerate(rows):
                row.length += 1
                if row.processors:
                    row.seen = mx.concatenate([row.history(), choice[i]])
        top = _asking(rows)
        picked = None if top is None else _pick(logprobs, choice, top)
    step.choice, step.logprobs, step.picked = choice, logprobs, picked


def collect(step: Launch) -> list[Run]:
    """A launched step's results, per row: the accepted drafts, then the model's next choice."""
    choices = step.choice.tolist()
    picked = [a.tolist() for a in step.picked] if step.picked is not None else None
    runs = []
    for i, (row, draft, choice) in enumerate(zip(step.rows, step.drafts, choices, strict=True)):
        n = accepted(draft, choice)
        run = Run(choice[: n + 1], len(draft))
        if picked is not None and row.logprobs is not None:
            chosen, ids, values = (p[i] for p in picked)
            run.logprobs = chosen[: n + 1]
            if row.logprobs:
                run.top = [
                    sorted(zip(ids[j], values[j], strict=True), key=lambda p: -p[1])[: row.logprobs]
                    for j in range(n + 1)
                ]
        if row.keep_logprobs:
            run.distributions = [step.logprobs[i, j] for j in range(n + 1)]
        runs.append(run)
    if step.speculative:
        for row in step.rows:
            row.seen = None  # rebuilt from `tokens` when next needed
    return runs


def marginal_token_cost(cost: StepCost, rows: int, draft_s: float) -> float:
    """One more proposed token per row, relative to a plain step: the batch widens by one."""
    plain = cost(rows)
    return (cost(2 * rows) - plain + draft_s) / plain


def plan(rows: Sequence[Row], cost: StepCost, tolerance: float) -> list[int]:
    """How many tokens each row proposes this step: what it wants, within the batch's budget."""
    if all(row.lengths is None for row in rows):  # nobody speculates: nothing to weigh
        return [0] * len(rows)
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


def propose(row: Row, k: int) -> list[int]:
    """Up to k proposed tokens of a row (its tokens are all known: nothing is in flight)."""
    if not k:
        return []
    tic = time.perf_counter()
    with mx.stream(generation_stream()):
        draft, _ = row.proposer.propose(row.tokens, k)
    if isinstance(row.proposer, DraftModel):
        seconds = (time.perf_counter() - tic) / k
        row.draft_s = seconds if not row.draft_s else 0.8 * row.draft_s + 0.2 * seconds
    return draft


def rewind(cache: list[BatchKVCache], rows: Sequence[Row]) -> None:
    """After a step with proposals: each row keeps all its tokens but the last."""
    for row in rows:
        row.length = len(row.tokens)
    set_lengths(cache, [len(row.tokens) - 1 for row in rows])
