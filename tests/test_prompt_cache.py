"""The prompt cache shared across requests: a conversation re-sent turn after turn reuses more
and more KV entries and still answers as an uncached run; longest-prefix matching, LRU
eviction by bytes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from tiny_data import random_ids

from elm_mlx import generate
from elm_mlx.engine.batch_kv import KVConfig
from elm_mlx.engine.config import GenerationConfig
from elm_mlx.engine.generation import stream_generate
from elm_mlx.engine.prompt_cache import PromptCache
from elm_mlx.engine.scheduler import BatchGenerator, Request
from elm_mlx.tokenizer import common_prefix, encode_prompt

HEAD64 = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}
QUESTIONS = [
    "hello there",
    "what is the capital of france",
    "and of italy",
    "to be or not to be",
    "one two three four",
]


def test_conversation_reuses_the_cache_and_answers_as_uncached(tiny, family):
    model, tokenizer = tiny.load(family)
    cache = PromptCache()
    gen = BatchGenerator(model, tokenizer, max_batch=4, prompt_cache=cache)
    config = GenerationConfig(max_tokens=12)
    history, cached, lengths = "", [], []
    for turn, question in enumerate(QUESTIONS):
        history += f"User: {question}\nAssistant:"
        prompt = encode_prompt(tokenizer, history)
        neighbour = Request(random_ids(6 + turn, vocab=300, seed=turn), config)
        ids = [gen.add(Request(prompt, config)), gen.add(neighbour)]
        events: dict[int, list] = {i: [] for i in ids}
        while gen.has_work:
            for e in gen.step():
                events[e.request_id].append(e)
        answer = "".join(e.text for e in events[ids[0]])
        assert answer == generate(model, tokenizer, prompt, config)  # alone, no cache
        cached.append(events[ids[0]][-1].usage.cached_tokens)
        assert events[ids[1]][-1].usage.cached_tokens == 0
        lengths.append(len(prompt))
        history += answer + "\n"
    assert cached[0] == 0
    for turn in range(1, len(QUESTIONS)):
        # at least the previous prompt (the answer may re-encode differently) and growing
        assert lengths[turn - 1] <= cached[turn] < lengths[turn]
        assert cached[turn] > cached[turn - 1]


def _layers(tokens: list[int], n_layers: int = 2) -> list[tuple[mx.array, mx.array]]:
    """Per layer keys/values (1, 1, len, 2) whose entries name their position and token."""
    pos = mx.arange(len(tokens), dtype=mx.float32)
    tok = mx.array(tokens, mx.float32)
    kv = mx.stack([pos, tok], axis=-1)[None, None]  # (1, 1, L, 2)
    return [(kv + layer, -kv - layer) for layer in range(n_layers)]


def test_fetch_gives_the_longest_common_prefix():
    cache = PromptCache()
    cache.insert([1, 2, 3, 4, 5], _layers([1, 2, 3, 4, 5]))
    cache.insert([1, 2, 7, 8], _layers([1, 2, 7, 8]))
    n, caches = cache.fetch([1, 2, 3, 9, 9])
    assert n == 3 and len(caches) == 2
    keys, values = caches[1].state
    np.testing.assert_array_equal(np.array(keys[0, 0]), [[1, 2], [2, 3], [3, 4]])
    np.testing.assert_array_equal(np.array(values), -np.array(keys))
    assert caches[0].offset == 3
    assert cache.fetch([1, 2, 3, 4, 5])[0] == 4  # at least one token is left to feed
    assert cache.fetch([1, 2, 7, 8, 1])[0] == 4
    assert cache.fetch([9, 1, 2]) == (0, None)
    assert cache.fetch([1]) == (0, None)


def test_entries_are_bounded_by_bytes_least_recently_used_first():
    entry = sum(k.nbytes + v.nbytes for k, v in _layers([1] * 4))
    cache = PromptCache(max_bytes=int(2.5 * entry))
    cache.insert([1, 2, 3, 4], _layers([1, 2, 3, 4]))
    cache.insert([5, 6, 7, 8], _layers([5, 6, 7, 8]))
    cache.insert([1, 2], _layers([1, 2]))  # held by an entry already: nothing added
    assert len(cache) == 2 and cache.nbytes == 2 * entry
    cache.fetch([1, 2, 3, 0])  # [1, 2, 3, 4] is now the most recently used
    cache.insert([9, 9, 9, 9], _layers([9, 9, 9, 9]))
    assert [e.tokens for e in cache.entries.values()] == [[1, 2, 3, 4], [9, 9, 9, 9]]
    cache.insert([1, 2, 3, 4, 5], _layers([1, 2, 3, 4, 5]))  # extends an entry: replaces it
    assert [e.tokens for e in cache.entries.values()] == [[9, 9, 9, 9], [1, 2, 3, 4, 5]]
    cache.insert(list(range(20)), _layers(list(range(20))))  # larger than the bound: skipped
    assert cache.nbytes <= cache.max_bytes and len(cache) == 2


def test_entries_serve_only_their_kv_settings():
    """An entry made under one KV setting is never handed to a request under another, nor does
    it replace or absorb an entry made under another."""
    kv8, kv4 = KVConfig(bits=8), KVConfig(bits=4, group_size=32)
    cache = PromptCache()
    cache.insert([1, 2, 3, 4], _layers([1, 2, 3, 4]), kv8)
    assert cache.fetch([1, 2, 3, 4, 5]) == (0, None)  # full precision
    assert cache.fetch([1, 2, 3, 4, 5], kv4) == (0, None)
    assert cache.fetch([1, 2, 3, 4, 5], KVConfig(bits=8, max_size=64)) == (0, None)
    assert cache.fetch([1, 2, 3, 4, 5], KVConfig(bits=8))[0] == 4
    cache.insert([1, 2, 3, 4, 5, 6], _layers([1, 2, 3, 4, 5, 6]))  # extends it, other settings
    cache.insert([1, 2], _layers([1, 2]), kv4)  # held by it, other settings
    assert [(e.tokens, e.kv) for e in cache.entries.values()] == [
        ([1, 2, 3, 4], kv8), ([1, 2, 3, 4, 5, 6], KVConfig()), ([1, 2], kv4)
    ]  # fmt: skip
    assert cache.fetch([1, 2, 3, 4, 5, 6, 7])[0] == 6
    assert cache.fetch([1, 2, 3], kv4)[0] == 2


def test_a_shared_cache_is_not_reused_across_kv_settings(tiny):
    """One PromptCache used by generations under 8-bit KV, then full precision: the second
    reuses nothing and answers as the uncached prompt; under 8 bits again it reuses the first."""
    model, tokenizer = tiny.load("llama", HEAD64)
    cache = PromptCache()
    prompt = random_ids(40, vocab=300, seed=3)
    kv8 = GenerationConfig(max_tokens=6, kv_bits=8)
    first = list(stream_generate(model, tokenizer, prompt, kv8, cache))
    assert first[-1].cached_tokens == 0 and len(cache) == 1
    full = GenerationConfig(max_tokens=6)
    plain = list(stream_generate(model, tokenizer, prompt, full, cache))
    assert plain[-1].cached_tokens == 0
    assert "".join(r.text for r in plain) == generate(model, tokenizer, prompt, full)
    again = list(stream_generate(model, tokenizer, prompt, kv8, cache))
    assert again[-1].cached_tokens == len(prompt) - 1
    assert [r.token for r in again] == [r.token for r in first]


def test_a_windowed_row_that_dropped_positions_is_reused_exactly(tiny):
    """--max-kv-size 40 (4 sinks + the last 36): a long prompt's row drops positions; its
    entry serves a continuation (the same tokens as without the cache, under the same window)
    but not a prompt that shares too little of it to see only held positions."""
    model, tokenizer = tiny.load("llama", HEAD64)
    config = GenerationConfig(max_tokens=6, max_kv_size=40)
    prompt = random_ids(400, vocab=300, seed=11)
    cache = PromptCache()
    first = [r.token for r in stream_generate(model, tokenizer, prompt, config, cache)]
    (entry,) = cache.entries.values()
    assert 40 < entry.start < len(prompt)
    for p, reused in ((prompt + first + [7, 8], True), ([*prompt[: entry.start - 1], 7], False)):
        got = list(stream_generate(model, tokenizer, p, config, cache))
        assert (got[-1].cached_tokens > 0) == reused
        want = [r.token for r in stream_generate(model, tokenizer, p, config)]
        assert [r.token for r in got] == want


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3], [1, 5, 3]) == 1
    assert common_prefix([], [1]) == 0
    for n in range(12):
        a = list(range(12))
        b = [*a[:n], -1, *a[n + 1 :]]
        assert common_prefix(a, b) == n
