"""Perplexity in windows: equal to transformers' NLL on the same tiny Llama, with the window
layouts of lm-evaluation-harness (stride = window) and Hugging Face's perplexity guide
(overlapping windows scored on their new tokens)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from oracles import torch_model
from tiny_checkpoints import convert_tiny
from tiny_models import load_smollm2_example
from tiny_tokenizers import CORPUS

from elm_mlx.errors import EvaluationError, OptionError
from elm_mlx.eval.perplexity import encode_text, perplexity, score_tokens
from elm_mlx.models import PREFILL_STEP_SIZE as CHUNK
from elm_mlx.models import context_length

TEXT = "\n".join(CORPUS * 4)  # a few hundred tokens more than one CHUNK
# What perplexity may import (convert uses it and must not load the generation engine).
ALLOWED = {
    "elm_mlx",
    "elm_mlx._blas",
    "elm_mlx.errors",
    "elm_mlx.eval",
    "elm_mlx.eval.perplexity",
    "elm_mlx.tokenizer",
}
ALLOWED |= {"elm_mlx.models", "elm_mlx.models.base"}


@pytest.fixture(scope="module")
def llama(tiny):
    model, tokenizer = tiny.load("llama")
    return model, tokenizer, torch_model(tiny.hf("llama"))


def torch_nll(hf, inputs: list[int], targets: list[int]) -> float:
    """transformers' summed NLL of `targets` as the predictions of the last len(targets)
    positions of `inputs`."""
    with torch.no_grad():
        logits = hf(torch.tensor(inputs)[None]).logits[0, -len(targets) :].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return -logprobs.gather(1, torch.tensor(targets)[:, None]).sum().item()


def test_one_window_equals_transformers_loss(llama):
    model, tokenizer, hf = llama
    ids = encode_text(tokenizer, TEXT)
    assert CHUNK < len(ids) < context_length(model)  # one window, fed in two chunks
    with torch.no_grad():
        loss = hf(torch.tensor(ids)[None], labels=torch.tensor(ids)[None]).loss.item()
    result = perplexity(model, tokenizer, TEXT)
    assert result.tokens == len(ids) - 1
    assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-4)


def test_disjoint_windows_equal_lm_eval_rolling_windows(llama):
    """stride = window: lm-eval's own window layout, scored by transformers."""
    from lm_eval.utils import get_rolling_token_windows

    model, tokenizer, hf = llama
    ids = encode_text(tokenizer, TEXT)
    window = 100
    expected = 0.0
    for inputs, predicted in get_rolling_token_windows(ids[1:], ids[0], window, 1):
        expected += torch_nll(hf, inputs, predicted)
    total, scored = score_tokens(model, ids, window, window)
    assert scored == len(ids) - 1
    assert total == pytest.approx(expected, rel=1e-5)


def test_overlapping_windows_equal_the_hugging_face_guide(llama):
    """stride < window: the loop of HF's perplexity guide (windows of `window + 1` tokens, as
    it counts the first, unpredicted one), on a length where its last window is full too."""
    model, tokenizer, hf = llama
    window, stride = 64, 24
    ids = encode_text(tokenizer, TEXT)
    ids = ids[: 1 + window + stride * ((len(ids) - 1 - window) // stride)]
    expected, prev_end = 0.0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window + 1, len(ids))
        first = max(prev_end, begin + 1)  # the first token this window scores
        expected += torch_nll(hf, ids[begin : end - 1], ids[first:end])
        prev_end = end
        if end == len(ids):
            break
    total, scored = score_tokens(model, ids, window, stride)
    assert scored == len(ids) - 1
    assert total == pytest.approx(expected, rel=1e-5)


def test_result_fields(llama):
    model, tokenizer, _ = llama
    text = "héllo wörld, " + TEXT[:300]
    r = perplexity(model, tokenizer, text, window=50, stride=20)
    assert r.tokens == len(encode_text(tokenizer, text)) - 1
    assert r.bytes == len(text.encode("utf-8")) > len(text)
    assert r.perplexity == pytest.approx(math.exp(r.nll))
    assert r.bits_per_byte == pytest.approx(r.total_nll / math.log(2) / r.bytes)
    assert r.seconds > 0
    # a longer overlap gives more context to each token: a different, finite value
    other = perplexity(model, tokenizer, text, window=50, stride=50)
    assert other.tokens == r.tokens and np.isfinite(other.nll) and other.nll != r.nll


def test_progress_reaches_the_total(llama):
    model, tokenizer, _ = llama
    seen = []
    r = perplexity(model, tokenizer, TEXT, window=128, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (r.tokens, r.tokens)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_bad_input(llama):
    model, tokenizer, _ = llama
    with pytest.raises(EvaluationError, match=r"notes\.txt has 1 token: .* needs at least 2"):
        perplexity(model, tokenizer, "", source="notes.txt")  # only BOS
    with pytest.raises(OptionError, match="between 1 and the model's context 2048") as e:
        perplexity(model, tokenizer, TEXT, window=4096)
    assert e.value.option == "window"
    with pytest.raises(OptionError, match=r"between 1 and the window \(32\)") as e:
        perplexity(model, tokenizer, TEXT, window=32, stride=33)
    assert e.value.option == "stride"


def test_perplexity_loads_no_engine():
    """`elm convert` prints perplexities without the generation engine: importing this module
    must not load it."""
    code = "import sys, elm_mlx.eval.perplexity; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "elm_mlx.eval.perplexity" in loaded
    assert not {m for m in loaded if m.startswith("elm_mlx.")} - ALLOWED


# transformers' loss on the real model, in a process of its own (torch is slow with the OpenBLAS
# that elm_mlx loads into this one).
ORACLE = r"""
import json, sys, torch
from transformers import AutoTokenizer, LlamaForCausalLM
folder, text = sys.argv[1], sys.stdin.read()
ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt").input_ids
model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
with torch.no_grad():
    loss = model(ids, labels=ids).loss.item()
print(json.dumps({"tokens": ids.shape[1] - 1, "nll": loss}))
"""


@pytest.mark.slow
def test_real_model_equals_transformers():
    """SmolLM2-135M-Instruct, fp32: held-out English (the stdlib's pydoc topics) in one window
    of ~1500 tokens, fed in three chunks."""
    import pydoc_data.topics

    from elm_mlx import load

    smollm2 = load_smollm2_example()
    hf = smollm2.build_hf_folder(smollm2.default_cache_dir())
    text = pydoc_data.topics.topics["assignment"][:6000]
    done = subprocess.run([sys.executable, "-c", ORACLE, str(hf)], input=text,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = json.loads(done.stdout)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load(convert_tiny(hf, Path(tmp) / "fp32"))
    result = perplexity(model, tokenizer, text)
    assert result.tokens == expected["tokens"] > 2 * CHUNK
    assert result.nll == pytest.approx(expected["nll"], rel=1e-4)
    assert 2 < result.perplexity < 50  # English under a real model
