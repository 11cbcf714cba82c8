"""Model families, one module per HF `model_type`."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import UnsupportedModelError
from .base import CausalLM, KVCache, make_cache

# model_type (config.json) -> module in this package
MODEL_TYPES = {"openelm": "openelm", "olmo": "olmo", "llama": "llama"}

__all__ = ["MODEL_TYPES", "CausalLM", "KVCache", "get_family", "make_cache"]


def get_family(model_type: str | None) -> ModuleType:
    """The module implementing `model_type`, with its `ModelArgs` and `Model`."""
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; elm-mlx runs "
            + ", ".join(sorted(MODEL_TYPES))
            + ": give a checkpoint of one of these families"
        )
    return importlib.import_module(f"{__name__}.{MODEL_TYPES[model_type]}")
