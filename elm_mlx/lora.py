"""LoRA adapters: low-rank updates on a frozen base (float or quantized, i.e. QLoRA).

Parameter names, shapes and `adapter_config.json` follow mlx-lm (`lora_a` (in, r), `lora_b`
(r, out), the base layer under `.linear`), so `mlx_lm.load(..., adapter_path=...)` loads the
adapters we save and we load theirs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .dequantize import dequantized_weight
from .errors import AdapterError, OptionError
from .model_folder import replaced_file
from .models import family_of

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


@dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how; `scale` = alpha / rank multiplies the low-rank update."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    num_layers: int = -1  # the last N blocks; -1: all (as in mlx-lm)
    targets: tuple[str, ...] | None = None  # None: every linear layer of the family

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        if self.rank < 1:
            raise OptionError("rank", f"must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise OptionError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.num_layers == 0 or self.num_layers < -1:
            raise OptionError("num_layers", f"must be >= 1 or -1 (all), got {self.num_layers}")


class LoRALinear(nn.Module):
    """y = linear(x) + scale * dropout(x) @ A @ B, with B = 0 at first so y equals the base."""

    @staticmethod
    def from_base(
        linear: nn.Linear | nn.QuantizedLinear, rank: int, scale: float, dropout: float = 0.0
    ) -> LoRALinear:
        out_dims, in_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            in_dims = in_dims * 32 // linear.bits  # packed uint32 columns
        lora = LoRALinear(in_dims, out_dims, rank, scale, dropout)
        lora.linear = linear
        return lora

    def __init__(self, in_dims: int, out_dims: int, rank: int, scale: float, dropout: float):
        super().__init__()
        self.linear = nn.Linear(in_dims, out_dims, bias=False)
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))  # fp32
        self.lora_b = mx.zeros((rank, out_dims))

    enabled = True  # False: the base layer alone (see `adapters_off`)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        if not self.enabled:
            return y
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b  # (..., out), fp32
        return y + (self.scale * z).astype(x.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """The base layer with scale * (A @ B)^T added to its weight, re-quantized if it was."""
        base = self.linear
        quantized = isinstance(base, nn.QuantizedLinear)
        weight = dequantized_weight(base) if quantized else base.weight  # (out, in)
        delta = (self.scale * self.lora_b.T) @ self.lora_a.T  # (out, in)
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in base)
        fused.weight = (weight.astype(mx.float32) + delta).astype(weight.dtype)
        if "bias" in base:
            fused.bias = base.bias
        if quantized and not dequantize:
            return nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits, base.mode)
        return fused


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Run the base model alone, on the same weights: DPO's reference model without a copy.

    Read when a function is traced, so a compiled step may call the model both ways."""
    layers = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def resolve_targets(model: nn.Module, targets: tuple[str, ...] | None) -> tuple[str, ...]:
    """Targets as paths inside a block; a short name such as `q_proj` matches its last part."""
    family = family_of(model).lora_targets
    if targets is None:
        return family
    resolved = []
    for name in targets:
        matches = [t for t in family if t == name or t.split(".")[-1] == name]
        if not matches:
            short = ", ".join(t.split(".")[-1] for t in family)
            raise OptionError(
                "targets",
                f"names no layer {name!r} of a {model.model_type} block; choose among {short}",
            )
        resolved += [m for m in matches if m not in resolved]
    return tuple(resolved)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze the model and wrap the target layers of the last blocks; returns their paths."""
    config.validate()
    keys = resolve_targets(model, config.targets)
    n_blocks = len(model.layers)
    if config.num_layers > n_blocks:
        raise OptionError("num_layers", f"is {config.num_layers} but the model has only {n_blocks}")
    first = 0 if config.num_layers == -1 else n_blocks - config.num_layers
    model.freeze()
    wrapped = []
    for i in range(first, n_blocks):
        block = model.layers[i]
        modules = dict(block.named_modules())
        updates = []
        for key in keys:
            layer = modules[key]
            if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
                raise AdapterError(f"layer {i} {key} is a {type(layer).__name__}, not a Linear")
            lora = LoRALinear.from_base(layer, config.rank, config.scale, config.dropout)
            lora.train(model.training)  # dropout only while training
            updates.append((key, lora))
            wrapped.append(f"{i}.{key}")
        block.update_modules(tree_unflatten(updates))
    return wrapped


def merge_lora(model: nn.Module, dequantize: bool = False) -> int:
    """Replace every LoRALinear by its fused base layer; returns how many were merged."""
    fused = [
        (name, m.fuse(dequantize)) for name, m in model.named_modules() if isinstance(m, LoRALinear)
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def adapter_config_dict(model: nn.Module, config: LoRAConfig) -> dict[str, Any]:
    """The adapter_config.json mlx-lm reads (fine_tune_type, num_layers, lora_parameters)."""
    return {
        "fine_tune_type": "lora",
        "model_type": model.model_type,
        "num_layers": len(model.layers) if config.num_layers == -1 else config.num_layers,
        "lora_parameters": {
            "rank": config.rank,
            "scale": config.scale,
            "dropout": config.dropout,
            "keys": list(resolve_targets(model, config.targets)),
        },
        "alpha": config.alpha,
    }


def save_adapters(
    model: nn.Module,
    folder: Path,
    config: LoRAConfig,
    extra: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write adapters.safetensors (with `metadata`) and adapter_config.json (plus `extra`
    keys, e.g. training), each replaced whole so a crash never leaves a torn file."""
    folder.mkdir(parents=True, exist_ok=True)
    with replaced_file(folder / ADAPTER_FILE) as tmp:
        mx.save_safetensors(str(tmp), adapter_weights(model), {"format": "mlx", **(metadata or {})})
    config_json = {**adapter_config_dict(model, config), **(extra or {})}
    with replaced_file(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config_json, indent=2))
    return folder / ADAPTER_FILE


