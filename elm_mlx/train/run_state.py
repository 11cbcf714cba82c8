"""A saved training run in its adapter folder: the adapter, the optimizer state and
training_state.json, each replaced whole when saved and stamped with the run's id and step,
so that `--resume` can tell a sound save from a damaged one or from files of another run.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from ..errors import OptionError, TrainingError
from ..lora import (
    ADAPTER_FILE,
    LoRAConfig,
    adapter_config_dict,
    adapter_mismatches,
    read_adapter_config,
    save_adapters,
)
from ..model_folder import replaced_file

STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
START_AGAIN = "start the run again in a new --out"


@dataclass
class RunState:
    """training_state.json: where a run stands, besides its weights."""

    run: str  # a random id, stamped in the weight files of each save
    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    val_loss: float | None = None  # the latest validation loss

    @staticmethod
    def new_run_id() -> str:
        return uuid.uuid4().hex

    def stamp(self) -> dict[str, str]:
        return {"elm_run": self.run, "elm_step": str(self.step)}


def save_run(
    folder: Path,
    model: nn.Module,
    lora: LoRAConfig,
    training: dict[str, Any],
    optimizer: optim.Optimizer,
    state: RunState,
) -> None:
    """Write the adapter, the optimizer state, then training_state.json (last: a save
    interrupted before it leaves files whose stamps disagree, which resume reports)."""
    save_adapters(model, folder, lora, {"training": training}, metadata=state.stamp())
    with replaced_file(folder / OPTIMIZER_FILE) as tmp:
        mx.save_safetensors(str(tmp), dict(tree_flatten(optimizer.state)), state.stamp())
    with replaced_file(folder / STATE_FILE) as tmp:
        tmp.write_text(json.dumps(asdict(state), indent=2))


def check_options(
    folder: Path, model: nn.Module, lora: LoRAConfig, training: dict[str, Any], keys: tuple
) -> None:
    """The options a resumed run must share with the saved one (data order, LoRA layers)."""
    raw, _ = read_adapter_config(folder)
    saved = raw.get("training", {})
    diffs = [f"{k} {training[k]!r} (saved run: {saved.get(k)!r})"
             for k in keys if saved.get(k) != training[k]]  # fmt: skip
    mine = adapter_config_dict(model, lora)
    mine = {"model_type": mine["model_type"], "num_layers": mine["num_layers"],
            **mine["lora_parameters"]}  # fmt: skip
    theirs = {"model_type": raw.get("model_type"), "num_layers": raw.get("num_layers"),
              **raw["lora_parameters"]}  # fmt: skip
    diffs += [f"{k} {v!r} (saved run: {theirs.get(k)!r})" for k, v in mine.items()
              if v != theirs.get(k)]  # fmt: skip
    if diffs:
        raise TrainingError(
            "--resume needs the options of the saved run; these differ: " + ", ".join(diffs)
        )


def read_state(folder: Path, iters: int) -> RunState:
    path = folder / STATE_FILE
    if not path.exists():
        raise TrainingError(f"--resume: {folder} holds no saved run ({STATE_FILE} is missing)")
    try:
        raw = json.loads(path.read_text())
        if isinstance(raw, dict) and "step" in raw and "run" not in raw:
            raise TrainingError(f"--resume: {path} was saved by an older elm; {START_AGAIN}")
        state = RunState(**raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise TrainingError(f"--resume: {path} is damaged ({e}); {START_AGAIN}") from e
    types = (isinstance(state.run, str) and type(state.step) is int
             and type(state.tokens) is int and isinstance(state.elapsed_s, (int, float))
             and isinstance(state.val_loss, (int, float, type(None))))  # fmt: skip
    if not types or state.step < 0 or state.tokens < 0:
        raise TrainingError(f"--resume: {path} is damaged ({raw}); {START_AGAIN}")
    if state.step > iters:
        raise OptionError(
            "iters", f"is {iters} but the saved run is at step {state.step}; raise it to continue"
        )
    return state


def read_weights(path: Path, state: RunState) -> dict[str, mx.array]:
    """A weight file of the save `state` describes (its stamp says so)."""
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise TrainingError(f"--resume: {path} cannot be read ({e}); {START_AGAIN}") from e
    run, step = metadata.get("elm_run"), metadata.get("elm_step")
    if (run, step) != (state.run, str(state.step)):
        raise TrainingError(
            f"--resume: {path} (run {run}, step {step}) is not the save of {STATE_FILE} "
            f"(run {state.run}, step {state.step}): a file of another run, or a save that was "
            f"interrupted; {START_AGAIN}"
        )
    return weights


def load_run(folder: Path, model: nn.Module, optimizer: optim.Optimizer, iters: int) -> RunState:
    """Check every file of the save first, then load the adapter and the optimizer state."""
    state = read_state(folder, iters)
    adapter = read_weights(folder / ADAPTER_FILE, state)
    if wrong := adapter_mismatches(model, adapter):
        raise TrainingError(f"--resume: {folder / ADAPTER_FILE} does not fit the model: {wrong}")
    path = folder / OPTIMIZER_FILE
    saved = read_weights(path, state)
    current = dict(tree_flatten(optimizer.state))
    wrong = [k for k, v in current.items() if k not in saved or saved[k].shape != v.shape]
    if wrong or set(saved) != set(current):
        raise TrainingError(
            f"--resume: {path} does not fit the model's LoRA layers "
            f"(e.g. {(wrong or sorted(set(saved) - set(current)))[0]}); {START_AGAIN}"
        )
    if saved["step"].item() != state.step:
        raise TrainingError(
            f"--resume: {path} has made {saved['step'].item()} updates, not {state.step}; "
            f"{START_AGAIN}"
        )
    model.load_weights(list(adapter.items()), strict=False)
    optimizer.state = tree_map_with_path(lambda k, _: saved[k], optimizer.state)
    return state
