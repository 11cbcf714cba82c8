"""Tiny random HF checkpoints (`write_hf_*`, cached per session by `TinyModels`) in the exact
Hugging Face layout of their family (tensor names, shapes and config keys of the public repos):
Llama and OLMo (1, 2, 3) through transformers' own `save_pretrained` (or `torch.save` for a
pickled `.bin`), OpenELM by hand from the tensor table of Apple's repos (`openelm_shapes`), since
its modeling code is remote. Weights are drawn with a larger spread than HF's init (std 0.1, norm
weights around 1) so that a wrong rotation, norm or clamp changes the logits by far more than
the comparison tolerance. Tokenizers are in tiny_tokenizers.py, MLX folders written from our
modules in tiny_models.py, data in tiny_data.py; what the tests compare these with
(transformers, mlx-lm, exact distributions) is in oracles.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import numpy as np
from elm_mlx.convert import ConvertOptions, convert
from tiny_tokenizers import (
    copy_tokenizer_files,
)

INIT_STD = 0.1


# ---------------------------------------------------------------------------- tokenizers


def llama_config(**overrides: Any) -> dict[str, Any]:
    """HF LlamaConfig kwargs of a tiny GQA model (OpenLLaMA's keys)."""
    config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 400,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }
    return {**config, **overrides}


def olmo_config(**overrides: Any) -> dict[str, Any]:
    """HF OlmoConfig kwargs of a tiny OLMo-1B-hf lookalike (eos/pad of the BPE tokenizer)."""
    config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 400,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "clip_qkv": None,
        "bos_token_id": None,
        "eos_token_id": 0,
        "pad_token_id": 1,
        "tie_word_embeddings": True,
    }
    return {**config, **overrides}


def olmo2_config(**overrides: Any) -> dict[str, Any]:
    """HF Olmo2Config kwargs of a tiny OLMo-2-1124 lookalike, with GQA as in OLMo 2 32B."""
    config = olmo_config(num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False)
    return {**config, "rope_theta": 500000.0, **overrides}


def olmo3_config(
    sliding_window: int = 8, rope_scaling: dict[str, Any] | None = None, **overrides: Any
) -> dict[str, Any]:
    """HF Olmo3Config kwargs of a tiny OLMo-3-1025 lookalike: 4 layers, the last one full, the
    others sliding over `sliding_window` positions; `rope_scaling` for the full layers (the
    7B's is YaRN), given as transformers 5 wants it (`rope_parameters` per layer type)."""
    theta = overrides.pop("rope_theta", 500000.0)
    full = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": theta}
    config = olmo2_config(num_hidden_layers=4, sliding_window=sliding_window)
    config["rope_parameters"] = {
        "full_attention": full,
        "sliding_attention": {"rope_type": "default", "rope_theta": theta},
    }
    del config["rope_theta"]
    return {**config, **overrides}


