"""A hub id given where a model folder is expected is converted once into a local cache folder
(quantized to 4 bits unless asked otherwise) and reused from then on, offline included."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import safe_open

from .. import hub
from ..model_folder import quantization_of, read_config
from .convert import ConvertOptions, convert

DEFAULT_BITS = 4


def cache_root() -> Path:
    """`$ELM_MLX_CACHE`, or `~/.cache/elm-mlx`."""
    root = os.environ.get("ELM_MLX_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "elm-mlx"


def cached_model_dir(repo_id: str, quantize: bool = True, bits: int = DEFAULT_BITS) -> Path:
    """Where the conversion of `repo_id` with these options lives, e.g.
    `~/.cache/elm-mlx/models/apple--OpenELM-270M-Instruct-4bit`."""
    suffix = f"{bits}bit" if quantize else "fp16"
    return cache_root() / "models" / f"{repo_id.replace('/', '--')}-{suffix}"


def is_mlx_folder(folder: Path) -> bool:
    """A folder `elm` can load as is: ours or mlx-lm's (mlx-lm writes `format: mlx` too)."""
    if quantization_of(read_config(folder)):
        return True
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return False
    with safe_open(str(files[0]), framework="numpy") as f:
        return (f.metadata() or {}).get("format") == "mlx"


def ensure_model(
    model: str,
    quantize: bool = True,
    bits: int = DEFAULT_BITS,
    token: str | None = None,
    progress: bool = True,
) -> Path:
    """A loadable folder for `model`: a local folder as is; a hub id converted on first use
    (`elm convert --quantize --bits BITS`, or float16 without `quantize`) into
    `cached_model_dir`, then reused. A hub repo that already holds MLX weights is used as
    downloaded. Hub failures (unreachable, gated, missing) raise ModelNotFoundError."""
    path = Path(model).expanduser()
    if path.exists() or not hub.looks_like_repo_id(model):
        return hub.resolve(model)
    out = cached_model_dir(model, quantize, bits)
    if (out / "config.json").exists():
        return out
    source = hub.resolve(model, token=token)
    if is_mlx_folder(source):
        return source
    options = ConvertOptions(quantize=quantize, bits=bits, hf_token=token)
    return convert(source, out, options, progress=progress)
