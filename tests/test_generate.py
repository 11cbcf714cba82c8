"""Generation: greedy against the oracles, sampling, logits processors against transformers',
stop conditions, BOS handling and streaming text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from oracles import mlx_lm_model, read_hf_tensors, torch_model
from tiny_data import random_ids
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from elm_mlx import generate, load, stream_generate
from elm_mlx.engine.sampling import make_transform, repetition_penalty
from elm_mlx.errors import OptionError
from elm_mlx.tokenizer import DecodeDetokenizer, encode_prompt

PROMPT = "the capital of france is"


def _tokens(model, tokenizer, prompt, **options) -> list[int]:
    return [r.token for r in stream_generate(model, tokenizer, prompt, **options)]


def _oracle_greedy(tiny, family, prompt: list[int], n: int, eos: set[int], penalty=None):
    """A plain argmax loop, re-running the whole sequence each step, on the oracle model."""
    src = tiny.hf(family)
    if family == "openelm":
        config = json.loads((src / "config.json").read_text())
        model = mlx_lm_model("openelm", config, read_hf_tensors(src))

        def last_logits(ids):
            return torch.tensor(np.array(model(mx.array(ids)[None])[0, -1]))
    else:
        model = torch_model(src)

        def last_logits(ids):
            with torch.no_grad():
                return model(torch.tensor([ids])).logits[0, -1]

    processor = RepetitionPenaltyLogitsProcessor(penalty) if penalty else None
    ids, out = list(prompt), []
    for _ in range(n):
        logits = last_logits(ids)
        if processor is not None:
            logits = processor(torch.tensor([ids]), logits[None])[0]
        token = int(torch.argmax(logits))
        out.append(token)
        ids.append(token)
        if token in eos:
            break
    return out


def test_greedy_equals_oracle_argmax_loop(tiny, family):
    model, tokenizer = tiny.load(family)
    prompt = random_ids(7, seed=8)
    ours = _tokens(model, tokenizer, prompt, max_tokens=16)
    assert ours == _oracle_greedy(tiny, family, prompt, 16, tokenizer.eos_token_ids)


def test_greedy_with_repetition_penalty_equals_hf_loop(tiny):
    model, tokenizer = tiny.load("llama")
    prompt = random_ids(7, seed=9)
    ours = _tokens(model, tokenizer, prompt, max_tokens=16, repetition_penalty=1.5)
    oracle = _oracle_greedy(tiny, "llama", prompt, 16, tokenizer.eos_token_ids, penalty=1.5)
    assert ours == oracle
    assert ours != _tokens(model, tokenizer, prompt, max_tokens=16)  # the penalty mattered


def test_seeded_sampling_is_reproducible(tiny):
    model, tokenizer = tiny.load("llama")
    first = _tokens(model, tokenizer, PROMPT, max_tokens=20, temperature=1.0, seed=3)
    mx.random.seed(12345)  # whatever the global state, the seed decides
    assert _tokens(model, tokenizer, PROMPT, max_tokens=20, temperature=1.0, seed=3) == first
    assert first != _tokens(model, tokenizer, PROMPT, max_tokens=20)  # not greedy
    assert first != _tokens(model, tokenizer, PROMPT, max_tokens=20, temperature=1.0, seed=4)


def test_top_k_1_equals_greedy(tiny, family):
    model, tokenizer = tiny.load(family)
    greedy = _tokens(model, tokenizer, PROMPT, max_tokens=12)
    assert _tokens(model, tokenizer, PROMPT, max_tokens=12, temperature=1.5, top_k=1, seed=0) == (
        greedy
    )


# ---------------------------------------------------------------------------- processors


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((1, 50)).astype(np.float32) * 3  # both signs
    tokens = np.array([3, 7, 7, 11, 42, 3, 0, 49])  # repeats, and both ends of the vocab
    logits[0, [3, 11, 49]] = -np.abs(logits[0, [3, 11, 49]])  # penalised logits of both signs
    logits[0, [7, 42, 0]] = np.abs(logits[0, [7, 42, 0]])
    ours = repetition_penalty(penalty)(mx.array(tokens), mx.array(logits))
    hf = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(tokens[None]), torch.tensor(logits))
    np.testing.assert_allclose(np.array(ours), hf.numpy(), rtol=1e-6, atol=0)
    assert not np.allclose(np.array(ours), logits)


def _surviving(transform, logits: np.ndarray) -> set[int]:
    out = np.array(transform(mx.array(logits)))
    return set(np.flatnonzero(np.isfinite(out[0])).tolist())


def _hf_surviving(warpers, logits: np.ndarray) -> set[int]:
    scores = torch.tensor(logits)
    for w in warpers:
        scores = w(torch.zeros((1, 1), dtype=torch.long), scores)
    return set(np.flatnonzero(np.isfinite(scores[0].numpy())).tolist())


WARPER_CASES = [
    ({"top_p": 0.9}, lambda: [TopPLogitsWarper(0.9)]),
    ({"top_p": 0.5}, lambda: [TopPLogitsWarper(0.5)]),
    ({"top_p": 0.05}, lambda: [TopPLogitsWarper(0.05)]),
    ({"min_p": 0.1}, lambda: [MinPLogitsWarper(0.1)]),
    ({"min_p": 0.5}, lambda: [MinPLogitsWarper(0.5)]),
    ({"top_k": 5}, lambda: [TopKLogitsWarper(5)]),
    (
        {"temperature": 0.5, "top_p": 0.8},
        lambda: [TemperatureLogitsWarper(0.5), TopPLogitsWarper(0.8)],
    ),
    (
        {"temperature": 2.0, "min_p": 0.2},
        lambda: [TemperatureLogitsWarper(2.0), MinPLogitsWarper(0.2)],
    ),
]


@pytest.mark.parametrize("case", WARPER_CASES, ids=lambda c: str(c[0]))
@pytest.mark.parametrize("seed", range(4))
def test_sampling_filters_keep_the_tokens_transformers_keeps(case, seed):
    options, warpers = case
    logits = np.random.default_rng(seed).standard_normal((1, 200)).astype(np.float32) * 2
    logprobs = logits - np.log(np.exp(logits).sum())
    options = {"temperature": 1.0, **options}
    kept = _surviving(make_transform(**options), logprobs)
    assert kept == _hf_surviving(warpers(), logits)
    assert 0 < len(kept) < 200 or options.get("top_p") == 0.9


# ---------------------------------------------------------------------------- stopping


def _pieces(model, tokenizer, prompt, **options):
    responses = list(stream_generate(model, tokenizer, prompt, **options))
    return [r.text for r in responses], responses


def _plain(c: str) -> bool:
    return c.isprintable() and not c.isspace() and c != "\ufffd"


@pytest.mark.parametrize("family", ["llama", "olmo"])  # SentencePiece and byte-level BPE
def test_stop_strings(tiny, family):
    model, tokenizer = tiny.load(family)
    # Sampled (seeded) text: greedy text of a random model is a loop of one piece.
    options = {"max_tokens": 40, "temperature": 1.0, "seed": 0}
    pieces, responses = _pieces(model, tokenizer, PROMPT, **options)
    text = "".join(pieces)
    # A stop string spanning two tokens: the end of one piece and the start of the next...
    i = next(
        i
        for i in range(len(pieces) - 2)
        if pieces[i][-1:] and pieces[i + 1][:1] and _plain(pieces[i][-1] + pieces[i + 1][0])
    )
    spanning = pieces[i][-1] + pieces[i + 1][0]
    # ...and one inside a single piece.
    inside = next(p[:2] for p in pieces[:-1] if len(p) >= 2 and all(map(_plain, p[:2])))
    for stop in (spanning, inside):
        got, stopped = _pieces(model, tokenizer, PROMPT, stop=[stop, "zzzz"], **options)
        assert "".join(got) == text[: text.index(stop)]
        assert stopped[-1].finish_reason == "stop"
        assert len(stopped) < len(responses)
    assert generate(model, tokenizer, PROMPT, stop="zzzz", **options) == text


def test_eos_stops_generation(tiny, tmp_path):
    """config.json's eos_token_id list decides: stop at the first EOS, without its text."""
    model, tokenizer = tiny.load("llama")
    tokens = _tokens(model, tokenizer, PROMPT, max_tokens=20)
    k = next(k for k in range(2, 20) if tokens[k] not in tokens[:k])
    folder = tmp_path / "eos"
    shutil.copytree(tiny.converted("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": [2, tokens[k]]}))
    model, tokenizer = load(folder)
    assert tokenizer.eos_token_ids == {2, tokens[k]}
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=20))
    assert [r.token for r in responses] == tokens[: k + 1]
    assert responses[-1].finish_reason == "stop"
    assert "".join(r.text for r in responses) == tokenizer.decode(tokens[:k])