def openelm_config(
    num_layers: int = 3,
    model_dim: int = 64,
    head_dim: int = 16,
    num_gqa_groups: int = 2,
    ffn_dim_divisor: int = 32,
    vocab_size: int = 400,
    per_layer_lists: bool = True,
) -> dict[str, Any]:
    """An OpenELM config.json as Apple's repos hold it: per-layer head counts and FFN
    multipliers expanded from `qkv_multipliers` / `ffn_multipliers` with Apple's rule."""
    from elm_mlx.models.openelm import make_divisible

    def linspace(lo: float, hi: float) -> list[float]:
        return [round(float(v), 2) for v in np.linspace(lo, hi, num_layers)]

    config: dict[str, Any] = {
        "architectures": ["OpenELMForCausalLM"],
        "model_type": "openelm",
        "activation_fn_name": "swish",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "ffn_dim_divisor": ffn_dim_divisor,
        "ffn_multipliers": [0.5, 4.0],
        "ffn_with_glu": True,
        "head_dim": head_dim,
        "initializer_range": 0.02,
        "max_context_length": 2048,
        "model_dim": model_dim,
        "normalization_layer_name": "rms_norm",
        "normalize_qk_projections": True,
        "num_gqa_groups": num_gqa_groups,
        "num_transformer_layers": num_layers,
        "qkv_multipliers": [0.5, 1.0],
        "rope_freq_constant": 10000,
        "rope_max_length": 4096,
        "share_input_output_layers": True,
        "transformers_version": "4.39.3",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if per_layer_lists:
        step = head_dim * num_gqa_groups
        q_heads = [make_divisible(model_dim * m, step) // head_dim for m in linspace(0.5, 1.0)]
        config["num_query_heads"] = q_heads
        config["num_kv_heads"] = [q // num_gqa_groups for q in q_heads]
        config["ffn_multipliers"] = linspace(0.5, 4.0)
    return config


def openelm_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensors of Apple's OpenELM checkpoints (no biases, [out, in] layout) for a config with
    per-layer lists."""
    from elm_mlx.models.openelm import make_divisible

    dim, d = config["model_dim"], config["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.token_embeddings.weight": (config["vocab_size"], dim),
        "transformer.norm.weight": (dim,),
    }
    for i in range(config["num_transformer_layers"]):
        hq, hkv = config["num_query_heads"][i], config["num_kv_heads"][i]
        ffn = int(make_divisible(config["ffn_multipliers"][i] * dim, config["ffn_dim_divisor"]))
        p = f"transformer.layers.{i}"
        shapes |= {
            f"{p}.attn_norm.weight": (dim,),
            f"{p}.attn.qkv_proj.weight": ((hq + 2 * hkv) * d, dim),
            f"{p}.attn.q_norm.weight": (d,),
            f"{p}.attn.k_norm.weight": (d,),
            f"{p}.attn.out_proj.weight": (dim, hq * d),
            f"{p}.ffn_norm.weight": (dim,),
            f"{p}.ffn.proj_1.weight": (2 * ffn, dim),
            f"{p}.ffn.proj_2.weight": (dim, ffn),
        }
    return shapes


# ---------------------------------------------------------------------------- HF checkpoints


def _randomize(model: Any, seed: int, dtype: str) -> None:
    """Redraw a torch model's weights (std INIT_STD, norms near 1), rounded to `dtype`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else INIT_STD * noise)
            # Round to the stored dtype so that the fp32 oracle holds exactly the stored values.
            p.copy_(p.to(getattr(torch, dtype)).float())


def _save_torch_model(model: Any, folder: Path, dtype: str, sharded: bool, fmt: str) -> None:
    import torch

    model = model.to(getattr(torch, dtype))
    if fmt == "safetensors":
        model.save_pretrained(folder, max_shard_size="60KB" if sharded else "5GB")
    elif fmt == "bin":
        # A pickled checkpoint like OpenLLaMA's, written with torch.save as transformers 4 did.
        model.config.save_pretrained(folder)
        state = {
            k: v.contiguous()
            for k, v in model.state_dict().items()
            if not (model.config.tie_word_embeddings and k == "lm_head.weight")
        }
        if not sharded:
            torch.save(state, folder / "pytorch_model.bin")
        else:
            names = sorted(state)
            halves = [names[: len(names) // 2], names[len(names) // 2 :]]
            weight_map = {}
            for i, part in enumerate(halves, 1):
                file = f"pytorch_model-{i:05d}-of-{len(halves):05d}.bin"
                torch.save({k: state[k] for k in part}, folder / file)
                weight_map |= dict.fromkeys(part, file)
            total = sum(v.numel() * v.element_size() for v in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")


def _legacy_config(folder: Path, dtype: str) -> None:
    """Rewrite config.json with transformers-4 keys, as the public repos hold them
    (`torch_dtype`, top-level `rope_theta`, `rope_scaling`) instead of transformers-5 ones."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.pop("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope  # e.g. Llama 3.1's {"rope_type": "llama3", ...}
    config.pop("dtype", None)
    config["torch_dtype"] = dtype
    config["transformers_version"] = "4.40.0"
    path.write_text(json.dumps(config, indent=2))


def write_hf_llama(
    folder: Path,
    dtype: str = "float32",
    sharded: bool = False,
    tie: bool = False,
    fmt: str = "safetensors",
    seed: int = 0,
    tokenizer: Path | None = None,
    legacy_config: bool = True,
    **config: Any,
) -> Path:
    """A random LlamaForCausalLM checkpoint (safetensors or pickled `pytorch_model*.bin`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**llama_config(tie_word_embeddings=tie, **config)))
    _randomize(model, seed, dtype)
    _save_torch_model(model, folder, dtype, sharded, fmt)
    if legacy_config:
        _legacy_config(folder, dtype)
    if tokenizer is not None:
        copy_tokenizer_files(tokenizer, folder)
    return folder


def write_hf_olmo(
    folder: Path,
    dtype: str = "float32",
    sharded: bool = False,
    tie: bool = True,
    clip_qkv: float | None = None,
    seed: int = 0,
    tokenizer: Path | None = None,
    legacy_config: bool = True,
    **config: Any,
) -> Path:
    """A random OlmoForCausalLM checkpoint (HF-native OLMo: no norm weights)."""
    import torch
    from transformers import OlmoConfig, OlmoForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    hf_config = OlmoConfig(**olmo_config(tie_word_embeddings=tie, clip_qkv=clip_qkv, **config))
    model = OlmoForCausalLM(hf_config)
    _randomize(model, seed, dtype)
    _save_torch_model(model, folder, dtype, sharded, "safetensors")
    if legacy_config:
        _legacy_config(folder, dtype)
    if tokenizer is not None:
        copy_tokenizer_files(tokenizer, folder)
    return folder


def write_hf_olmo_next(
    folder: Path,
    model_type: str,
    dtype: str = "float32",
    sharded: bool = False,
    tie: bool = False,
    seed: int = 0,
    tokenizer: Path | None = None,
    legacy_config: bool = True,
    **config: Any,
) -> Path:
    """A random Olmo2ForCausalLM or Olmo3ForCausalLM checkpoint (`model_type` "olmo2" or
    "olmo3"; `config`: overrides of `olmo2_config` / `olmo3_config`). `legacy_config` writes
    the transformers-4 keys the public repos hold (`rope_theta`, `rope_scaling`)."""
    import torch
    import transformers

    name = model_type.capitalize()
    Config = getattr(transformers, f"{name}Config")
    Model = getattr(transformers, f"{name}ForCausalLM")
    make_config = olmo2_config if model_type == "olmo2" else olmo3_config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Model(Config(**make_config(tie_word_embeddings=tie, **config)))
    _randomize(model, seed, dtype)
    _save_torch_model(model, folder, dtype, sharded, "safetensors")
    if legacy_config:
        path = folder / "config.json"
        written = json.loads(path.read_text())
        rope = written.get("rope_parameters") or {}
        if "full_attention" in rope:  # OLMo 3: the public repos name the full layers' RoPE
            written["rope_parameters"] = rope["full_attention"]
            path.write_text(json.dumps(written, indent=2))
        _legacy_config(folder, dtype)
    if tokenizer is not None:
        copy_tokenizer_files(tokenizer, folder)
    return folder


def write_safetensors(
    folder: Path, tensors: dict[str, Any], shards: int = 1, metadata: dict | None = None
) -> None:
    """torch tensors -> `model.safetensors`, or `model-0000i-of-0000N.safetensors` shards plus
    `model.safetensors.index.json`, as huggingface_hub's splitter names them."""
    from safetensors.torch import save_file

    metadata = metadata or {"format": "pt"}
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / file), metadata=metadata)
        weight_map |= dict.fromkeys(part, file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_hf_openelm(
    folder: Path,
    dtype: str = "float32",
    sharded: bool = False,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    tokenizer: Path | None = None,
    layout: dict[str, Any] | None = None,
) -> Path:
    """A random OpenELM checkpoint from `openelm_shapes` (no tokenizer: Apple ships none).
    `layout`: the config whose per-layer lists give the shapes, when `config` lacks them."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(config or openelm_config())
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in openelm_shapes(layout or config).items():
        noise = torch.randn(shape, generator=gen)
        value = 1.0 + 0.1 * noise if "norm" in name else INIT_STD * noise
        tensors[name] = value.to(getattr(torch, dtype)).contiguous()
    write_safetensors(folder, tensors, shards=2 if sharded else 1)
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2))
    if tokenizer is not None:
        copy_tokenizer_files(tokenizer, folder)
    return folder


# ---------------------------------------------------------------------------- conversions


def convert_tiny(src: Path, out: Path, dtype: str = "float32", **options: Any) -> Path:
    """`elm convert` through the Python API, quietly (fp32 unless told)."""
    return convert(src, out, ConvertOptions(dtype=dtype, **options), progress=False)


class TinyModels:
    """Builds each tiny HF checkpoint and each conversion once per test session.

    `hf("llama", dtype="bfloat16", sharded=True)` -> HF folder; `converted("llama",
    hf={...}, quantize=True, bits=8)` -> MLX folder; `load(...)` -> (model, tokenizer).
    Llama and OpenELM get the SentencePiece tokenizer, the OLMos the byte-level BPE one; OpenELM's
    HF folder has no tokenizer (as on the hub) and gets it at conversion.
    """

    def __init__(self, root: Path, spm: Path, bpe: Path):
        self.root, self.spm, self.bpe = Path(root), Path(spm), Path(bpe)
        self._hf: dict[str, Path] = {}
        self._converted: dict[str, Path] = {}
        self._loaded: dict[str, Any] = {}

    @staticmethod
    def _key(family: str, kwargs: dict[str, Any]) -> str:
        return family + "".join(f"-{k}={v}" for k, v in sorted(kwargs.items()))

    def hf(self, family: str, **kwargs: Any) -> Path:
        key = self._key(family, kwargs)
        if key not in self._hf:
            folder = self.root / "hf" / f"{family}-{len(self._hf)}"
            if family == "llama":
                write_hf_llama(folder, tokenizer=self.spm, **kwargs)
            elif family == "olmo":
                write_hf_olmo(folder, tokenizer=self.bpe, **kwargs)
            elif family in ("olmo2", "olmo3"):
                write_hf_olmo_next(folder, family, tokenizer=self.bpe, **kwargs)
            elif family == "openelm":
                write_hf_openelm(folder, **kwargs)
            else:
                raise ValueError(family)
            self._hf[key] = folder
        return self._hf[key]

    def converted(self, family: str, hf: dict[str, Any] | None = None, **options: Any) -> Path:
        hf = hf or {}
        key = self._key(family, hf) + "|" + self._key("", options)
        if key not in self._converted:
            if family == "openelm":
                options.setdefault("tokenizer", str(self.spm / "tokenizer.model"))
            out = self.root / "mlx" / f"{family}-{len(self._converted)}"
            convert_tiny(self.hf(family, **hf), out, **options)
            self._converted[key] = out
        return self._converted[key]

    def load(self, family: str, hf: dict[str, Any] | None = None, **options: Any) -> Any:
        """(model, tokenizer) of `converted(...)`, through our loader."""
        from elm_mlx import load

        path = self.converted(family, hf, **options)
        if path not in self._loaded:
            self._loaded[path] = load(path)
        return self._loaded[path]


# ---------------------------------------------------------------------------- MLX folders
