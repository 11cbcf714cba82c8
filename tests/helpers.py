"""The tiny models and data the tests build, one section per kind:

- HF checkpoints (`write_hf_*`, cached per session by `TinyModels`): a random checkpoint in the
  exact Hugging Face layout of its family (tensor names, shapes and config keys of the public
  repos): Llama and OLMo (1, 2, 3) through transformers' own `save_pretrained` (or `torch.save` for a
  pickled `.bin`), OpenELM by hand from the tensor table of Apple's repos (`openelm_shapes`),
  since its modeling code is remote. Weights are drawn with a larger spread than HF's init (std
  0.1, norm weights around 1) so that a wrong rotation, norm or clamp changes the logits by far
  more than the comparison tolerance;
- MLX folders written straight from our modules (whose parameter names are the HF ones): for
  training (`write_lora_model`, `write_jsonl`), speculative decoding (`spec_model`) and chat
  (`write_tiny_chat_model`); weights are seeded, so each builder gives the same model each time;
- local lm-eval tasks (`write_eval_tasks`) and the real SmolLM2 example (`load_smollm2_example`,
  and its float32 conversion `smollm2_fp32_folder`).

What the tests compare these with (transformers, mlx-lm, exact distributions) is in oracles.py.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np
from elm_mlx.convert import ConvertOptions, convert
from mlx.utils import tree_flatten

from elm_mlx.engine.config import GenerationConfig
from elm_mlx.engine.sampling import make_transform
from elm_mlx.loader import apply_quantization, build_model
from elm_mlx.model_folder import SPM_TOKENIZER_CONFIG
from elm_mlx.models import CausalLM

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
BPE_EOS = "<|endoftext|>"
INIT_STD = 0.1


# ---------------------------------------------------------------------------- tokenizers


def train_spm_tokenizer(folder: Path, vocab_size: int = 400, text: str | None = None) -> Path:
    """A Llama-style SentencePiece BPE tokenizer (unk 0, BOS 1, EOS 2, byte fallback) plus the
    tokenizer_config.json a Llama repo ships; BOS is prepended on encode. `text` is the
    training corpus (default: this module's CORPUS and the Zephyr role markers)."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    if text is None:
        text = "\n".join(CORPUS * 20) + "\n<|user|> <|assistant|> <|system|>\n"
    corpus.write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(SPM_TOKENIZER_CONFIG, indent=2))
    return folder


def train_bpe_tokenizer(folder: Path, vocab_size: int = 320) -> Path:
    """An OLMo-style (GPT-NeoX) byte-level BPE tokenizer.json: `<|endoftext|>` (id 0) is EOS,
    `<|padding|>` (id 1) pad, no BOS, nothing added on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS, "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "GPTNeoXTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": None,
        "eos_token": BPE_EOS,
        "unk_token": BPE_EOS,
        "pad_token": "<|padding|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        if (Path(src) / name).exists():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


# ---------------------------------------------------------------------------- HF configs


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


def random_ids(n: int, vocab: int = 400, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


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

SPEC_VOCAB = 320
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
SPEC_CORPUS = CORPUS[:3] + CORPUS[6:7]  # the fox, the journey, to be, one two three


def spec_tokenizer(folder: Path, vocab: int = SPEC_VOCAB) -> Path:
    """A BPE SentencePiece model (UNK 0, BOS 1, EOS 2) and its tokenizer_config.json."""
    return train_spm_tokenizer(folder, vocab, "\n".join(SPEC_CORPUS * 20) + "\n")


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

CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_CORPUS = [
    "hello there, how are you today?",
    "I am fine, thank you. What can I do for you?",
    "tell me about the weather in paris and rome",
    "the quick brown fox jumps over the lazy dog",
    "my name is alice and I like green apples",
    "remember the word banana, please",
    "which word did I ask you to remember?",
    "you are a helpful assistant who answers briefly",
    "User: Assistant: <|user|> <|assistant|> <|system|>",
]
CHAT_KINDS = ("chatml", "zephyr", "plain")
CHAT_BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_chat_bpe(folder: Path, chat_template: str | None) -> tuple[int, int]:
    """A byte-level BPE tokenizer.json over CHAT_CORPUS; returns (EOS id, vocab size). EOS is
    `<|im_end|>` with a template, `<|endoftext|>` without."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=CHAT_BPE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CHAT_CORPUS * 10, trainer)
    tok.save(str(folder / "tokenizer.json"))
    eos = "<|im_end|>" if chat_template else "<|endoftext|>"
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": eos,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.token_to_id(eos), tok.get_vocab_size()


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
