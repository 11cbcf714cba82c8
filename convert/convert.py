"""Hugging Face checkpoint -> MLX model folder (the layout mlx-lm writes and reads)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import hub
from ..errors import OptionError, WeightsError
from ..loader import apply_quantization, build_model
from ..model_folder import (
    ShardWriter,
    check_output,
    copy_tokenizer,
    read_config,
    staging_folder,
    write_config,
)
from ..models import family_of
from ..quantize import (
    CalibrationConfig,
    DistillConfig,
    Setting,
    check_budget,
    default_texts,
    read_dataset,
    read_text,
)
from .calibrated import QuantizationReport, load_float, model_tensors, quantize_calibrated
from .hf_checkpoint import checkpoint_files, iter_tensors
from .tokenizer_files import find_tokenizer

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class ConvertOptions:
    """Every conversion option and its default (the CLI reads its defaults from here)."""

    dtype: str | None = None  # None: the family's default (float16; bfloat16 for OpenELM-3B)
    quantize: bool = False
    bits: int = 4
    group_size: int = 64
    tokenizer: str | None = None
    revision: str | None = None
    hf_token: str | None = None
    force: bool = False
    max_shard_bytes: int = 5 << 30
    calibrate: bool = False  # GPTQ against calibration text instead of rounding to nearest
    calibration_files: tuple[str, ...] = ()  # none: pydoc and elm's English (`default_texts`)
    calibration_dataset: str | None = None  # a hub dataset id (or "id:config"), when online
    own_text: bool | None = None  # half the windows the model's own; None: without given text
    bpw: float | None = None  # mixed precision to this average bits per weight (calibrates)
    tune_seconds: float = DistillConfig.seconds  # then tune to the float model (calibrates)
    asymmetric: float = CalibrationConfig.asymmetric  # GPTAQ's share of the float target

    def validate(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise OptionError("dtype", f"must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.bits not in BITS:
            raise OptionError("bits", f"must be one of {BITS}, not {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise OptionError("group_size", f"must be one of {GROUP_SIZES}, not {self.group_size}")
        if self.tune_seconds < 0:
            raise OptionError("tune_seconds", f"must be >= 0, got {self.tune_seconds:g}")
        if not 0 <= self.asymmetric <= 1:
            raise OptionError("asymmetric", f"must be between 0 and 1, got {self.asymmetric:g}")
        if self.tune_seconds and not self.quantize:
            raise OptionError("tune_seconds", "needs --quantize (it tunes the quantized model)")
        choices = ("calibrate", "calibration_files", "calibration_dataset", "own_text", "bpw")
        for name in (*choices, "asymmetric"):  # (0.0 == False: an unset share passes)
            if getattr(self, name) not in (None, False, ()) and not self.quantize:
                flag = name.removesuffix("s")  # the flag, once per file
                raise OptionError(flag, "needs --quantize (it chooses how to quantize)")

    @property
    def given_text(self) -> bool:
        return bool(self.calibration_files) or self.calibration_dataset is not None

    @property
    def with_own_text(self) -> bool:
        """Half the calibration windows written by the model: by default without given text."""
        return not self.given_text if self.own_text is None else self.own_text

    @property
    def calibrated(self) -> bool:
        return (
            self.calibrate
            or self.bpw is not None
            or self.given_text
            or self.tune_seconds > 0
            or self.asymmetric > 0
        )

    def calibration_texts(self) -> list[tuple[str, str]]:
        """(text, name) of each text to calibrate on: the files, the dataset, or the defaults."""
        texts = [read_text(f) for f in self.calibration_files]
        if self.calibration_dataset is not None:
            chars = CalibrationConfig().dataset_characters
            texts.append(read_dataset(self.calibration_dataset, chars))
        return texts or default_texts()


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    options: ConvertOptions | None = None,
    progress: bool = True,
    report: Callable[[QuantizationReport], None] | None = None,
) -> Path:
    """Convert `src` (local HF folder or hub id) into an MLX folder at `out`.

    The folder appears only when everything is written: work happens in a hidden temporary
    sibling that is renamed at the end and removed on any error. A calibrated conversion hands
    its `QuantizationReport` (held-out perplexity, bits per weight) to `report`.
    """
    options = options or ConvertOptions()
    options.validate()
    out = Path(out).expanduser()
    check_output(out, options.force)
    texts = None
    if options.calibrated:
        texts = options.calibration_texts()

    source = hub.resolve(src, options.revision, options.hf_token)
    config = read_config(source)
    model = build_model(config, source / "config.json")
    family = family_of(model)
    tokenizer = find_tokenizer(
        source, family, options.tokenizer, options.revision, options.hf_token
    )
    files = checkpoint_files(source)
    dtype_name = options.dtype or family.default_dtype(model.args)
    dtype = DTYPES[dtype_name]

    # The model skeleton is the name/shape table: its parameters are lazy, never computed.
    float_shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    if options.bpw is not None:
        check_budget(model, options.bpw, dtype)
    if texts is not None:
        with staging_folder(out) as tmp:
            copy_tokenizer(tokenizer, tmp)
            load_float(model, _checkpoint_tensors(model, files, float_shapes, source), dtype)
            quant, result = quantize_calibrated(
                model,
                texts,
                options.with_own_text,
                tmp,
                Setting(options.bits, options.group_size),
                options.bpw,
                dtype,
                progress,
                DistillConfig(seconds=options.tune_seconds),
                CalibrationConfig(asymmetric=options.asymmetric),
            )
            writer = ShardWriter(tmp, options.max_shard_bytes)
            for name, tensor in model_tensors(model, dtype):
                writer.add(name, tensor)
            writer.close()
            write_config(tmp, _output_config(config, model, dtype_name, quant))
        if report is not None:
            report(result)
        return out

    quant = None
    if options.quantize:
        quant = {"group_size": options.group_size, "bits": options.bits, "mode": "affine"}
        apply_quantization(model, quant)
    quantized = {
        k[: -len(".scales")] for k, _ in tree_flatten(model.parameters()) if k.endswith(".scales")
    }

    with staging_folder(out) as tmp:
        writer = ShardWriter(tmp, options.max_shard_bytes)
        bar = _progress(len(float_shapes), progress)
        for name, tensor in _checkpoint_tensors(model, files, float_shapes, source):
            tensor = tensor.astype(dtype)
            module = name[: -len(".weight")]
            if name.endswith(".weight") and module in quantized:
                wq, scales, biases = mx.quantize(tensor, options.group_size, options.bits)
                writer.add(name, wq)
                writer.add(f"{module}.scales", scales)
                writer.add(f"{module}.biases", biases)
            else:
                writer.add(name, tensor)
            bar.update(1)
        bar.close()
        writer.close()
        write_config(tmp, _output_config(config, model, dtype_name, quant))
        copy_tokenizer(tokenizer, tmp)
    return out


def _checkpoint_tensors(
    model: Any, files: list[Path], shapes: dict[str, tuple], source: Path
) -> Iterator[tuple[str, mx.array]]:
    """The checkpoint's tensors under the model's names, each checked against the config."""
    seen: set[str] = set()
    for path in files:
        for raw_name, raw in iter_tensors(path):
            for name, tensor in model.sanitize({raw_name: raw}).items():
                _check(name, tensor, shapes, seen, path)
                seen.add(name)
                yield name, tensor
    if missing := sorted(set(shapes) - seen):
        raise WeightsError(
            f"{source}: the checkpoint lacks {len(missing)} tensors the config needs, "
            f"e.g. {', '.join(missing[:3])}; is the download complete?"
        )


def _check(name: str, tensor: mx.array, shapes: dict[str, tuple], seen: set[str], path: Path):
    if name not in shapes:
        raise WeightsError(f"{path}: unexpected tensor {name}; does config.json match the weights?")
    if name in seen:
        raise WeightsError(f"{path}: tensor {name} appears twice in the checkpoint")
    if tuple(tensor.shape) != shapes[name]:
        raise WeightsError(
            f"{path}: tensor {name} has shape {list(tensor.shape)} but config.json implies "
            f"{list(shapes[name])}; the config and the weights do not belong together"
        )


def _output_config(config: dict[str, Any], model: Any, dtype: str, quant: dict | None) -> dict:
    # Write every derived field (per-layer OpenELM lists, tie_word_embeddings, head_dim...) so
    # that mlx-lm, whose defaults differ from HF's, reads the same model.
    out = {**config, **model.args.to_dict(), "torch_dtype": dtype}
    if "dtype" in out:  # transformers >= 5 writes "dtype" instead of "torch_dtype"
        out["dtype"] = dtype
    out.pop("quantization_config", None)
    if quant:
        out["quantization"] = dict(quant)
        out["quantization_config"] = dict(quant)
    return out


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI, captured output)
    disable = None if enabled else True
    return tqdm(total=total, desc="converting", unit="tensor", disable=disable, leave=False)
