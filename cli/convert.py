"""`elm convert`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..convert import ConvertOptions, convert
from ..quantize import DistillConfig

DEFAULTS = ConvertOptions()


def command(
    src: Annotated[str, typer.Argument(help="Hugging Face hub id or local checkpoint folder.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (must not exist).")],
    dtype: Annotated[
        str | None,
        typer.Option(
            help="float16, bfloat16 or float32.", show_default="float16; bfloat16 for OpenELM-3B"
        ),
    ] = DEFAULTS.dtype,
    quantize: Annotated[
        bool, typer.Option("--quantize", "-q", help="Quantize weights.")
    ] = DEFAULTS.quantize,
    bits: Annotated[
        int, typer.Option(help="Bits per weight when quantizing: 4 or 8.")
    ] = DEFAULTS.bits,
    group_size: Annotated[
        int, typer.Option(help="Quantization group size: 32, 64 or 128.")
    ] = DEFAULTS.group_size,
    tokenizer: Annotated[
        str | None, typer.Option(help="Folder, tokenizer.model or hub id of the tokenizer to ship.")
    ] = DEFAULTS.tokenizer,
    revision: Annotated[
        str | None, typer.Option(help="Hub revision (branch, tag, commit).")
    ] = DEFAULTS.revision,
    hf_token: Annotated[
        str | None, typer.Option(help="Hub token for gated repos (default: $HF_TOKEN).")
    ] = DEFAULTS.hf_token,
    force: Annotated[
        bool, typer.Option(help="Replace an existing output folder.")
    ] = DEFAULTS.force,
    calibrate: Annotated[
        bool,
        typer.Option(
            help="With --quantize: fit the quantized weights to calibration text (GPTQ) instead "
            "of rounding each to nearest."
        ),
    ] = DEFAULTS.calibrate,
    calibration_file: Annotated[
        list[Path] | None,
        typer.Option(
            help="UTF-8 text to calibrate on (repeatable: the windows are shared); each tail "
            "is held out for perplexity.",
            show_default="the Python documentation and elm's general English",
        ),
    ] = None,
    calibration_dataset: Annotated[
        str | None,
        typer.Option(
            help="A dataset to calibrate on too, ID or ID:CONFIG: a hub id (needs a network "
            "connection and `pip install 'elm-mlx[hub]'`) or a local dataset folder; the text "
            "of its train split."
        ),
    ] = DEFAULTS.calibration_dataset,
    own_text: Annotated[
        bool | None,
        typer.Option(
            "--own-text/--no-own-text",
            help="Calibrate half on text the float model writes itself (so that no one "
            "domain dominates).",
            show_default="with the default text, not with a file or dataset",
        ),
    ] = DEFAULTS.own_text,
    bpw: Annotated[
        float | None,
        typer.Option(
            help="With --quantize: mixed precision, more bits where they help most, to this "
            "average bits per weight (scales and biases included); calibrates."
        ),
    ] = DEFAULTS.bpw,
    tune_seconds: Annotated[
        float,
        typer.Option(
            help="With --quantize: then tune the quantized model to the float model for up to "
            f"this many seconds: {DistillConfig.block_share:.0%} of them block by block as "
            "calibration goes (each block's norms' gains to the float model's activations, "
            "then its scales and biases to the float block's outputs), the rest end to end "
            "(scales and biases to the next-token distributions); kept only where they do "
            "better on windows held out; 0: no tuning. Calibrates."
        ),
    ] = DEFAULTS.tune_seconds,
    asymmetric: Annotated[
        float,
        typer.Option(
            help="With --quantize: fit each layer this share of the way (0 to 1) to the float "
            "model's outputs, not to its own weights on the quantized model's inputs (GPTAQ): "
            "less loss on the calibration text's domain, for 1.3-2x the time. For text of "
            "your own domain (--calibration-file); 0: GPTQ. Calibrates."
        ),
    ] = DEFAULTS.asymmetric,
) -> None:
    """Convert a Hugging Face checkpoint into an MLX model folder (fp16/bf16/fp32, or 4/8-bit).

    The folder also loads in mlx-lm. It appears only once conversion has finished.
    """
    options = ConvertOptions(
        dtype=dtype,
        quantize=quantize,
        bits=bits,
        group_size=group_size,
        tokenizer=tokenizer,
        revision=revision,
        hf_token=hf_token,
        force=force,
        calibrate=calibrate,
        calibration_files=tuple(str(f) for f in calibration_file or ()),
        calibration_dataset=calibration_dataset,
        own_text=own_text,
        bpw=bpw,
        tune_seconds=tune_seconds,
        asymmetric=asymmetric,
    )
    path = convert(src, out, options, report=lambda r: typer.echo(r.summary(), err=True))
    typer.echo(f"wrote {path}", err=True)
