"""What a command left on disk: a folder's tensors, and the staging folders beside its output."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx


def tensors_of(folder: Path) -> dict[str, mx.array]:
    """Every tensor of the folder's safetensors files, by name."""
    out: dict[str, mx.array] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= mx.load(str(f))
    return out


def leftovers(out: Path) -> list[str]:
    """Names of the hidden staging folders (".out.*") a write to `out` would leave behind."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
