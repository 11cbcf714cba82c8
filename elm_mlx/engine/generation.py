"""Generation of one request: `stream_generate` (text pieces, on the scheduler as a batch of one)
-> `generate` (a string). `reference.generate_step` is the short reference loop they are tested
against."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import mlx.core as mx

from ..errors import GenerationError
from ..models import CausalLM
from ..tokenizer import Tokenizer, encode_prompt
from .config import GenerationConfig
from .prompt_cache import PromptCache
from .reference import wired_limit
from .scheduler import BatchGenerator, Request
from .speculative import SpeculativeStats

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
    cached_tokens: int = 0  # prompt tokens whose KV entries came from the prompt cache


def stream_generate(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int] | mx.array,
    config: GenerationConfig | None = None,
    prompt_cache: PromptCache | None = None,
    **options,
) -> Iterator[GenerationResponse]:
    """Yield one `GenerationResponse` per new token: a batch of one on the scheduler. `options`
    are `GenerationConfig` fields (max_tokens=, temperature=, top_p=, top_k=, min_p=,
    repetition_penalty=, seed=, stop=, prompt_lookup=, max_ngram=, draft_model=, num_draft=).
    `prompt_cache`: KV entries of earlier generations; the prompt reuses the longest prefix it
    shares with one (prompt lookup also copies from those tokens), and this generation's
    entries go there when it ends, also when the caller stops early."""
    try:
        config = replace(config or GenerationConfig(), **options)
    except TypeError as e:
        raise GenerationError(f"unknown generation option: {e}") from e
    if isinstance(prompt, str):
        prompt = encode_prompt(tokenizer, prompt)
    elif isinstance(prompt, mx.array):
        prompt = prompt.tolist()
    engine = BatchGenerator(
        model, tokenizer, max_batch=1, prompt_cache=prompt_cache, kv=config.kv_config()
    )
    rid = engine.add(Request(prompt, config, keep_logprobs=True))
    with wired_limit(model):
        try:
            yield from _responses(engine, len(prompt))
        finally:
            engine.cancel(rid, keep=True)  # stopped early: keep what was computed


def _responses(engine: BatchGenerator, prompt_tokens: int) -> Iterator[GenerationResponse]:
    """The engine's events as responses, with running statistics."""
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = 0.0
    n = 0
    while engine.has_work:
        for event in engine.step():
            n += 1
            if n == 1:
                fed = prompt_tokens - event.usage.cached_tokens
                prompt_tps = fed / (time.perf_counter() - tic)
                tic = time.perf_counter()
            elapsed = time.perf_counter() - tic
            yield GenerationResponse(
                text=event.text,
                token=event.token,
                logprobs=event.distribution,
                prompt_tokens=prompt_tokens,
                prompt_tps=prompt_tps,
                generation_tokens=n,
                generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
                peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=event.finish_reason,
                from_draft=event.from_draft,
                speculative=event.speculative,
                cached_tokens=event.usage.cached_tokens,
            )
            if event.finish_reason:
                return


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
