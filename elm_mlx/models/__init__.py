"""Model families, one module per HF `model_type`, each declaring a `FAMILY` (see `Family`)."""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import UnsupportedModelError
from .base import PREFILL_STEP_SIZE, CausalLM, Family, KVCache, TokenizerSource, make_cache

__all__ = [
    "PREFILL_STEP_SIZE",
    "CausalLM",
    "Family",
    "KVCache",
    "TokenizerSource",
    "context_length",
    "family_of",
    "get_family",
    "make_cache",
    "model_types",
    "vocab_size",
]
_NOT_FAMILIES = {"base", "rope"}  # shared modules of this package


def model_types() -> list[str]:
    """Every supported model_type: the family modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_FAMILIES)


def get_family(model_type: str | None) -> Family:
    """The family whose module is named `model_type`."""
    known = model_types()
    if model_type not in known:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; elm-mlx runs {', '.join(known)}: "
            "give a checkpoint of one of these families"
        )
    return importlib.import_module(f"{__name__}.{model_type}").FAMILY


def family_of(model: CausalLM) -> Family:
    return get_family(model.model_type)


def vocab_size(model: CausalLM) -> int:
    """The width of the model's logits, from its arguments (every family names it so)."""
    return model.args.vocab_size


def context_length(model: CausalLM) -> int:
    """The longest sequence the model was trained for (the key its family declares)."""
    return family_of(model).context_length(model.args)
