"""KV cache: incremental decoding equals a full forward pass, trim-and-redo, growth."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny_data import random_ids

from elm_mlx.engine.reference import generate_step
from elm_mlx.models import KVCache, make_cache

ATOL = 1e-4


def _incremental_logits(model, ids: list[int], prefill: int) -> np.ndarray:
    """Logits (L, V) from a prefill of `prefill` tokens, then one token at a time."""
    cache = make_cache(model)
    outs = [model(mx.array(ids[:prefill])[None], cache=cache)[0]]
    for t in ids[prefill:]:
        outs.append(model(mx.array([t])[None], cache=cache)[0])
    assert all(c.offset == len(ids) for c in cache)
    return np.array(mx.concatenate(outs, axis=0))


def test_cached_decoding_equals_full_forward(tiny, family):
    model, _ = tiny.load(family)
    ids = random_ids(20, seed=3)
    full = np.array(model(mx.array(ids)[None])[0])
    np.testing.assert_allclose(_incremental_logits(model, ids, 7), full, atol=ATOL, rtol=0)


def test_cache_grows_past_its_step(tiny, family):
    """300 positions cross the 256-position allocation step during decoding."""
    model, _ = tiny.load(family)
    ids = random_ids(300, seed=4)
    full = np.array(model(mx.array(ids)[None])[0])
    cache = make_cache(model)
    model(mx.array(ids[:250])[None], cache=cache)
    outs = [model(mx.array([t])[None], cache=cache)[0] for t in ids[250:]]
    assert cache[0].keys.shape[2] == 2 * KVCache.step and cache[0].offset == 300
    np.testing.assert_allclose(np.array(mx.concatenate(outs)), full[250:], atol=ATOL, rtol=0)


def _greedy(model, cache, token: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        logits = model(mx.array([token])[None], cache=cache)
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
    return out


def test_trim_and_redo_gives_same_tokens(tiny, family):
    model, _ = tiny.load(family)
    prompt = random_ids(9, seed=5)
    cache = make_cache(model)
    model(mx.array(prompt[:-1])[None], cache=cache)
    original = _greedy(model, cache, prompt[-1], 10)
    # Forget the last 4 fed tokens, then regenerate from the last one kept.
    assert [c.trim(4) for c in cache] == [4] * len(cache)
    assert cache[0].offset == len(prompt) - 1 + 10 - 4
    redo = _greedy(model, cache, original[10 - 5], 4)
    assert redo == original[6:10]


def test_generate_step_continues_a_trimmed_cache(tiny, family):
    """The library path: a prompt cache rewound by `trim` and reused by `generate_step`."""
    model, _ = tiny.load(family)
    prompt = mx.array(random_ids(9, seed=6))
    cache = make_cache(model)
    first = [t for t, _ in generate_step(prompt, model, max_tokens=8, prompt_cache=cache)]
    # Fed so far: the prompt and the first 7 new tokens (the 8th is never fed).
    assert cache[0].offset == 9 + 7
    for c in cache:
        c.trim(4)  # forget new tokens 4..7, then feed token 4 again
    again = [
        t for t, _ in generate_step(mx.array(first[3:4]), model, max_tokens=4, prompt_cache=cache)
    ]
    assert again == first[4:8]


def test_kv_cache_update_trim_and_state():
    """KVCache against plain concatenation, across the growth step and after a trim."""
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((1, 2, n, 8)).astype(np.float32) for n in (100, 200, 1, 30)]
    cache = KVCache()
    for i, c in enumerate(chunks):
        k, v = cache.update_and_fetch(mx.array(c), mx.array(-c))
        expect = np.concatenate(chunks[: i + 1], axis=2)
        np.testing.assert_array_equal(np.array(k), expect)
        np.testing.assert_array_equal(np.array(v), -expect)
    assert cache.offset == 331 and cache.keys.shape[2] >= 331
    assert cache.trim(1000) == 331 and cache.offset == 0
    new = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    k, _ = cache.update_and_fetch(mx.array(new), mx.array(new))
    np.testing.assert_array_equal(np.array(k), new)
    keys, values = cache.state
    assert keys.shape == (1, 2, 5, 8)
    restored = KVCache()
    restored.state = (keys, values)
    assert restored.offset == 5


@pytest.mark.parametrize("prefill", [1, 5])
def test_prefill_chunks_do_not_change_tokens(tiny, prefill):
    """Chunked prefill (step size 2 or 5) gives the same greedy tokens as one chunk."""
    model, _ = tiny.load("llama")
    prompt = mx.array(random_ids(13, seed=7))
    ref = [t for t, _ in generate_step(prompt, model, max_tokens=6)]
    chunked = [t for t, _ in generate_step(prompt, model, max_tokens=6, prefill_step_size=prefill)]
    assert chunked == ref
