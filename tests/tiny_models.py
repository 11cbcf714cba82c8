"""MLX model folders written straight from our modules (whose parameter names are the HF ones):
for training (`write_lora_model`), speculative decoding (`spec_model`) and chat
(`write_tiny_chat_model`), with seeded weights, so each builder gives the same model each time;
and the real SmolLM2 example (`load_smollm2_example`, its float32 conversion
`smollm2_fp32_folder`)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
from elm_mlx.convert import ConvertOptions, convert
from mlx.utils import tree_flatten
from tiny_tokenizers import (
    CHAT_CORPUS,
    CHATML_TEMPLATE,
    SPEC_VOCAB,
    copy_tokenizer_files,
    train_chat_bpe,
    train_spm_tokenizer,
)

from elm_mlx.loader import apply_quantization, build_model
from elm_mlx.models import CausalLM


def _sharpen_head(model: CausalLM, factor: float) -> None:
    """Scale the output head (the embedding when tied) by `factor`: sharper output logits."""
    weights = dict(tree_flatten(model.parameters()))
    head = (
        "lm_head.weight" if "lm_head.weight" in weights else next(k for k in weights if "emb" in k)
    )
    model.load_weights([(head, weights[head] * factor)], strict=False)


def _write_mlx_folder(
    folder: Path, weights: dict[str, mx.array], config: dict[str, Any], indent: int | None = 2
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=indent))


# ---------------------------------------------------------------------------- training data
# Models of each family (fp32 unless told, the SentencePiece tokenizer of `train_spm_tokenizer`)
# and JSONL data sets, for the LoRA, training, data and data-parallel tests.


LORA_CONFIGS: dict[str, dict[str, Any]] = {
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


def write_lora_model(
    folder: Path,
    family: str,
    tokenizer_dir: Path,
    seed: int = 0,
    bits: int | None = None,
    dtype: mx.Dtype = mx.float32,
) -> Path:
    """A random `family` model written as an MLX folder (optionally quantized, group 32)."""
    mx.random.seed(seed)
    model = build_model(dict(LORA_CONFIGS[family]))
    _sharpen_head(model, 8)  # so that a tiny model can fit a few rows
    model.set_dtype(dtype)
    dtype_name = str(dtype).split(".")[-1]
    config = {**LORA_CONFIGS[family], **model.args.to_dict(), "torch_dtype": dtype_name}
    if bits:
        quant = {"group_size": 32, "bits": bits, "mode": "affine"}
        apply_quantization(model, quant)
        config["quantization"] = config["quantization_config"] = quant
    _write_mlx_folder(folder, dict(tree_flatten(model.parameters())), config)
    copy_tokenizer_files(tokenizer_dir, folder)
    return folder


SPEC_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": SPEC_VOCAB,
        "tie_word_embeddings": False,
    },
    "olmo": {
        "model_type": "olmo",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "vocab_size": SPEC_VOCAB,
        "tie_word_embeddings": False,
        "clip_qkv": 8.0,
    },
    "openelm": {
        "model_type": "openelm",
        "head_dim": 16,
        "num_transformer_layers": 2,
        "model_dim": 64,
        "vocab_size": SPEC_VOCAB,
        "ffn_dim_divisor": 32,
        "num_gqa_groups": 2,
        "share_input_output_layers": False,
    },
}


def spec_model(
    family: str,
    seed: int = 0,
    bits: int | None = None,
    vocab: int = SPEC_VOCAB,
    sharpen: float = 4.0,
) -> CausalLM:
    """A random model; its output head is scaled by `sharpen` so that its distributions are
    peaked enough for greedy runs to both follow and leave repeated text."""
    mx.random.seed(seed)
    model = build_model({**SPEC_CONFIGS[family], "vocab_size": vocab})
    _sharpen_head(model, sharpen)
    if bits:
        apply_quantization(model, {"group_size": 32, "bits": bits})
    mx.eval(model.parameters())
    model.eval()
    return model


def save_spec_model(model: CausalLM, family: str, folder: Path, tokenizer_dir: Path) -> Path:
    """Write `model` as an MLX folder next to a copy of the tokenizer."""
    config = {**SPEC_CONFIGS[family], **model.args.to_dict()}
    _write_mlx_folder(folder, dict(tree_flatten(model.parameters())), config, indent=None)
    copy_tokenizer_files(tokenizer_dir, folder)
    return folder


def chat_model_config(kind: str, vocab: int, eos: int) -> dict[str, Any]:
    common = {"vocab_size": vocab, "eos_token_id": eos}
    if kind == "zephyr":
        return {
            "model_type": "openelm",
            "model_dim": 64,
            "head_dim": 16,
            "num_transformer_layers": 2,
            "num_gqa_groups": 2,
            "ffn_dim_divisor": 32,
            "max_context_length": 512,
            "bos_token_id": 1,
            **common,
        }
    return {
        "model_type": "llama" if kind == "chatml" else "olmo",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        **common,
    }


def write_tiny_chat_model(folder: Path, kind: str, seed: int = 0) -> Path:
    """A random model folder of `kind` (one of CHAT_KINDS), float32."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "zephyr":
        # Llama-style SentencePiece (BOS 1 prepended, EOS 2)
        train_spm_tokenizer(folder, 300, "\n".join(CHAT_CORPUS * 10))
        eos, vocab = 2, 300
    else:
        eos, vocab = train_chat_bpe(folder, CHATML_TEMPLATE if kind == "chatml" else None)
    config = chat_model_config(kind, vocab, eos)
    mx.random.seed(seed)
    model = build_model(config)
    # a wider spread than the default init, so that greedy choices are not near-ties
    params = {k: v * 3 if v.ndim == 2 else v for k, v in tree_flatten(model.parameters())}
    config = {**config, **model.args.to_dict(), "torch_dtype": "float32"}
    _write_mlx_folder(folder, params, config)
    return folder


# ---------------------------------------------------------------------------- lm-eval tasks
# Local tasks (YAML + JSONL written into a folder, no download): one per request type lm-eval has.


SMOLLM2_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "smollm2.py"


def load_example(name: str) -> ModuleType:
    """examples/NAME.py, imported by path (examples/ is no package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SMOLLM2_EXAMPLE.parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_smollm2_example() -> ModuleType:
    """examples/smollm2.py (it builds the real SmolLM2 folders); examples/ is no package, so the
    script is imported by path."""
    if "smollm2" in sys.modules:  # e.g. benchmarks put examples/ on sys.path
        return sys.modules["smollm2"]
    spec = importlib.util.spec_from_file_location("smollm2", SMOLLM2_EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["smollm2"] = module
    spec.loader.exec_module(module)
    return module


def smollm2_fp32_folder() -> Path:
    """The real SmolLM2-135M-Instruct in float32, converted once beside the HF folder (where
    scripts/demo.sh puts it on Linux) and reused.

    Not the 8-bit folder other tests use: MLX's CPU backend multiplies quantized weights by
    more than one row ~25x slower than float32 ones (20 s for a 96-token forward pass here),
    which would make a training test take a quarter of an hour."""
    from elm_mlx.errors import OutputError

    smollm2 = load_smollm2_example()
    hf = smollm2.build_hf_folder(smollm2.default_cache_dir())
    out = hf.parent / "smollm2-135m-instruct-fp32"
    if not (out / "config.json").exists():
        try:
            convert(hf, out, ConvertOptions(dtype="float32"), progress=False)
        except OutputError:  # another process converted it meanwhile
            assert (out / "config.json").exists()
    return out
