"""The converter: Hugging Face checkpoints -> MLX model folders."""

from .convert import ConvertOptions, convert

__all__ = ["ConvertOptions", "convert"]
