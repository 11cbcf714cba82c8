"""`fuse(...)`: merge a LoRA adapter into its base model and write a model folder (the
layout `elm convert` writes). A quantized base is re-quantized, or dequantized to float."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .. import hub
from ..dequantize import QUANTIZED, float_layer
from ..loader import load_model
from ..lora import load_adapters, merge_lora
from ..model_folder import (
    ShardWriter,
    check_output,
    copy_tokenizer,
    quantization_of,
    staging_folder,
    write_config,
)


def dequantize_model(model: nn.Module) -> int:
    """Swap every quantized layer for a float one; returns how many were swapped."""
    swaps = [
        (name, float_layer(m)) for name, m in model.named_modules() if isinstance(m, QUANTIZED)
    ]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def fuse(
    model: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dequantize: bool = False,
    force: bool = False,
    max_shard_bytes: int = 5 << 30,
) -> Path:
    """Write base + adapter as one model folder at `out` and return its path."""
    out = Path(out).expanduser()
    model_dir = hub.resolve(model)
    check_output(out, force, source=model_dir)
    loaded = load_model(model_dir, compute_dtype=None)  # keep the stored dtypes
    load_adapters(loaded.model, Path(adapter))
    merge_lora(loaded.model, dequantize)
    config = dict(loaded.config)
    if dequantize:
        dequantize_model(loaded.model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    elif quant := quantization_of(config):
        config["quantization"] = config["quantization_config"] = quant

    with staging_folder(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, tensor in tree_flatten(loaded.model.parameters()):
            writer.add(name, tensor)
        writer.close()
        write_config(tmp, config)
        copy_tokenizer(model_dir, tmp)
    mx.clear_cache()
    return out
