"""The quantized KV cache's full-precision window (KIVI, Liu et al. 2024): a query reads the
last `recent_tokens` positions up to its own in full precision, older ones quantized. Checked
against an oracle written from that definition (one pass over the whole sequence), against
the full cache (exact while nothing aged out), through rewinds (speculation), batches of rows
of different lengths, and prompt-cache files."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny_data import random_ids

from elm_mlx.engine import prompt_file
from elm_mlx.engine.batch_kv import (
    KVConfig,
    add_rows,
    make_batch_cache,
    mark_padding,
    one_row_cache,
    row_cache,
    set_lengths,
)
from elm_mlx.engine.config import MAX_PROPOSAL, GenerationConfig
from elm_mlx.engine.kv_quant import KVQuantizer
from elm_mlx.engine.kv_recent import RecentKV
from elm_mlx.engine.scheduler import BatchGenerator, Request
from elm_mlx.engine.spec_budget import StepCost
from elm_mlx.errors import PromptCacheError
from elm_mlx.models import make_cache

HEAD64 = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}  # head 64


class KiviPass:
    """The oracle: the whole sequence in one pass, query q attending to key/value k in full
    precision when q - k < size or k < first, else to its quantized-then-dequantized form
    (keys quantized in the rotated space, as the cache stores them)."""

    offset = 0

    def __init__(self, quant: KVQuantizer, size: int, first: int):
        self.quant, self.size, self.first = quant, size, first

    def update_and_fetch(self, keys, values):
        return keys, values

    def make_mask(self, length, window=None):
        return None

    def attend(self, queries, keys, values, scale, mask):
        dk, dv = self.quant.decode(self.quant.encode(keys, values))  # dk rotated
        dk = self.quant.rotate(dk)  # back to the model's space (H H = I)
        groups = queries.shape[1] // keys.shape[1]
        keys, values, dk, dv = (mx.repeat(a, groups, axis=1) for a in (keys, values, dk, dv))
        n = queries.shape[2]
        q, k = mx.arange(n)[:, None], mx.arange(n)[None]
        near = (q - k < self.size) | (k < self.first)  # (L, L)
        scores = mx.where(near, queries @ keys.swapaxes(-1, -2), queries @ dk.swapaxes(-1, -2))
        scores = mx.where(k <= q, scores * scale, -mx.inf)
        w = mx.softmax(scores, axis=-1, precise=True)
        return (w * near) @ values + (w * ~near) @ dv


def _oracle(model, ids, bits, size, first=0) -> np.ndarray:
    cache = [KiviPass(KVQuantizer(bits, 64), size, first)] * len(model.layers)
    return np.array(model(mx.array(ids, mx.uint32)[None], cache=cache)[0])


def _logits(model, kv: KVConfig | None, ids: list[int], chunks: list[int]) -> np.ndarray:
    cache = one_row_cache(model, kv) if kv is not None else make_cache(model)
    out, start = [], 0
    for n in chunks:
        out.append(
            np.array(model(mx.array(ids[start : start + n], mx.uint32)[None], cache=cache)[0])
        )
        start += n
    return np.concatenate(out)


@pytest.mark.parametrize("bits", [4, 8])
def test_recent_window_is_the_full_cache_below_R_and_the_oracle_after(tiny, bits):
    """Shorter than R: the full cache's logits (nothing quantized); longer: the oracle's,
    whatever the chunking (prompt chunks, one token at a time, both past several windows), and
    closer to the full cache than without the window."""
    model = tiny.load("llama", HEAD64)[0]
    ids = random_ids(70, seed=7)
    size = 16
    kv = KVConfig(bits=bits, recent_tokens=size, full_tokens=4)
    full = _logits(model, None, ids, [70])
    np.testing.assert_allclose(_logits(model, kv, ids[:size], [5, 1, 10]), full[:size], atol=1e-4)
    want = _oracle(model, ids, bits, size, first=4)
    for chunks in ([70], [30, 1, 1, 38], [9] + [1] * 61):
        np.testing.assert_allclose(_logits(model, kv, ids, chunks), want, atol=1e-4)
    plain = _logits(model, KVConfig(bits=bits, recent_tokens=0), ids, [70])
    assert 0 < np.abs(want - full).mean() < np.abs(plain - full).mean()


def test_rewind_across_the_window_is_never_having_proposed(tiny):
    """Proposals written then rewound (into the window, past it into the quantized positions,
    and past the copy's slack) leave the cache computing what it computes without them."""
    model = tiny.load("llama", HEAD64)[0]
    ids = random_ids(60, seed=3)
    kv = KVConfig(bits=4, recent_tokens=8)
    want = _logits(model, kv, ids, [20] + [1] * 40)
    for rewind in (3, 8, 13, RecentKV.slack):
        cache = one_row_cache(model, kv)
        model(mx.array(ids[:20], mx.uint32)[None], cache=cache)
        proposal = ids[20:30] + random_ids(rewind, seed=rewind)
        model(mx.array(proposal, mx.uint32)[None], cache=cache)
        set_lengths(cache, [30])
        got = np.array(model(mx.array(ids[30:], mx.uint32)[None], cache=cache)[0])
        np.testing.assert_allclose(got, want[30:], atol=1e-4)
    assert RecentKV.slack >= MAX_PROPOSAL  # every speculative rewind is exact


def test_speculation_with_kv4_gives_the_plain_greedy_tokens(tiny):
    """Prompt lookup proposing up to 12 tokens with a window of 8 (rejections rewind across
    it) gives the greedy tokens of decoding without proposals through the same cache."""
    model, tokenizer = tiny.load("llama", HEAD64)
    chunk = random_ids(9, seed=11)
    prompt = chunk * 4 + chunk[:4]
    base = GenerationConfig(max_tokens=40, kv_bits=4, kv_recent_tokens=8)
    spec = GenerationConfig(**{**base.__dict__, "prompt_lookup": 12})

    def run(config):
        gen = BatchGenerator(model, tokenizer, max_batch=1, cost=StepCost.fixed(1.0, 0.0))
        gen.add(Request(prompt, config))
        out, stats = [], None
        while gen.has_work:
            for event in gen.step():
                out.append(event.token)
                stats = event.speculative
        return out, stats

    want, _ = run(base)
    got, stats = run(spec)
    assert stats.proposed > stats.accepted > 0 and len(want) > 20  # rewinds happened
    assert got == want


def _batch_logits(model, kv, prompts, steps, hint=True) -> np.ndarray:
    """Prompts prefilled in one pass (padded to the longest, rewound after), then `steps` (B,
    n) fed one column at a time -> the last logits of each step (n, B, V)."""
    cache = make_batch_cache(model, kv)
    add_rows(cache, [make_cache(model) for _ in prompts])
    longest = max(map(len, prompts))
    if hint:
        mark_padding(cache, [len(p) for p in prompts])
    model(mx.array([p + [0] * (longest - len(p)) for p in prompts], mx.uint32), cache=cache)
    set_lengths(cache, [len(p) for p in prompts])
    return np.stack([
        np.array(model(mx.array(steps[:, j : j + 1], mx.uint32), cache=cache)[:, -1])
        for j in range(steps.shape[1])
    ])  # fmt: skip


def test_batched_rows_of_different_lengths_equal_their_single_runs(tiny):
    """Rows of 5, 40 and 150 tokens prefilled together (the short ones padded by more than the
    copy's slack, then rewound, as the engine's prefill does) and decoded together: each row's
    logits are its own single-row run's. Without telling the cache what is padding, the
    padding would push the short rows' own positions out of their window."""
    model = tiny.load("llama", HEAD64)[0]
    prompts = [random_ids(n, seed=n) for n in (5, 40, 150)]
    steps = np.array([random_ids(4, seed=s) for s in (1, 2, 3)])  # (B, 4)
    kv = KVConfig(bits=4, recent_tokens=16)
    got = _batch_logits(model, kv, prompts, steps)
    for i, p in enumerate(prompts):
        want = _logits(model, kv, p + steps[i].tolist(), [len(p)] + [1] * 4)[len(p) - 1 + 1 :]
        np.testing.assert_allclose(got[:, i], want, atol=1e-4)
    unmarked = _batch_logits(model, kv, prompts, steps, hint=False)
    assert np.abs(unmarked[:, 0] - got[:, 0]).max() > 1e-3


def test_prompt_file_keeps_the_window_and_refuses_another_size(tiny, tmp_path):
    """A prompt cache entry holds the window's positions in full precision (the older ones
    dequantized: re-quantizing them may move a code by one step, MLX's scales not being
    idempotent): a cache rebuilt from it holds the same full-precision copy; a file made with
    another window size is refused, naming both."""
    model = tiny.load("llama", HEAD64)[0]
    prompt = random_ids(50, seed=2)
    kv = KVConfig(bits=4, recent_tokens=16)
    cache = one_row_cache(model, kv)
    model(mx.array(prompt, mx.uint32)[None], cache=cache)
    layers, _ = prompt_file.prefill(model, prompt, kv, chunk=50)
    path = prompt_file.save(tmp_path / "p.safetensors", prompt, layers, "tiny", model, kv)
    tokens, loaded, _ = prompt_file.load(path, "tiny", model, kv)
    assert tokens == prompt
    rebuilt = make_batch_cache(model, kv)
    singles = make_cache(model)
    for c, (k, v) in zip(singles, loaded, strict=True):
        c.state = (k, v)
    add_rows(rebuilt, [singles])
    for a, b in zip(cache, rebuilt, strict=True):
        (lo, held), (lo2, held2) = a.recent.held(0, 50), b.recent.held(0, 50)
        assert lo == lo2 == 0 and held[0].shape[2] == 50
        for x, y in zip(held, held2, strict=True):
            np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-5)
    assert row_cache(rebuilt, 0, 50) is not None
    with pytest.raises(PromptCacheError, match=r'"recent_tokens": 16.*"recent_tokens": 32'):
        prompt_file.load(path, "tiny", model, KVConfig(bits=4, recent_tokens=32))


def test_sliding_layers_read_their_whole_window_in_full_precision(tiny):
    """OLMo 3 (sliding layers over 8 positions, a full one): the window is at most a layer's
    own, so with a window longer than the text every key a query sees is in full precision,
    through the sliding layers' compactions: the full cache's logits, 4 bits or not."""
    model = tiny.load("olmo3", {"hidden_size": 128, "num_attention_heads": 2})[0]
    ids = random_ids(330, vocab=300, seed=5)
    kv = KVConfig(bits=4, recent_tokens=400)
    chunks = [64, 64, 64, 64, 64] + [1] * 10
    np.testing.assert_allclose(
        _logits(model, kv, ids, chunks), _logits(model, None, ids, chunks), atol=1e-4
    )
    assert one_row_cache(model, kv)[0].recent.size == 8
