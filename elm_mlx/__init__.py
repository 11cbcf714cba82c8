"""elm-mlx: run and fine-tune small open language models on Apple silicon with MLX."""

from ._blas import use_openblas

# Deliberate, and the only import-time effect: the BLAS must be chosen before mlx loads.
use_openblas()

from .generate import GenerationConfig, GenerationResponse, generate, stream_generate  # noqa: E402
from .loader import load  # noqa: E402

__version__ = "0.1.0"
__all__ = ["GenerationConfig", "GenerationResponse", "generate", "load", "stream_generate"]
