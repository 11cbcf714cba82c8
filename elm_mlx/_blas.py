"""Use an optimized BLAS on Linux.

The Linux `mlx[cpu]` wheel bundles the reference BLAS, about 100x slower on a 2048x2048 matmul
than OpenBLAS. Loading OpenBLAS with RTLD_GLOBAL *before* mlx is imported makes the dynamic
linker resolve MLX's BLAS symbols to it. After the import it is too late: Python opens
extension modules with RTLD_NOW (sys.getdlopenflags()), so libmlx's BLAS symbols are bound to
the bundled library as mlx.core loads (LD_DEBUG=bindings shows it), and a library loaded later
is never consulted. Only LD_PRELOAD, set before Python starts, works in any import order.
This module imports nothing from mlx on purpose. Set ELM_BLAS=reference to keep the bundled one.
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
            warnings.warn(too_late(candidate), RuntimeWarning, stacklevel=3)
        return None
    ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
    _loaded = candidate
    return candidate


def too_late(candidate: str) -> str:
    return (
        "mlx was imported before elm_mlx, so MLX is bound to its bundled reference BLAS "
        "(matmuls 20-100x slower on this CPU) and elm can no longer change that. Put a plain "
        "`import elm_mlx` line above every `import mlx...` (and `import mlx_lm`) of your "
        "program; import sorting (isort, ruff) keeps it there, while it moves a "
        "`from elm_mlx import ...` line below them. Or start Python with "
        f"LD_PRELOAD={candidate}"
    )


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
