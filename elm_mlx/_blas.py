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
    if "mlx.core" in sys.modules:
        return None  # too late: mlx already bound its BLAS
    for candidate in OPENBLAS_CANDIDATES:
        if Path(candidate).exists():
            ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
            _loaded = candidate
            return candidate
    return None


def describe() -> str:
    """Which BLAS the MLX CPU backend uses in this process, for --verbose output."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    maps = Path("/proc/self/maps")
    libs = {line.split()[-1] for line in maps.read_text().splitlines() if "blas" in line}
    if _loaded or any("openblas" in lib for lib in libs):
        return f"OpenBLAS ({_loaded or 'preloaded'})"
    return "reference BLAS bundled with mlx (slow: apt-get install libopenblas0-pthread)"