@pytest.mark.parametrize("n", [1, 7])
def test_max_tokens(tiny, n):
    model, tokenizer = tiny.load("olmo")
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=n))
    assert len(responses) == n
    assert responses[-1].finish_reason == "length"
    assert responses[-1].generation_tokens == n


def test_max_tokens_must_be_positive(tiny):
    model, tokenizer = tiny.load("olmo")
    with pytest.raises(OptionError, match="max_tokens must be at least 1"):
        next(stream_generate(model, tokenizer, PROMPT, max_tokens=0))


# ---------------------------------------------------------------------------- tokenizers


def test_bos_prepended_for_sentencepiece(tiny):
    import sentencepiece as spm

    _, tokenizer = tiny.load("llama")
    sp = spm.SentencePieceProcessor(model_file=str(tiny.spm / "tokenizer.model"))
    ids = encode_prompt(tokenizer, PROMPT)
    assert ids == [sp.bos_id(), *sp.encode(PROMPT)]
    twice = encode_prompt(tokenizer, "<s>" + PROMPT)  # a template that writes BOS itself
    assert twice[0] == sp.bos_id() and twice[1] != sp.bos_id()
    model, _ = tiny.load("openelm")  # OpenELM: the same tokenizer, shipped at conversion
    _, elm_tokenizer = tiny.load("openelm")
    assert encode_prompt(elm_tokenizer, PROMPT) == ids
    first = next(iter(stream_generate(model, elm_tokenizer, PROMPT, max_tokens=1)))
    assert first.prompt_tokens == len(ids)


