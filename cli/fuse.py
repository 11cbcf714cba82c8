"""`elm fuse`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def command(
    model: Annotated[str, typer.Option("--model", "-m", help="Base model folder or hub id.")],
    adapter: Annotated[Path, typer.Option(help="Adapter folder from `elm finetune`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the fused model.")],
    dequantize: Annotated[
        bool, typer.Option(help="Write float weights even if the base is quantized.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace -o if it exists.")] = False,
) -> None:
    """Merge a LoRA adapter into its base model and write a model folder.

    A quantized base is re-quantized with its own settings unless --dequantize.
    """
    from ..train.fuse import fuse

    path = fuse(model, adapter, out, dequantize=dequantize, force=force)
    typer.echo(f"wrote {path}")
