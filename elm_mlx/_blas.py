"""Use an optimized BLAS on Linux.

The Linux `mlx[cpu]` wheel bundles the reference BLAS, about 100x slower on a 2048x2048 matmul
than OpenBLAS. Loading OpenBLAS with RTLD_GLOBAL *before* mlx is imported makes the dynamic
linker resolve MLX's BLAS symbols to it. This module imports nothing from mlx on purpose.
Set ELM_BLAS=reference to keep the bundled one.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_loaded: str | None = None


def use_openblas() -> str | None:
    """Load OpenBLAS globally if present and mlx is not yet imported; return its path."""
    global _loaded
    if _loaded or sys.platform != "linux" or os.environ.get("ELM_BLAS") == "reference":
        return _loaded
    candidate = next((c for c in OPENBLAS_CANDIDATES if Path(c).exists()), None)
    if candidate is None:
        return None
    if "mlx.core" in sys.modules:
        # Too late: mlx already bound the bundled BLAS (loading OpenBLAS now changes nothing).
        if not _openblas_mapped():
            warnings.warn(
                "mlx was imported before elm_mlx, so MLX keeps its bundled reference BLAS "
                "(matmuls ~20-100x slower on CPU). Import elm_mlx first, or run with "
                f"LD_PRELOAD={candidate}",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
    _loaded = candidate
    return candidate


def _openblas_mapped() -> bool:
    maps = Path("/proc/self/maps")
    return maps.exists() and "openblas" in maps.read_text()


def describe() -> str:
    """Which BLAS the MLX CPU backend uses in this process, for --verbose output."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    if _loaded or _openblas_mapped():
        return f"OpenBLAS ({_loaded or 'preloaded'})"
    return "reference BLAS bundled with mlx (slow: apt-get install libopenblas0-pthread)"