def test_no_bos_for_byte_level_bpe(tiny):
    from tokenizers import Tokenizer

    _, tokenizer = tiny.load("olmo")
    raw = Tokenizer.from_file(str(tiny.bpe / "tokenizer.json"))
    assert encode_prompt(tokenizer, PROMPT) == raw.encode(PROMPT).ids
    assert tokenizer.eos_token_ids == {raw.token_to_id("<|endoftext|>")}


@pytest.mark.parametrize("family", ["llama", "olmo"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_streamed_text_joins_to_decode(tiny, family, temperature):
    """Random models emit many byte-fallback tokens: invalid UTF-8 runs included."""
    model, tokenizer = tiny.load(family)
    responses = list(
        stream_generate(model, tokenizer, PROMPT, max_tokens=60, temperature=temperature, seed=1)
    )
    tokens = [r.token for r in responses if r.token not in tokenizer.eos_token_ids]
    assert "".join(r.text for r in responses) == tokenizer.decode(tokens)


TEXTS = [
    "the capital of france is paris\nhéllo 😀 世界 over  the lazy dog\n\n  two",
    " leading space, trailing space ",
    "a ,b . c ! d's e n't\ttab",
]


def _streamed(detokenizer, tokens: list[int]) -> list[str]:
    """The pieces a streaming detokenizer hands out for `tokens`, one per token and the last."""
    pieces = []
    for t in tokens:
        detokenizer.add_token(t)
        pieces.append(detokenizer.last_segment)
    detokenizer.finalize()
    return [*pieces, detokenizer.last_segment]


@pytest.mark.parametrize("kind", ["loaded", "decode"])
@pytest.mark.parametrize("family", ["llama", "olmo"])
@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_streams_real_text_exactly(tiny, family, text, kind):
    """The streaming detokenizer joins to `decode`'s text, as loaded (through tokenizers'
    stream where that gives decode's text) and re-decoding in Python only."""
    _, tokenizer = tiny.load(family)
    tokens = tokenizer.encode(text, add_special_tokens=False)
    hf = tokenizer._tokenizer
    detokenizer = tokenizer.detokenizer if kind == "loaded" else DecodeDetokenizer(hf, False)
    pieces = _streamed(detokenizer, tokens)
    assert "".join(pieces) == tokenizer.decode(tokens)
    assert sum(bool(p) for p in pieces) > len(tokens) // 3  # it streams, not all at the end


# ---------------------------------------------------------------------------- responses


@pytest.mark.parametrize("speculative", [{}, {"prompt_lookup": 4}], ids=["plain", "lookup"])
def test_responses_carry_the_models_logprobs(tiny, speculative):
    """Each response's logprobs are log-softmax of the model's logits at its position (one
    forward pass over the whole sequence as the oracle), after the repetition penalty."""
    model, tokenizer = tiny.load("llama")
    prompt = encode_prompt(tokenizer, PROMPT + " " + PROMPT)
    options = {"max_tokens": 10, "repetition_penalty": 1.3, **speculative}
    responses = list(stream_generate(model, tokenizer, prompt, **options))
    ids = prompt + [r.token for r in responses]
    logits = model(mx.array(ids)[None])[0]  # (L, V)
    penalty = repetition_penalty(1.3)
    for i, r in enumerate(responses):
        at = len(prompt) - 1 + i
        row = penalty(mx.array(ids[: at + 1]), logits[at : at + 1])
        expected = row - mx.logsumexp(row, axis=-1, keepdims=True)
        assert r.logprobs.shape == (logits.shape[-1],)
        np.testing.assert_allclose(np.array(r.logprobs), np.array(expected[0]), atol=1e-4)
        assert int(mx.argmax(r.logprobs)) == r.token  # greedy


def test_each_response_has_its_own_statistics(tiny):
    model, tokenizer = tiny.load("llama")
    responses = list(
        stream_generate(model, tokenizer, PROMPT + " " + PROMPT, max_tokens=12, prompt_lookup=4)
    )
    stats = [r.speculative for r in responses]
    assert len({id(s) for s in stats}) == len(stats)  # not one shared object
    assert [s.tokens for s in stats] == sorted(s.tokens for s in stats)
    assert stats[0].tokens < stats[-1].tokens == len(responses)
    assert [r.generation_tokens for r in responses] == list(range(1, len(responses) + 1))


def test_generation_stream_does_not_leak_into_the_caller(tiny):
    """Generation runs on its own stream (on Metal it overlaps with the caller's work); between
    two tokens the caller's default stream is its own again. The wired limit is a no-op off
    Metal."""
    from elm_mlx.engine.reference import generation_stream, wired_limit

    model, tokenizer = tiny.load("llama")
    device = mx.default_device()
    mine = mx.default_stream(device)
    stream = stream_generate(model, tokenizer, PROMPT, max_tokens=3)
    next(stream)
    assert mx.default_stream(device) == mine
    assert generation_stream() is generation_stream()
    list(stream)
    assert mx.default_stream(device) == mine
    assert not mx.metal.is_available()
    with wired_limit(model):
        assert generate(model, tokenizer, PROMPT, max_tokens=3) == "".join(
            r.text for r in stream_generate(model, tokenizer, PROMPT, max_tokens=3)
        )


@pytest.mark.slow
def test_real_tokenizer_streams_with_tokenizers_decoder_exactly():
    """SmolLM2's byte-level BPE streams through `tokenizers`' DecodeStream, and its pieces join
    to `decode`'s text on prose and on random ids (bytes split anywhere)."""
    from serving import load_smollm2_example

    from elm_mlx.tokenizer import load_tokenizer

    example = load_smollm2_example()
    tokenizer = load_tokenizer(example.build_hf_folder(example.default_cache_dir()))
    assert tokenizer.detokenizer.streams
    prose = (Path(__file__).parent / "data" / "alice-ch1-3.txt").read_text()[:5000]
    rng = np.random.default_rng(0)
    cases = [tokenizer.encode(prose, add_special_tokens=False)]
    cases += [rng.integers(0, tokenizer.vocab_size, 200).tolist() for _ in range(5)]
    for tokens in cases:
        assert "".join(_streamed(tokenizer.detokenizer, tokens)) == tokenizer.decode(tokens)
