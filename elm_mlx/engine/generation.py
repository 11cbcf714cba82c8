"""Generation in three layers: `generate_step` (token ids) -> `stream_generate` (text pieces)
-> `generate` (a string)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import mlx.core as mx

from ..errors import GenerationError
from ..models import CausalLM, KVCache, make_cache
from ..tokenizer import Tokenizer, encode_prompt
from .config import GenerationConfig
from .reference import generate_step, wired_limit
from .speculative import SpeculativeStats, speculative_generate_step
from .stops import TextStream

__all__ = ["GenerationConfig", "GenerationResponse", "generate", "stream_generate"]


@dataclass(frozen=True)
class GenerationResponse:
    """One new token, its text piece, and the statistics of the generation so far."""

    text: str
    token: int
    logprobs: mx.array  # (V,) the model's log-probabilities for this position
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length" | None
    from_draft: bool = False
    speculative: SpeculativeStats | None = None  # the counts up to this token (a copy)


def _token_stream(
    prompt: mx.array,
    model: CausalLM,
    config: GenerationConfig,
    cache: list[KVCache],
    stats: SpeculativeStats | None,
    history: Sequence[int],
) -> Iterator[tuple[int, mx.array, bool]]:
    """(token, logprobs, came from a proposal), from plain or speculative decoding."""
    if config.speculative:
        yield from speculative_generate_step(prompt, model, config, cache, stats, history=history)
        return
    for token, logprobs in generate_step(
        prompt,
        model,
        max_tokens=config.max_tokens,
        sampler=config.sampler(),
        logits_processors=config.logits_processors(),
        prompt_cache=cache,
        prefill_step_size=config.prefill_step_size,
    ):
        yield token, logprobs, False


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
    stats = SpeculativeStats() if config.speculative else None
    with wired_limit(model):
        yield from _responses(prompt, model, tokenizer, config, cache, stats, history)


def _responses(
    prompt: mx.array,
    model: CausalLM,
    tokenizer: Tokenizer,
    config: GenerationConfig,
    cache: list[KVCache],
    stats: SpeculativeStats | None,
    history: Sequence[int],
) -> Iterator[GenerationResponse]:
    """Tokens -> text pieces (stop strings held back and cut) with running statistics."""
    text = TextStream(
        tokenizer.detokenizer, config.stop, tokenizer.eos_token_ids, config.max_tokens
    )
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = 0.0
    n = 0
    tokens = _token_stream(prompt, model, config, cache, stats, history)
    for n, (token, logprobs, from_draft) in enumerate(tokens, 1):
        if n == 1:
            prompt_time = time.perf_counter() - tic
            prompt_tps = prompt.size / prompt_time
            tic = time.perf_counter()
        piece, finish = text.add(token)
        elapsed = time.perf_counter() - tic
        yield GenerationResponse(
            text=piece,
            token=token,
            logprobs=logprobs,
            prompt_tokens=prompt.size,
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            from_draft=from_draft,
            speculative=replace(stats) if stats is not None else None,
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
