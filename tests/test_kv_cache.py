"""The batch KV cache quantized (8 and 4 bits, keys rotated at 4) and windowed (attention sinks
plus the last positions), against the full-precision cache and against exact oracles: attention
over the dequantized keys and values, the Hadamard matrix of scipy, and one forward pass of the
whole sequence with the mask a windowed cache stands for."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from scipy.linalg import hadamard
from tiny_data import random_ids

from elm_mlx.engine.batch_kv import (
    BatchKVCache,
    KVConfig,
    add_rows,
    keep_rows,
    make_batch_cache,
    move_rows,
    row_cache,
    set_lengths,
)
from elm_mlx.engine.config import GenerationConfig
from elm_mlx.engine.kv_quant import KVQuantizer, quantized_attention
from elm_mlx.errors import OptionError
from elm_mlx.models import make_cache

ATOL = 1e-5
HEAD64 = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}  # head size 64


def _model(tiny):
    return tiny.load("llama", HEAD64)[0]


def _feed(model, cache, rows: list[list[int]]) -> np.ndarray:
    """One forward pass of equal-length chunks, one per row -> logits (B, L, V)."""
    return np.array(model(mx.array(rows, mx.uint32), cache=cache).astype(mx.float32))


def _logits(model, kv: KVConfig | None, ids: list[int], chunks: list[int]) -> np.ndarray:
    cache = make_batch_cache(model, kv)
    add_rows(cache, [make_cache(model)])
    out, start = [], 0
    for n in chunks:
        out.append(_feed(model, cache, [ids[start : start + n]])[0])
        start += n
    return np.concatenate(out)


# --- rotation ---------------------------------------------------------------------------------


def test_hadamard_rotation_is_exact_in_float():
    """The rotation is x H with H scipy's Sylvester matrix / sqrt(D): orthonormal, its own
    inverse, and attention over rotated queries and keys equals attention over plain ones."""
    quant = KVQuantizer(4, 64)
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.normal(size=(2, 4, 6, 64)).astype(np.float32)) for _ in range(3))
    h = hadamard(64) / 8.0
    np.testing.assert_allclose(np.array(quant.rotate(k)), np.array(k) @ h, atol=ATOL)
    np.testing.assert_allclose(np.array(quant.rotate(quant.rotate(k))), np.array(k), atol=ATOL)
    plain = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    rotated = mx.fast.scaled_dot_product_attention(
        quant.rotate(q), quant.rotate(k), v, scale=0.125, mask="causal"
    )
    np.testing.assert_allclose(np.array(rotated), np.array(plain), atol=ATOL)
    assert not KVQuantizer(8, 64).rotates(64) and not quant.rotates(80)


# --- quantized attention ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("length", [1, 3, 40])
def test_quantized_attention_equals_attention_over_dequantized(bits, length):
    """Both ways to attend (packed products for few queries, dequantized into the fused kernel
    for many) compute attention over exactly the dequantized keys and values, the first F
    positions in full precision, GQA and per-row masks included."""
    quant = KVQuantizer(bits, 64)
    rng = np.random.default_rng(bits + length)
    size, f = 50, 4
    k, v = (mx.array(rng.normal(size=(2, 2, size, 64)).astype(np.float32)) for _ in range(2))
    q = quant.rotate(mx.array(rng.normal(size=(2, 6, length, 64)).astype(np.float32)))
    store = quant.encode(k, v)
    head = [quant.rotate(k)[..., :f, :], v[..., :f, :]]
    dk, dv = quant.decode(store)
    dk = mx.concatenate([head[0], dk[..., f:, :]], axis=2)
    dv = mx.concatenate([head[1], dv[..., f:, :]], axis=2)
    rows = mx.array([size - length, size - length - 7])[:, None, None, None]  # (B, 1, 1, 1)
    mask = mx.arange(size) <= rows + mx.arange(length)[:, None]  # (B, 1, L, S)
    for m in ("causal", mask):
        want = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=0.125, mask=m)
        got = quantized_attention(q, store, head, quant, 0.125, m)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4)


def test_quantized_cache_logits_close_to_full_cache(tiny):
    """A prompt chunk, then tokens one by one: at 8 bits the logits stay close to the full
    cache's (16 times closer than at 4 bits: each bit halves the step); positions within the
    first `kv_full_tokens` are exact; chunking does not change what a position sees. (No
    full-precision window: test_kv_recent.py.)"""
    model = _model(tiny)
    ids = random_ids(80, seed=5)
    chunks = [16] + [1] * 64  # (80 queries at once are dequantized; 16 and 1 are not)
    full = _logits(model, None, ids, chunks)
    err = {}
    for bits in (8, 4):
        got = _logits(model, KVConfig(bits=bits, recent_tokens=0), ids, chunks)
        err[bits] = np.abs(got - full).mean()
        whole = _logits(model, KVConfig(bits=bits, recent_tokens=0), ids, [80])
        np.testing.assert_allclose(whole, got, atol=1e-4)
    assert err[8] < 0.02 * full.std()
    assert err[8] < err[4] / 8
    first = _logits(model, KVConfig(bits=4, full_tokens=4, recent_tokens=0), ids[:4], [3, 1])
    np.testing.assert_allclose(first, full[:4], atol=1e-4)
    # and without full tokens those positions are quantized too
    assert (
        np.abs(
            _logits(model, KVConfig(bits=4, full_tokens=0, recent_tokens=0), ids[:4], [4])
            - full[:4]
        ).max()
        > 1e-3
    )


def test_quantized_rows_move_and_come_out_in_full_precision(tiny):
    """Rows of a quantized batch cache join (from single-row caches), move between batch
    caches, leave, and come out (for the prompt cache) as keys and values within one
    quantization step of what went in; 8-bit storage is about half of 16-bit."""
    model = _model(tiny)
    seqs = [random_ids(n, seed=n) for n in (7, 30)]
    singles = []
    for s in seqs:
        c = make_cache(model)
        model(mx.array(s, mx.uint32)[None], cache=c)
        singles.append(c)
    kv = KVConfig(bits=8, full_tokens=0)
    a, b = make_batch_cache(model, kv), make_batch_cache(model, kv)
    add_rows(a, singles)
    move_rows(a, [1], b)
    keep_rows(a, [0])
    for cache, single, n in ((a, singles[0], 7), (b, singles[1], 30)):
        layers, start = row_cache(cache, 0, n)
        assert start == 0
        for (k, v), c in zip(layers, single, strict=True):
            for got, want in ((k, c.keys[..., :n, :]), (v, c.values[..., :n, :])):
                want = np.array(want).reshape(-1, 64)
                step = (want.max(-1) - want.min(-1)) / 255
                assert (np.abs(np.array(got).reshape(-1, 64) - want).max(-1) <= step + 1e-5).all()
    # the next token's logits equal the unmoved single-row caches' within 8-bit error
    got = _feed(model, b, [[9]])[0, -1]
    want = np.array(model(mx.array([[9]], mx.uint32), cache=singles[1])[0, -1])
    assert np.abs(got - want).max() < 0.1 * want.std()
    fp16 = BatchKVCache()
    fp16.extend(*[x.astype(mx.float16) for x in (singles[1][0].keys, singles[1][0].values)], [30])
    q8 = BatchKVCache(KVQuantizer(8, 64))
    q8.extend(*[x.astype(mx.float16) for x in (singles[1][0].keys, singles[1][0].values)], [30])
    assert 0.5 < q8.nbytes / fp16.nbytes < 0.6  # 8 bits + a 16-bit scale and bias per 64


def test_kv_options_are_validated(tiny):
    for bad, option in (({"kv_bits": 3}, "kv_bits"), ({"kv_group_size": 48}, "kv_group_size"),
                        ({"max_kv_size": 4}, "max_kv_size"),
                        ({"kv_recent_tokens": -1}, "kv_recent_tokens")):  # fmt: skip
        with pytest.raises(OptionError, match=option):
            GenerationConfig(**bad).validate()
    model = tiny.load("llama")[0]  # head size 16: no group of 64 fits
    cache = make_batch_cache(model, KVConfig(bits=8))
    add_rows(cache, [make_cache(model)])
    with pytest.raises(OptionError, match="kv_group_size 64 must divide the head size 16"):
        _feed(model, cache, [[5, 6]])


# --- windowed ---------------------------------------------------------------------------------


class SinkWindowPass:
    """The oracle: no cache, the whole sequence in one pass, each query attending to what a
    windowed cache keeps: the first `sinks` positions and the last `size - sinks` up to its own."""

    offset = 0

    def __init__(self, size: int, sinks: int):
        self.size, self.sinks = size, sinks

    def update_and_fetch(self, keys, values):
        return keys, values

    def make_mask(self, length: int, window: int | None = None):
        q, k = mx.arange(length)[:, None], mx.arange(length)[None]
        mask = (k <= q) & ((k < self.sinks) | (k > q - (self.size - self.sinks)))
        if window is not None:
            mask &= k > q - window
        return mask


def _oracle(model, ids: list[int], size: int, sinks: int = 4) -> np.ndarray:
    cache = [SinkWindowPass(size, sinks)] * len(model.layers)
    return np.array(model(mx.array(ids, mx.uint32)[None], cache=cache)[0])


def test_windowed_cache_is_exact_while_nothing_is_dropped(tiny):
    model = _model(tiny)
    ids = random_ids(40, seed=2)
    full = _logits(model, None, ids, [10] + [1] * 30)
    np.testing.assert_allclose(
        _logits(model, KVConfig(max_size=40), ids, [10] + [1] * 30), full, atol=ATOL
    )


@pytest.mark.parametrize("bits", [None, 8])
def test_windowed_batch_goes_past_the_window(tiny, bits):
    """Two rows of different lengths (one prefilled past the window in one chunk, then moved
    in from its prefill cache) decode to 340 positions with a window of 24 (slots compacted on
    the way: memory stays bounded), one rewinding 3 tokens (speculative rejections) past the
    first compaction: every logit equals the one pass of the oracle over that row's final
    sequence (8 bits: as close to it as the 8-bit cache without a window is to the full one)."""
    model = _model(tiny)
    size = 24
    seqs = [random_ids(5, seed=1), random_ids(60, seed=2)]
    kv = KVConfig(bits=bits, max_size=size, full_tokens=4)
    cache = make_batch_cache(model, kv)
    single = make_cache(model)  # within the window: a plain cache holds the same
    model(mx.array(seqs[0], mx.uint32)[None], cache=single)
    add_rows(cache, [single])
    prompt = make_batch_cache(model, kv)  # past it: a prompt chunk through a windowed cache
    add_rows(prompt, [make_cache(model)])
    _feed(model, prompt, [seqs[1]])
    move_rows(prompt, [0], cache)
    got: list[dict[int, np.ndarray]] = [{}, {}]  # position -> logits
    rng = np.random.default_rng(0)
    rewound = False
    while len(seqs[0]) < 340:
        tokens = [[int(t)] for t in rng.integers(3, 400, size=2)]
        logits = _feed(model, cache, tokens)
        for i in range(2):
            got[i][len(seqs[i])] = logits[i, -1]
            seqs[i].append(tokens[i][0])
        if not rewound and cache[0].dropped[0]:  # the first compaction: rewind row 1 by 3
            lengths = [len(seqs[0]), len(seqs[1]) - 3]
            set_lengths(cache, lengths)
            del seqs[1][-3:]
            rewound = True
    assert rewound and max(cache[0].slots()) <= size + BatchKVCache.margin + BatchKVCache.step + 1
    for i in range(2):
        want = _oracle(model, seqs[i], size)
        positions = sorted(p for p in got[i] if p < len(seqs[i]) - 1)
        err = np.abs(np.stack([got[i][p] for p in positions]) - want[positions])
        if bits is None:
            assert err.max() < 1e-4
        else:  # as close as the 8-bit cache without a window is to the full one
            assert err.mean() < 0.02 * want.std()
    # the window matters: the full sequence's logits differ
    full = np.array(model(mx.array(seqs[0], mx.uint32)[None])[0])
    assert np.abs(full[-1] - _oracle(model, seqs[0], size)[-1]).max() > 1e-2


# --- perplexity through the cache -------------------------------------------------------------


def test_perplexity_through_quantized_and_windowed_caches(tiny, tmp_path):
    """`perplexity` feeds the text in chunks through the cache it is given: a window the text
    fits in changes nothing, 8 bits little and less than 4; `elm eval --kv-bits 8` reports it."""
    from functools import partial

    from elm_mlx.cli.main import app
    from typer.testing import CliRunner

    from elm_mlx.engine.batch_kv import one_row_cache
    from elm_mlx.eval.perplexity import perplexity

    model, tokenizer = tiny.load("llama", HEAD64)
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)

    def ppl(**kv) -> float:
        new_cache = partial(one_row_cache, kv=KVConfig(**kv))
        return perplexity(model, tokenizer, text, window=256, new_cache=new_cache).perplexity

    plain = perplexity(model, tokenizer, text, window=256).perplexity
    assert abs(ppl(max_size=256) - plain) < 1e-4 * plain
    q8, q4 = ppl(bits=8), ppl(bits=4)
    assert abs(q8 - plain) < abs(q4 - plain) and abs(q8 - plain) < 0.05 * plain and q8 != plain
    (tmp_path / "t.txt").write_text(text)
    args = [
        "eval",
        "-m",
        str(tiny.converted("llama", HEAD64)),
        "--perplexity",
        str(tmp_path / "t.txt"),
    ]
    result = CliRunner().invoke(app, [*args, "--window", "256", "--kv-bits", "8"])
    assert result.exit_code == 0, result.output
    assert f"perplexity {q8:.4f}" in result.output


# --- through the engine -----------------------------------------------------------------------


def test_generation_goes_past_the_window_and_through_8_bits(tiny):
    """`generate(..., max_kv_size=N)` runs past N positions with the greedy tokens of the
    windowed attention's oracle (one pass over the whole sequence per token); `kv_bits=8` gives
    the greedy tokens of the same model fed through an 8-bit cache outside the engine."""
    from elm_mlx import stream_generate
    from elm_mlx.engine.batch_kv import one_row_cache

    model, tokenizer = tiny.load("llama", HEAD64)
    prompt = random_ids(20, seed=3)
    size = 24
    config = GenerationConfig(max_tokens=40, max_kv_size=size)
    got = [r.token for r in stream_generate(model, tokenizer, prompt, config)]
    assert len(prompt) + len(got) > size + 10  # well past the window (no early EOS)
    seq = list(prompt)
    for token in got:
        assert token == int(np.argmax(_oracle(model, seq, size)[-1]))
        seq.append(token)
    config = GenerationConfig(max_tokens=16, kv_bits=8)
    got = [r.token for r in stream_generate(model, tokenizer, prompt, config)]
    cache = one_row_cache(model, KVConfig(bits=8))
    logits = _feed(model, cache, [prompt])[0, -1]
    want = []
    for _ in range(len(got)):
        want.append(int(np.argmax(logits)))
        logits = _feed(model, cache, [[want[-1]]])[0, -1]
    assert got == want


def test_elm_generate_with_kv_flags(tiny):
    """`elm generate --kv-bits 8 --max-kv-size 24 --kv-recent-tokens 8` prints what the library
    generates with them."""
    from elm_mlx.cli.main import app
    from typer.testing import CliRunner

    from elm_mlx import generate

    model, tokenizer = tiny.load("llama", HEAD64)
    folder = str(tiny.converted("llama", HEAD64))
    flags = [
        "--kv-bits",
        "8",
        "--max-kv-size",
        "24",
        "--kv-recent-tokens",
        "8",
        "--max-tokens",
        "30",
    ]
    result = CliRunner().invoke(app, ["generate", "-m", folder, "-p", "the capital of", *flags])
    assert result.exit_code == 0, result.output
    config = GenerationConfig(max_tokens=30, kv_bits=8, max_kv_size=24, kv_recent_tokens=8)
    assert result.stdout == generate(model, tokenizer, "the capital of", config) + "\n"
    bad = CliRunner().invoke(app, ["generate", "-m", folder, "-p", "x", "--kv-bits", "5"])
    assert bad.exit_code == 1 and bad.stderr.startswith("error: --kv-bits must be one of")
