"""The scheduler: continuous batching of rows, the one decoding loop of elm. A request is a row;
one step advances every row by one forward pass; a new request joins once its prompt is
prefilled, a finished one leaves at once. `stream_generate` and `ChatSession` are a batch of
one on it, `batch_generate` and `elm serve` batches of many.

API (one thread owns a `BatchGenerator` and makes every call; nothing here is thread-safe)::

    gen = BatchGenerator(model, tokenizer, max_batch=8, prompt_cache=PromptCache())
    rid = gen.add(Request(prompt_ids, GenerationConfig(max_tokens=64, stop=("\\n",)), logprobs=2))
    while gen.has_work:
        for event in gen.step():  # one Event per new token of any request
            event.request_id, event.text, event.finish_reason, event.usage.cached_tokens
    gen.cancel(rid)  # frees its slot at once; no more events for it

- `Request(prompt, config, logprobs, keep_logprobs)`: prompt token ids (render and encode chat
  messages before, e.g. with `tokenizer.render_chat` + `encode_prompt`); a `GenerationConfig`,
  checked by its `normalized()`; `logprobs`: None, or report each token's logprob plus the
  `logprobs` most likely tokens; `keep_logprobs`: hand out each token's logprobs over the
  vocabulary (`Event.distribution`). `add` validates (`OptionError`, `GenerationError`).
- `step()` admits queued requests while fewer than `max_batch` run, prefills their prompts
  together (one pass, each request's `prefill_step_size` tokens; while rows decode, passes take
  at most `prefill.share` of the decoding time, so that one long prompt cannot stall running
  requests: `prompt_prefill`), lets the prefilled ones join, advances every row by one
  token (or a verified run of proposed tokens: see `rows`) and returns `Event`s, in order per
  request. A step without proposals is computed while the next call prepares the one after
  (constrained rows included: see `rows`), so its events come with the next call: call
  `step()` while `has_work`. A request's last event has `finish_reason` "stop" (EOS, a stop
  string, or its constraint complete) or "length".
- A request's tokens do not depend on what runs beside it: greedy rows take the argmax, sampling
  rows draw with noise keyed by their seed and the position (`sampling.choose`), and
  speculation keeps only the tokens the row would have chosen anyway (exactly, but for the float
  rounding of batched kernels, which could flip a near tie). Unseeded rows take their seed from
  MLX's global generator (`mx.random.seed` fixes it).
- Speculative decoding per request (`prompt_lookup=K` or a `draft_model`): the batch caps
  proposals so that requests that do not speculate keep their speed (`spec_budget`).
- `prompt_cache`: finished requests leave their KV entries there; a request that starts the
  same way reuses them (`Usage.cached_tokens`).
- `prefill=PrefillPolicy(share=0.5, bound_idle=False)`: while rows decode, prompt prefill
  takes at most `share` of their time; `bound_idle` (a server) bounds passes while nothing
  decodes too, for requests that arrive meanwhile (`prompt_prefill`).

Every forward pass runs on `reference.generation_stream()`; wrap a long-running loop in
`reference.wired_limit(model)` as the front-ends do.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import count

import mlx.core as mx

from ..errors import GenerationError, OptionError
from ..models import CausalLM
from ..tokenizer import Tokenizer, encode_prompt
from .batch_kv import KVConfig, keep_rows, make_batch_cache, row_cache
from .config import GenerationConfig, check_prompt
from .prompt_cache import PromptCache
from .prompt_prefill import Pending, Prefill, PrefillPolicy
from .reference import wired_limit
from .rows import Launch, Row, Run, collect, decide, launch, plan, propose, rewind
from .spec_budget import StepCost
from .speculative import SpeculativeStats, check_draft

__all__ = ["BatchGenerator", "Event", "Request", "Usage", "batch_generate"]


@dataclass(frozen=True)
class Request:
    prompt: Sequence[int]  # token ids
    config: GenerationConfig = field(default_factory=GenerationConfig)
    logprobs: int | None = None  # None: none; n >= 0: each token's and the n most likely
    keep_logprobs: bool = False  # each token's logprobs over the vocabulary in its Event


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV entries came from the prompt cache
    completion_tokens: int


@dataclass(frozen=True)
class Event:
    """One new token of one request."""

    request_id: int
    token: int
    text: str  # the text this token releases (may be empty: held back, or EOS)
    finish_reason: str | None  # "stop" | "length" | None
    usage: Usage
    logprob: float | None = None  # the model's, after the logits processors
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first
    from_draft: bool = False  # a proposed token that the model accepted
    distribution: mx.array | None = None  # (V,) the model's logprobs here, if kept
    speculative: SpeculativeStats | None = None  # the request's counts so far (a copy)


class BatchGenerator:
    """Continuous batching of requests over one model (see the module docstring)."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        prompt_cache: PromptCache | None = None,
        cost: StepCost | None = None,
        tolerance: float = 0.05,
        kv: KVConfig | None = None,
        prefill: PrefillPolicy | None = None,
    ):
        if max_batch < 1:
            raise OptionError("max_batch", f"must be >= 1, got {max_batch}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max_batch
        self.prompt_cache = prompt_cache
        self.cost = cost or StepCost()  # forward-pass times, for the speculation budget
        self.tolerance = tolerance  # the slowdown speculation may cost the other rows
        self.kv = kv or KVConfig()  # also what prompt-cache entries are matched on
        self.cache = make_batch_cache(model, kv)  # quantized or windowed as `kv` says
        self.rows: list[Row] = []  # in the order of the cache's rows
        self.queue: deque[Pending] = deque()  # not yet admitted
        self.prefill = Prefill(model, self.cost, kv, prefill)  # admitted, prefilling
        self.inflight: Launch | None = None  # the step being computed
        self._idle_since = 0.0  # when the work before the current launch was last seen done
        self._ids = count()

    @property
    def has_work(self) -> bool:
        return bool(self.rows or self.queue or self.prefill or self.inflight)

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def waiting(self) -> int:
        """Requests not decoding yet: queued or prefilling."""
        return len(self.queue) + len(self.prefill)

    def add(self, request: Request) -> int:
        """Queue a request; returns its id (the `Event.request_id` of its tokens)."""
        config = request.config.normalized()
        if request.logprobs is not None and request.logprobs < 0:
            raise OptionError("logprobs", f"must be >= 0, got {request.logprobs}")
        prompt = check_prompt(request.prompt)
        check_draft(self.model, config)
        rid = next(self._ids)
        self.queue.append(Pending(rid, prompt, config, request.logprobs, request.keep_logprobs))
        return rid

    def cancel(self, request_id: int, keep: bool = False) -> bool:
        """Drop a request (queued or running) at once; False if it is not here (finished).
        With `keep`, a running request's KV entries go to the prompt cache as when it ends."""
        for row in self.rows:
            if row.id == request_id:
                self._leave([row], keep=keep)
                return True
        for p in self.queue:
            if p.id == request_id:
                self.queue.remove(p)
                return True
        for p in self.prefill.items:
            if p.id == request_id:
                self.prefill.remove([p])
                return True
        return False

    def step(self) -> list[Event]:
        """Prefill a little, let prefilled requests join, advance every row once. The events
        of a step without proposals come with the next call (it is computed while that call
        prepares the following one); those of a step with proposals come at once."""
        self._prefill()
        if not self.rows:
            return self._collect()
        if any(plan(self.rows, self.cost, self.tolerance)):
            return self._speculative_step()
        # the next pass starts on the tokens in flight; constrained rows read their masks once
        # those tokens are collected (their matchers advanced), while it runs
        launched = self._launch([[] for _ in self.rows])
        events = self._collect()
        decide(launched)
        self.inflight = launched
        return events

    def _speculative_step(self) -> list[Event]:
        """A step with proposals: they need every token so far, so the step in flight is
        finished first, and this one is collected and rewound at once."""
        events = self._collect()
        if not self.rows:
            return events
        ks = plan(self.rows, self.cost, self.tolerance)
        drafts = [propose(row, k) for row, k in zip(self.rows, ks, strict=True)]
        step = self.inflight = self._launch(drafts)
        decide(step)
        events += self._collect()
        if step.speculative:
            rewind(self.cache, self.rows)
        return events

    def _launch(self, drafts: list[list[int]]) -> Launch:
        """Start a step; a row's first input is its token of the step in flight, if any."""
        prev = self.inflight
        if prev is None:
            first = mx.array([row.tokens[-1] for row in self.rows], mx.uint32)
        elif prev.rows == self.rows:
            first = prev.choice[:, 0]
        else:
            where = {id(row): j for j, row in enumerate(prev.rows)}
            first = mx.concatenate(
                [
                    prev.choice[where[id(row)], :1]
                    if id(row) in where
                    else mx.array([row.tokens[-1]], mx.uint32)
                    for row in self.rows
                ]
            )
        return launch(self.model, self.cache, list(self.rows), first, drafts)

    def _collect(self) -> list[Event]:
        """The events of the step in flight, once computed."""
        step, self.inflight = self.inflight, None
        if step is None:
            return []
        runs = collect(step)  # waits for it
        step.done_at = time.perf_counter()
        # it could start once the work before it was done, and once it was launched
        seconds = step.done_at - max(step.started, self._idle_since)
        width = step.choice.shape[1]
        self.cost.add(len(step.rows) * width, seconds)
        self.prefill.earn(self.cost.charge(len(step.rows) * width, seconds))
        self._idle_since = max(self._idle_since, step.done_at)
        return self._emit(step.rows, runs, seconds)

    def _emit(self, rows: list[Row], runs: list[Run], seconds: float) -> list[Event]:
        """Text and finish reasons for each row's new tokens; finished rows leave."""
        events, finished = [], []
        for row, run in zip(rows, runs, strict=True):
            if row.done:  # cancelled or finished while this step was computed
                continue
            kept = len(run.tokens) - 1
            if row.lengths is not None:
                row.lengths.observe(run.proposed, kept)
            if row.stats is not None:
                row.stats.count(run.proposed, kept, seconds)
            for j, token in enumerate(run.tokens):
                piece, finish = row.text.add(token)
                row.tokens.append(token)
                if row.constraint is not None:
                    row.constraint.advance(token)
                    if finish is None and row.constraint.done:
                        piece, finish = piece + row.text.end(), "stop"
                usage = Usage(row.prompt_tokens, row.cached_tokens, row.text.count)
                events.append(
                    Event(
                        row.id,
                        token,
                        piece,
                        finish,
                        usage,
                        run.logprobs[j] if run.logprobs else None,
                        tuple(run.top[j]) if run.top else (),
                        j < kept,
                        run.distributions[j] if run.distributions else None,
                        replace(row.stats) if row.stats is not None else None,
                    )
                )
                if finish:
                    finished.append(row)
                    break
        if finished:
            self._leave(finished, keep=True)
        return events

    def _prefill(self) -> None:
        """Admit queued requests while the batch has room, feed the prompts one pass (each its
        `prefill_step_size`, or what the decode steps' credit pays for while rows decode), and
        let the ones done join."""
        if not self.queue and not self.prefill:  # (every decode step asks)
            return
        while self.queue and len(self.rows) + len(self.prefill) < self.max_batch:
            p = self.queue.popleft()
            cache = None
            if self.prompt_cache is not None:
                p.cached, cache = self.prompt_cache.fetch(p.prompt, self.kv)
                p.fed = p.cached
            self.prefill.add(p, cache)
        self._join()  # (prompts found whole in the prompt cache): they decode beside a pass
        decoding = bool(self.rows)  # then the pass is paid from their credit
        widths = self.prefill.plan(decoding)
        if widths is not None:
            if self.inflight is not None:  # so that the pass's time is its own
                mx.eval(self.inflight.choice)
            self.prefill.feed(widths, paid=decoding)
            self._idle_since = time.perf_counter()
        self._join()

    def _join(self) -> None:
        """The prompts prefilled start decoding."""
        for p in self.prefill.take_done(self.cache):
            self.rows.append(
                Row.start(
                    p.id,
                    self.model,
                    self.tokenizer,
                    p.prompt,
                    p.config,
                    p.cached,
                    p.logprobs,
                    p.keep_logprobs,
                )
            )

    def _leave(self, rows: list[Row], keep: bool) -> None:
        """Remove rows from the batch; with `keep`, their KV entries (all their tokens but the
        last) go to the prompt cache."""
        index = {id(row): i for i, row in enumerate(self.rows)}
        for row in rows:
            row.done = True
            if keep and self.prompt_cache is not None:
                held = len(row.tokens) - 1  # the last token is the next input, never fed
                entry = row_cache(self.cache, index[id(row)], held)
                if entry is not None:  # (None: a windowed cache dropped too many)
                    layers, start = entry
                    mx.eval(layers)
                    self.prompt_cache.insert(row.tokens[:held], layers, self.kv, start)
        stay = [i for i, row in enumerate(self.rows) if not row.done]
        keep_rows(self.cache, stay)
        self.rows = [self.rows[i] for i in stay]


def batch_generate(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    config: GenerationConfig | Sequence[GenerationConfig] | None = None,
    max_batch: int = 8,
    prompt_cache: PromptCache | None = None,
) -> list[str]:
    """The generated text of each prompt (strings are encoded as `generate` does), decoded in
    batches of up to `max_batch`; `config`: one for all prompts or one per prompt."""
    if config is None or isinstance(config, GenerationConfig):
        configs = [config or GenerationConfig()] * len(prompts)
    else:
        configs = list(config)
        if len(configs) != len(prompts):
            raise GenerationError(f"{len(prompts)} prompts but {len(configs)} configs")
    gen = BatchGenerator(model, tokenizer, max_batch=max_batch, prompt_cache=prompt_cache)
    ids = []
    for prompt, c in zip(prompts, configs, strict=True):
        tokens = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else prompt
        ids.append(gen.add(Request(tokens, c)))
    pieces: dict[int, list[str]] = {rid: [] for rid in ids}
    with wired_limit(model):
        while gen.has_work:
            for event in gen.step():
                pieces[event.request_id].append(event.text)
    return ["".join(pieces[rid]) for rid in ids]
