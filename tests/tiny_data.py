"""Tiny data the tests build: token ids, JSONL rows, prompts that prompt lookup hits, and local
lm-eval tasks."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np
from tiny_tokenizers import CORPUS, SPEC_VOCAB

from elm_mlx.engine.config import GenerationConfig
from elm_mlx.engine.sampling import make_transform
from elm_mlx.models import CausalLM


def random_ids(n: int, vocab: int = 400, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


def write_jsonl(folder: Path, name: str, rows: list[Any]) -> Path:
    """`folder/name.jsonl` with one row a line (dicts as JSON, strings as they are)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------- speculative decoding
# In-memory models of each family and a SentencePiece tokenizer over SPEC_VOCAB pieces. The
# output heads are untied: a tiny random model whose head is its embedding only ever repeats the
# last token (the residual stream is mostly that token's embedding), which no proposal misses.


def lookup_prompt(model: CausalLM, config: GenerationConfig) -> list[int]:
    """[a b c w a b c] with w chosen so that prompt lookup proposes w, and plain sampling gives
    w a middling probability: acceptances and rejections both happen."""
    abc = [11, 12, 13]
    candidates = mx.array([[*abc, w, *abc] for w in range(3, SPEC_VOCAB)], mx.uint32)
    logits = model(candidates)[:, -1, :]  # (V - 3, V)
    transform = make_transform(config.temperature, config.top_p, config.top_k, config.min_p)
    p = mx.exp(transform(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))
    p_w = p[mx.arange(SPEC_VOCAB - 3), mx.arange(3, SPEC_VOCAB)].tolist()
    w = 3 + min(range(len(p_w)), key=lambda i: abs(p_w[i] - 0.4))
    assert 0.2 < p_w[w - 3] < 0.6
    return [*abc, w, *abc]


# ---------------------------------------------------------------------------- chat
# One float32 model folder per prompt format a chat can get (CHAT_KINDS):
# - "chatml": Llama with a byte-level BPE tokenizer whose tokenizer_config.json ships a ChatML
#   template and `<|im_end|>` as EOS (SmolLM2's layout);
# - "zephyr": OpenELM with a SentencePiece tokenizer and no template (gets the Zephyr format);
# - "plain": OLMo with a byte-level BPE tokenizer and no template (gets the plain fallback).


EVAL_TASKS = ("tiny_mc", "tiny_ll", "tiny_rolling", "tiny_gen")


_EVAL_COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""


_EVAL_SPECS = {
    "tiny_mc": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
    "tiny_ll": """output_type: loglikelihood
doc_to_text: "{{question}}"
doc_to_target: "{{' ' + choices[answer]}}"
metric_list:
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
  - {metric: acc, aggregation: mean, higher_is_better: true}
""",
    "tiny_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity}
  - {metric: byte_perplexity}
  - {metric: bits_per_byte}
""",
    "tiny_gen": """output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices[answer]}}"
generation_kwargs: {until: ["\\n", "."], max_gen_toks: 6, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""",
}


def eval_rows(n: int = 12, seed: int = 0) -> list[dict]:
    """Questions from CORPUS with four choices each; the text field for rolling tasks spans
    several sentences."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = CORPUS[i % len(CORPUS)].split()
        choices = [" ".join(rng.sample(words, min(3, len(words)))) for _ in range(4)]
        text = " ".join(CORPUS[(i + k) % len(CORPUS)] for k in range(1 + i % 4))
        out.append({"question": " ".join(words[:4]), "choices": choices, "answer": i % 4,
                    "text": text})  # fmt: skip
    return out


def write_eval_tasks(folder: Path) -> Path:
    """The tasks of EVAL_TASKS in `folder`, reading `folder/data.jsonl`; datasets caches under
    `folder/.cache` (nothing is written outside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in eval_rows()) + "\n")
    for name in EVAL_TASKS:
        header = f"task: {name}\n" + _EVAL_COMMON.format(data=data, cache=folder / ".cache")
        (folder / f"{name}.yaml").write_text(header + _EVAL_SPECS[name])
    return folder


# ---------------------------------------------------------------------------- the real model
