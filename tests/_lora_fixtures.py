"""Tiny random model folders of each family (fp32, with a tiny SentencePiece tokenizer) and
small JSONL data sets, for the LoRA, data and data-parallel tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers import train_spm_tokenizer

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
from mlx.utils import tree_flatten

from elm_mlx.loader import apply_quantization, build_model

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "to be or not to be that is the question",
    "all that glitters is not gold",
    "the capital of france is paris",
    "the capital of italy is rome",
    "one two three four five six seven eight nine ten",
    "alpha beta gamma delta epsilon zeta eta theta",
    "User: hello there\nAssistant: hi, how can I help you today?",
]

CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 400,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "olmo": {
        "model_type": "olmo",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "vocab_size": 400,
        "tie_word_embeddings": True,
        "clip_qkv": 8.0,
        "eos_token_id": 2,
    },
    "openelm": {
        "model_type": "openelm",
        "head_dim": 16,
        "num_transformer_layers": 2,
        "model_dim": 64,
        "vocab_size": 400,
        "ffn_dim_divisor": 32,
        "num_gqa_groups": 2,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}


def make_tokenizer(folder: Path) -> None:
    """A 400-piece BPE SentencePiece model (BOS 1, EOS 2) with its tokenizer_config.json."""
    text = "\n".join(CORPUS * 20) + "\n<|user|> <|assistant|> <|system|>\n"
    train_spm_tokenizer(folder, 400, text)


def make_model(
    folder: Path,
    family: str,
    tokenizer_dir: Path,
    seed: int = 0,
    bits: int | None = None,
    dtype: mx.Dtype = mx.float32,
) -> Path:
    """A random `family` model written as an MLX folder (optionally quantized, group 32)."""
    import shutil

    mx.random.seed(seed)
    model = build_model(dict(CONFIGS[family]))
    # Sharper output logits than the default init gives, so a tiny model can fit a few rows.
    weights = dict(tree_flatten(model.parameters()))
    head = (
        "lm_head.weight" if "lm_head.weight" in weights else next(k for k in weights if "emb" in k)
    )
    model.load_weights([(head, weights[head] * 8)], strict=False)
    model.set_dtype(dtype)
    config = {**CONFIGS[family], **model.args.to_dict(), "torch_dtype": str(dtype).split(".")[-1]}
    if bits:
        quant = {"group_size": 32, "bits": bits, "mode": "affine"}
        apply_quantization(model, quant)
        config["quantization"] = config["quantization_config"] = quant
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    return folder


def write_jsonl(folder: Path, name: str, rows: list[Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
