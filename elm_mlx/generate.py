"""Generation in three layers: `generate_step` (token ids) -> `stream_generate` (text pieces)
-> `generate` (a string)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import mlx.core as mx

from .errors import GenerationError
from .models import CausalLM, KVCache, make_cache
from .sample import LogitsProcessor, Sampler, make_logits_processors, make_sampler
from .tokenizer import Tokenizer, encode_prompt

if TYPE_CHECKING:
    from .speculative import SpeculativeStats


@dataclass(frozen=True)
class GenerationConfig:
    """Every generation option and its default, in one place (the CLI fills it too)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    prefill_step_size: int = 512
    # speculative decoding: prompt lookup (n-gram) or a draft model
    prompt_lookup: int | None = None
    max_ngram: int = 3
    draft_model: CausalLM | None = field(default=None, compare=False, repr=False)
    num_draft: int = 4

    def validate(self) -> None:
        if self.max_tokens < 0:
            raise GenerationError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p < 1.0:
            raise GenerationError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.prefill_step_size < 1:
            raise GenerationError("prefill_step_size must be >= 1")

    @property
    def speculative(self) -> bool:
        return bool(self.prompt_lookup) or self.draft_model is not None

    def sampler(self) -> Sampler:
        return make_sampler(self.temperature, self.top_p, self.top_k, self.min_p)

    def logits_processors(self) -> list[LogitsProcessor]:
        return make_logits_processors(self.repetition_penalty)


@dataclass
class GenerationResponse:
    """One new token, its text piece, and running statistics."""

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length" | None
    from_draft: bool = False
    speculative: SpeculativeStats | None = None  # running totals, shared by all responses


def prefill(
    model: CausalLM, tokens: mx.array, cache: list[KVCache], step_size: int = 512
) -> mx.array:
    """Run all but the last token through the model in chunks, filling the cache.
    Returns the tokens still to be fed (at least one)."""
    while tokens.size > 1:
        n = min(step_size, tokens.size - 1)
        model(tokens[None, :n], cache=cache)
        mx.eval([c.state for c in cache])
        tokens = tokens[n:]
    return tokens


def generate_step(
    prompt: mx.array,
    model: CausalLM,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    prompt_cache: list[KVCache] | None = None,
    prefill_step_size: int = 512,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs (V,)) for each new token; the cache is filled in place.

    The next token is computed asynchronously while the caller handles the current one.
    """
    if prompt.size == 0:
        raise GenerationError("the prompt is empty: give at least one token")
    sampler = sampler or make_sampler()
    cache = prompt_cache if prompt_cache is not None else make_cache(model)
    tokens = prompt if logits_processors else None

    def step(y: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal tokens
        logits = model(y[None], cache=cache)[:, -1, :]  # (1, V)
        if logits_processors:
            for processor in logits_processors:
                logits = processor(tokens, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        y = sampler(logprobs)
        if logits_processors:
            tokens = mx.concatenate([tokens, y])
        return y, logprobs.squeeze(0)

    y = prefill(model, prompt, cache, prefill_step_size)
    y, logprobs = step(y)
    mx.async_eval(y, logprobs)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y, next_logprobs)
        yield y.item(), logprobs
        if n + 1 < max_tokens:
            y, logprobs = next_y, next_logprobs


class StopMatcher:
    """Finds stop strings in streamed text, holding back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add a piece; return (text safe to emit now, whether a stop string was hit)."""
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.text[self.emitted : min(hits)]
            self.emitted = len(self.text)
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted : end], end
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out


def _token_stream(
    prompt: mx.array,
    model: CausalLM,
    config: GenerationConfig,
    cache: list[KVCache],
    stats: SpeculativeStats | None = None,
    history: Sequence[int] = (),
) -> Iterator[tuple[int, bool]]:
    """(token, came from a proposal) pairs, from plain or speculative decoding."""
    if config.speculative:
        from .speculative import speculative_generate_step

        yield from speculative_generate_step(prompt, model, config, cache, stats, history=history)
        return
    for token, _ in generate_step(
        prompt,
        model,
        max_tokens=config.max_tokens,
        sampler=config.sampler(),
        logits_processors=config.logits_processors(),
        prompt_cache=cache,
        prefill_step_size=config.prefill_step_size,
    ):
        yield token, False


def stream_generate(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int] | mx.array,
    config: GenerationConfig | None = None,
    prompt_cache: list[KVCache] | None = None,
    history: Sequence[int] = (),
    **options,
) -> Iterator[GenerationResponse]:
    """Yield one `GenerationResponse` per new token. `options` are `GenerationConfig` fields
    (max_tokens=, temperature=, top_p=, top_k=, min_p=, repetition_penalty=, seed=, stop=,
    prompt_lookup=, max_ngram=, draft_model=, num_draft=). `history`: the tokens that
    `prompt_cache` already holds before `prompt`; speculative decoding proposes from them too."""
    try:
        config = replace(config or GenerationConfig(), **options)
    except TypeError as e:
        raise GenerationError(f"unknown generation option: {e}") from e
    if isinstance(config.stop, str):
        config = replace(config, stop=(config.stop,))
    config.validate()
    if config.seed is not None:
        mx.random.seed(config.seed)
    if isinstance(prompt, str):
        prompt = encode_prompt(tokenizer, prompt)
    if not isinstance(prompt, mx.array):
        prompt = mx.array(list(prompt), dtype=mx.uint32)
    cache = prompt_cache if prompt_cache is not None else make_cache(model)
    if history and cache[0].offset != len(history):
        raise GenerationError(
            f"history has {len(history)} tokens but the cache holds {cache[0].offset}"
        )
    stats = None
    if config.speculative:
        from .speculative import SpeculativeStats

        stats = SpeculativeStats()

    detokenizer = tokenizer.detokenizer
    stops = StopMatcher(config.stop)
    eos = tokenizer.eos_token_ids
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = 0.0
    n = 0
    tokens = _token_stream(prompt, model, config, cache, stats, history)
    for n, (token, from_draft) in enumerate(tokens, 1):
        if n == 1:
            prompt_time = time.perf_counter() - tic
            prompt_tps = prompt.size / prompt_time
            tic = time.perf_counter()
        finish = None
        if token in eos:
            finish = "stop"
            detokenizer.finalize()
            piece, _ = stops.feed(detokenizer.last_segment)
            piece += stops.flush()
        else:
            detokenizer.add_token(token)
            piece, hit = stops.feed(detokenizer.last_segment)
            if hit:
                finish = "stop"
            elif n == config.max_tokens:
                finish = "length"
                detokenizer.finalize()
                more, hit = stops.feed(detokenizer.last_segment)
                piece += more + ("" if hit else stops.flush())
        elapsed = time.perf_counter() - tic
        yield GenerationResponse(
            text=piece,
            token=token,
            prompt_tokens=prompt.size,
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            from_draft=from_draft,
            speculative=stats,
        )
        if finish:
            break


def generate(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int] | mx.array,
    config: GenerationConfig | None = None,
    verbose: bool = False,
    **options,
) -> str:
    """The generated text as one string (stop strings and EOS excluded)."""
    pieces = []
    last = None
    for last in stream_generate(model, tokenizer, prompt, config, **options):
        pieces.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print(
            f"\nprompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
            f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
            f"peak memory {last.peak_memory:.3f} GB"
        )
        if last.speculative is not None:
            print(last.speculative.summary())
    return "".join(pieces)
