"""elm-mlx: run, evaluate, serve and fine-tune small open language models with MLX.

The public names below are imported on first use, so that `import elm_mlx.convert` (or any
other part) loads only what it needs.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._blas import use_openblas

# Deliberate, and the only import-time effect: the BLAS must be chosen before mlx loads.
use_openblas()

__version__ = "0.1.0"
_EXPORTS = {
    "BatchGenerator": "engine.scheduler",
    "GenerationConfig": "engine.config",
    "GenerationResponse": "engine.generation",
    "PrefillPolicy": "engine.prompt_prefill",
    "batch_generate": "engine.scheduler",
    "generate": "engine.generation",
    "stream_generate": "engine.generation",
    "load": "loader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
