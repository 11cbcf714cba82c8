"""Continuous batching: one worker decodes every active request in one batched forward pass
per step; a new request joins once its prompt is prefilled, a finished one leaves at once.

API (one thread owns a `BatchGenerator` and makes every call; nothing here is thread-safe)::

    gen = BatchGenerator(model, tokenizer, max_batch=8, prompt_cache=PromptCache())
    rid = gen.add(Request(prompt_ids, GenerationConfig(max_tokens=64, stop=("\\n",)), logprobs=2))
    while gen.has_work:
        for event in gen.step():  # one Event per new token of any request
            event.request_id, event.text, event.finish_reason, event.usage.cached_tokens
    gen.cancel(rid)  # frees its slot at once; no more events for it

- `Request(prompt, config, logprobs)`: prompt token ids (at least one: render and encode chat
  messages before, e.g. with `tokenizer.render_chat` + `encode_prompt`); a `GenerationConfig` (max_tokens >= 1,
  temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, prompt_lookup / max_ngram,
  draft_model / num_draft, prefill_step_size); `logprobs`: None, or report each token's logprob
  plus the `logprobs` most likely tokens. `add` validates (`OptionError`, `GenerationError`).
- `step()` admits queued requests while fewer than `max_batch` run, prefills their prompts
  together (one pass, at most `prefill_step_size` tokens while rows decode, so running
  requests keep streaming), lets the prefilled ones join, advances every row by one token (or
  a verified run of proposed tokens) and returns `Event`s, in order per request. A plain step
  is computed while the next call prepares the one after, so its events come with the next
  call (a speculative step's come at once): call `step()` while `has_work`. A request's last
  event has `finish_reason` "stop" (EOS or a stop string) or "length"; `Event.text` pieces
  join to exactly the text `stream_generate` gives (same detokenizer, stop strings cut).
  `active`: requests decoding; `waiting`: queued or prefilling.
- Greedy requests return what `stream_generate` returns for them alone, whatever runs beside
  them (exactly, but for the float rounding of batched kernels, which could flip a near tie). Sampling: each row has its own sampler and PRNG key (see `batch_step`); a
  seeded request that does not speculate draws the same tokens as `stream_generate` with that
  seed; unseeded rows take their seed from MLX's global generator (`mx.random.seed` fixes it).
- Speculative decoding per request (`prompt_lookup=K` or a `draft_model`) stays exact; the
  batch caps proposals so that requests that do not speculate keep their speed (`batch_spec`).
- `prompt_cache`: finished requests leave their KV entries there; a request that starts the
  same way reuses them (`Usage.cached_tokens`). Share one `PromptCache` across generators.
- `batch_generate(model, tokenizer, prompts, config)`: the same for a list of prompts.

Every forward pass runs on `step.generation_stream()`; wrap a long-running loop in
`step.wired_limit(model)` as `stream_generate` does.
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
from .batch_kv import keep_rows, make_batch_cache, row_cache
from .config import GenerationConfig
from .prompt_cache import PromptCache
from .prompt_prefill import Pending, Prefill
from .reference import wired_limit
from .rows import Launch, Row, Run, collect, launch, plan, rewind, speculate
from .spec_budget import StepCost
from .speculative import make_proposer
from .stops import TextStream

__all__ = ["BatchGenerator", "Event", "Request", "Usage", "batch_generate"]


@dataclass(frozen=True)
class Request:
    prompt: Sequence[int]  # token ids
    config: GenerationConfig = field(default_factory=GenerationConfig)
    logprobs: int | None = None  # None: none; n >= 0: each token's and the n most likely


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


class BatchGenerator:
    """Continuous batching of requests over one model (see the module docstring)."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        prompt_cache: PromptCache | None = None,
        prefill_step_size: int = 512,
        cost: StepCost | None = None,
        tolerance: float = 0.05,
    ):
        if max_batch < 1:
            raise OptionError("max_batch", f"must be >= 1, got {max_batch}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max_batch
        self.prompt_cache = prompt_cache
        self.prefill_step_size = prefill_step_size  # prompt tokens per step while rows decode
        self.cost = cost or StepCost()  # forward-pass times, for the speculation budget
        self.tolerance = tolerance  # the slowdown speculation may cost the other rows
        self.cache = make_batch_cache(model)
        self.rows: list[Row] = []  # in the order of the cache's rows
        self.queue: deque[Pending] = deque()  # not yet admitted
        self.prefill = Prefill(model, self.cost)  # admitted, prefilling
        self.inflight: Launch | None = None  # the plain step being computed
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
        config = request.config
        if isinstance(config.stop, str):
            config = replace(config, stop=(config.stop,))
        config.validate()
        if config.max_tokens < 1:
            raise OptionError("max_tokens", f"must be >= 1, got {config.max_tokens}")
        if request.logprobs is not None and request.logprobs < 0:
            raise OptionError("logprobs", f"must be >= 0, got {request.logprobs}")
        prompt = [int(t) for t in request.prompt]
        if not prompt:
            raise GenerationError("the prompt is empty: give at least one token")
        if config.draft_model is not None:
            make_proposer(self.model, config, None)  # checks the vocabularies
        rid = next(self._ids)
        self.queue.append(Pending(rid, prompt, config, request.logprobs))
        return rid

    def cancel(self, request_id: int) -> bool:
        """Drop a request (queued or running) at once; False if it is not here (finished)."""
        for row in self.rows:
            if row.id == request_id:
                self._leave([row], keep=False)
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
        of a plain step come with the next call (it is computed while that call prepares the
        following one); a speculative step's come at once."""
        self._prefill()
        events: list[Event] = []
        if self.rows and any(plan(self.rows, self.cost, self.tolerance)):
            events += self._collect()  # proposals need every token: finish the step in flight
            ks = plan(self.rows, self.cost, self.tolerance)
            if any(ks):
                rows = list(self.rows)
                runs = speculate(self.model, self.cache, rows, ks, self.cost)
                self._idle_since = time.perf_counter()
                events += self._emit(rows, runs)
                rewind(self.cache, self.rows)
                return events
        launched = self._launch() if self.rows else None
        events += self._collect()
        self.inflight = launched
        return events

    def _launch(self) -> Launch:
        """Start a plain step; a row's input is its token of the step in flight, if any."""
        prev = self.inflight
        if prev is None:
            inputs = mx.array([row.tokens[-1] for row in self.rows], mx.uint32)
        elif prev.rows == self.rows:
            inputs = prev.tokens
        else:
            where = {id(row): j for j, row in enumerate(prev.rows)}
            inputs = mx.concatenate(
                [
                    prev.tokens[where[id(row)]][None]
                    if id(row) in where
                    else mx.array([row.tokens[-1]], mx.uint32)
                    for row in self.rows
                ]
            )
        return launch(self.model, self.cache, list(self.rows), inputs)

    def _wait(self) -> None:
        """Wait for the step in flight, noting when it was done (for its timing)."""
        if self.inflight is not None and self.inflight.done_at is None:
            mx.eval(self.inflight.tokens)
            self.inflight.done_at = time.perf_counter()

    def _collect(self) -> list[Event]:
        """The events of the step in flight, once computed."""
        if self.inflight is None:
            return []
        self._wait()
        step, self.inflight = self.inflight, None
        # it could start once the work before it was done, and once it was launched
        self.cost.add(len(step.rows), step.done_at - max(step.started, self._idle_since))
        self._idle_since = max(self._idle_since, step.done_at)
        return self._emit(step.rows, collect(step))

    def _emit(self, rows: list[Row], runs: list[Run]) -> list[Event]:
        """Text and finish reasons for each row's new tokens; finished rows leave."""
        events, finished = [], []
        for row, run in zip(rows, runs, strict=True):
            if row.done:  # cancelled or finished while this step was computed
                continue
            accepted = len(run.tokens) - 1
            for j, token in enumerate(run.tokens):
                piece, finish = row.text.add(token)
                row.tokens.append(token)
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
                        j < accepted,
                    )
                )
                if finish:
                    finished.append(row)
                    break
            if row.lengths is not None:
                row.lengths.observe(run.proposed, accepted)
        if finished:
            self._leave(finished, keep=True)
        return events

    def _prefill(self) -> None:
        """Admit queued requests while the batch has room, feed the prompts one pass (at most
        `prefill_step_size` tokens while rows decode), and let the ones done join."""
        while self.queue and len(self.rows) + len(self.prefill) < self.max_batch:
            p = self.queue.popleft()
            cache = None
            if self.prompt_cache is not None:
                p.cached, cache = self.prompt_cache.fetch(p.prompt)
                p.fed = p.cached
            self.prefill.add(p, cache)
        if self.prefill.todo:
            self._wait()  # so that the pass's time is its own
            per_row = self.prefill_step_size
            if self.rows:  # share the budget: the rows decoding wait for this pass
                per_row = max(1, per_row // len(self.prefill))
            self.prefill.feed(per_row)
            self._idle_since = time.perf_counter()
        for p in self.prefill.take_done(self.cache):
            text = TextStream(
                self.tokenizer.detokenizer,
                p.config.stop,
                self.tokenizer.eos_token_ids,
                p.config.max_tokens,
            )
            self.rows.append(
                Row.start(p.id, self.model, p.prompt, p.config, text, p.cached, p.logprobs)
            )

    def _leave(self, rows: list[Row], keep: bool) -> None:
        """Remove rows from the batch; with `keep`, their KV entries (all their tokens but the
        last) go to the prompt cache."""
        index = {id(row): i for i, row in enumerate(self.rows)}
        for row in rows:
            row.done = True
            if keep and self.prompt_cache is not None:
                layers = row_cache(self.cache, index[id(row)], len(row.tokens) - 1)
                mx.eval(layers)
                self.prompt_cache.insert(row.tokens[:-1], layers)
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