def read_adapter_config(folder: Path) -> tuple[dict[str, Any], LoRAConfig]:
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    if not path.exists():
        raise AdapterError(f"{path} is missing: is {folder} an adapter folder from `elm finetune`?")
    try:
        raw = json.loads(path.read_text())
        fine_tune_type = raw.get("fine_tune_type", "lora")
        params = raw["lora_parameters"]
        rank = int(params["rank"])
        config = LoRAConfig(
            rank=rank,
            alpha=float(params["scale"]) * rank,
            dropout=float(params.get("dropout", 0.0)),
            num_layers=int(raw["num_layers"]),
            targets=tuple(params["keys"]) if params.get("keys") else None,
        )
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{path} is not a valid LoRA adapter config ({e!r})") from e
    if fine_tune_type != "lora":
        raise AdapterError(
            f"{path}: fine_tune_type {fine_tune_type!r} is not supported (lora only)"
        )
    return raw, config


def adapter_mismatches(model: nn.Module, weights: dict[str, mx.array]) -> str | None:
    """What differs between saved adapter weights and the model's LoRA layers (None: they fit)."""
    expected = adapter_weights(model)
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" if k in expected else f"{k}: unknown"
        for k, v in weights.items()
        if k not in expected or v.shape != expected[k].shape
    ]
    if missing := sorted(set(expected) - set(weights)):
        wrong.append(f"missing {len(missing)} tensors, e.g. {missing[0]}")
    return "; ".join(wrong[:3]) or None


def load_adapters(model: nn.Module, folder: Path) -> LoRAConfig:
    """Wrap the model's layers as the adapter config says and load the trained weights."""
    folder = Path(folder).expanduser()
    raw, config = read_adapter_config(folder)
    if raw.get("model_type", model.model_type) != model.model_type:
        raise AdapterError(
            f"{folder} was trained on a {raw['model_type']} model, not {model.model_type}"
        )
    apply_lora(model, config)
    path = folder / ADAPTER_FILE
    try:
        weights = mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as e:
        raise AdapterError(f"{path} cannot be read ({e}); is the adapter folder complete?") from e
    if wrong := adapter_mismatches(model, weights):
        raise AdapterError(f"{path} does not fit this model (another base model?): {wrong}")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return config
