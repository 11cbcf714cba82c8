"""Load a model folder (ours, mlx-lm's, or an HF safetensors checkpoint) into MLX."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import hub
from .errors import ConfigError, UnsupportedModelError, WeightsError
from .lora import load_adapters
from .model_folder import quantization_of, read_config, read_weights
from .models import CausalLM, get_family
from .tokenizer import Tokenizer, load_tokenizer


@dataclass
class LoadedModel:
    model: CausalLM
    config: dict[str, Any]
    path: Path


def build_model(config: dict[str, Any], source: Path | str = "config.json") -> CausalLM:
    """An uninitialised model for a config (weights random, quantization not applied)."""
    try:
        family = get_family(config.get("model_type"))
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{source}: {e}") from e
    try:
        args = family.args(config)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{source}: invalid {config.get('model_type')} config: {e}") from e
    return family.Model(args)


def apply_quantization(
    model: nn.Module, quant: dict[str, Any], has_scales: set[str] | None = None
) -> None:
    """Swap Linear/Embedding layers for quantized ones.

    With `has_scales` (module paths whose `.scales` a checkpoint holds), exactly those layers
    are quantized, which is how a folder with some layers left in float loads back.
    """
    group, bits, mode = quant["group_size"], quant["bits"], quant.get("mode", "affine")

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized"):
            return False
        override = quant.get(path)
        if override is False:
            return False
        if has_scales is not None:
            if path not in has_scales:
                return False
        elif module.weight.shape[-1] % group != 0:
            return False
        if isinstance(override, dict):
            return {"group_size": override["group_size"], "bits": override["bits"], "mode": mode}
        return True

    nn.quantize(model, group_size=group, bits=bits, mode=mode, class_predicate=predicate)


def default_compute_dtype() -> mx.Dtype | None:
    """float32 on the CPU backend, where half-precision kernels are 3-30x slower than fp32
    (see BENCHMARKS.md); on Metal, the stored dtype."""
    return mx.float32 if mx.default_device().type == mx.DeviceType.cpu else None


def load_model(
    model_dir: Path, strict: bool = True, compute_dtype: mx.Dtype | str | None = "auto"
) -> LoadedModel:
    """Build the model of `model_dir` and load its weights.

    `compute_dtype` upcasts half-precision tensors (quantization scales included);
    "auto" picks `default_compute_dtype()`, None keeps the stored dtypes.
    """
    config = read_config(model_dir)
    model = build_model(config, model_dir / "config.json")
    weights = model.sanitize(read_weights(model_dir))
    if compute_dtype == "auto":
        compute_dtype = default_compute_dtype()
    if compute_dtype is not None:
        half = (mx.float16, mx.bfloat16)
        weights = {k: v.astype(compute_dtype) if v.dtype in half else v for k, v in weights.items()}
    if quant := quantization_of(config):
        scales = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}
        apply_quantization(model, quant, scales)
    try:
        model.load_weights(list(weights.items()), strict=strict)
    except ValueError as e:
        raise WeightsError(f"{model_dir}: weights do not match config.json: {e}") from e
    model.eval()
    mx.eval(model.parameters())
    return LoadedModel(model, config, model_dir)


def load(
    path_or_repo: str | os.PathLike,
    revision: str | None = None,
    token: str | None = None,
    adapter_path: str | os.PathLike | None = None,
    compute_dtype: mx.Dtype | str | None = "auto",
) -> tuple[CausalLM, Tokenizer]:
    """`model, tokenizer = load(path_or_repo)`, as in mlx-lm (see `load_model` for dtypes)."""
    model_dir = hub.resolve(path_or_repo, revision, token)
    loaded = load_model(model_dir, compute_dtype=compute_dtype)
    eos = loaded.config.get("eos_token_id")
    tokenizer = load_tokenizer(model_dir, [eos] if isinstance(eos, int) else eos)
    if adapter_path is not None:
        load_adapters(loaded.model, Path(adapter_path))
    return loaded.model, tokenizer
