"""The bottom of generation: prefill a cache, then produce one token per forward pass.

On Metal, decoding runs on a stream of its own and, for models near the GPU's working-set
size, with the wired memory limit raised, as mlx-lm does; on the CPU backend both are no-ops.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator, Sequence

import mlx.core as mx
from mlx.utils import tree_reduce

from ..errors import GenerationError
from ..models import PREFILL_STEP_SIZE, CausalLM, KVCache, make_cache
from .sampling import LogitsProcessor, Sampler, make_sampler


@functools.cache
def generation_stream() -> mx.Stream:
    """The stream generation runs on (one per thread where MLX supports it), made on first use
    rather than at import."""
    new = getattr(mx, "new_thread_local_stream", mx.new_stream)
    return new(mx.default_device())


def release_thread() -> None:
    """Let MLX drop what it keeps for the calling thread (its streams, compiled graphs and
    random key) now, while the thread holds the GIL. Call it last in a thread of your own that
    ran MLX: MLX does not work on that thread after. Otherwise C++ destructors free these as the
    thread ends, after `join()` has returned, and the random key's takes the GIL: should the
    interpreter be shutting down by then, Python ends the thread inside that destructor and the
    process aborts ("terminate called without an active exception"). MLX asks for it (mlx#3355)."""
    # MLX >= 0.31.2 (which made the random key per thread); the key goes with it from 0.32.1
    clear = getattr(mx, "clear_streams", None)
    if clear is not None:
        clear()


@contextlib.contextmanager
def wired_limit(model: CausalLM) -> Iterator[None]:
    """On Metal, wire memory up to the recommended working set while generating, so that a
    model close to it is not paged out between steps (warns when it is that close); restore
    the previous limit after. Elsewhere nothing to do."""
    if not mx.metal.is_available():
        yield
        return
    limit = mx.device_info()["max_recommended_working_set_size"]
    size = tree_reduce(lambda n, x: n + x.nbytes if isinstance(x, mx.array) else n, model, 0)
    if size > 0.9 * limit:
        warnings.warn(
            f"the model takes {size >> 20} MB, close to the {limit >> 20} MB this GPU can keep "
            "resident: generation may be slow (a smaller quantization helps)",
            RuntimeWarning,
            stacklevel=3,
        )
    previous = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize(generation_stream())
        mx.set_wired_limit(previous)


def prefill(
    model: CausalLM, tokens: mx.array, cache: list[KVCache], step_size: int = PREFILL_STEP_SIZE
) -> mx.array:
    """Run all but the last token through the model in chunks, filling the cache.
    Returns the tokens still to be fed (at least one)."""
    with mx.stream(generation_stream()):
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
    prefill_step_size: int = PREFILL_STEP_SIZE,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs (V,)) for each new token; the cache is filled in place. The
    logprobs are the model's, after the logits processors and before sampling's transforms.

    The next token is computed asynchronously while the caller handles the current one.
    """
    if prompt.size == 0:
        raise GenerationError("the prompt is empty: give at least one token")
    sampler = sampler or make_sampler()
    cache = prompt_cache if prompt_cache is not None else make_cache(model)
    tokens = prompt if logits_processors else None

    def step(y: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal tokens
        with mx.stream(generation_stream()):
            logits = model(y[None], cache=cache)[:, -1, :]  # (1, V)
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
