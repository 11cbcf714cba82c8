"""Tiny random models of each family (in memory or as folders) and a tiny SentencePiece
tokenizer, for the speculative-decoding tests.

The output heads are untied: a tiny random model whose head is its embedding only ever repeats
the last token (the residual stream is mostly that token's embedding), which no proposal misses.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from helpers import train_spm_tokenizer

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
from mlx.utils import tree_flatten

from elm_mlx.loader import apply_quantization, build_model
from elm_mlx.models import CausalLM

VOCAB = 320
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
    },
    "olmo": {
        "model_type": "olmo",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
        "clip_qkv": 8.0,
    },
    "openelm": {
        "model_type": "openelm",
        "head_dim": 16,
        "num_transformer_layers": 2,
        "model_dim": 64,
        "vocab_size": VOCAB,
        "ffn_dim_divisor": 32,
        "num_gqa_groups": 2,
        "share_input_output_layers": False,
    },
}
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "to be or not to be that is the question",
    "one two three four five six seven eight nine ten",
]


def tiny_model(
    family: str, seed: int = 0, bits: int | None = None, vocab: int = VOCAB, sharpen: float = 4.0
) -> CausalLM:
    """A random model; its output head is scaled by `sharpen` so that its distributions are
    peaked enough for greedy runs to both follow and leave repeated text."""
    mx.random.seed(seed)
    model = build_model({**CONFIGS[family], "vocab_size": vocab})
    weights = dict(tree_flatten(model.parameters()))
    head = (
        "lm_head.weight" if "lm_head.weight" in weights else next(k for k in weights if "emb" in k)
    )
    model.load_weights([(head, weights[head] * sharpen)], strict=False)
    if bits:
        apply_quantization(model, {"group_size": 32, "bits": bits})
    mx.eval(model.parameters())
    model.eval()
    return model


def save_model(model: CausalLM, family: str, folder: Path, tokenizer_dir: Path) -> Path:
    """Write `model` as an MLX folder next to a copy of the tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {**CONFIGS[family], **model.args.to_dict()}
    mx.save_safetensors(
        str(folder / "model.safetensors"),
        dict(tree_flatten(model.parameters())),
        metadata={"format": "mlx"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    return folder


def make_tokenizer(folder: Path, vocab: int = VOCAB) -> Path:
    """A BPE SentencePiece model (UNK 0, BOS 1, EOS 2) and its tokenizer_config.json."""
    return train_spm_tokenizer(folder, vocab, "\n".join(CORPUS * 20) + "\n")


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square variable with `dof` degrees of freedom: the regularised upper
    incomplete gamma Q(dof/2, x/2), by the recursion Q(a+1, y) = Q(a, y) + y^a e^-y / Γ(a+1)."""
    y = x / 2
    if dof % 2 == 0:
        a, q = 1.0, math.exp(-y)
    else:
        a, q = 0.5, math.erfc(math.sqrt(y))
    while a < dof / 2:
        q += math.exp(a * math.log(y) - y - math.lgamma(a + 1)) if y > 0 else 0.0
        a += 1
    return q
