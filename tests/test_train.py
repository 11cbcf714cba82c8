"""Training that cannot silently diverge: gradient clipping by global norm (checked against a
hand computation), a non-finite loss stops the run with the last good adapter, `--resume`
refuses damaged saves and files of another run, and the progress bar shows the latest
validation loss."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from elm_mlx.cli.main import app
from mlx.utils import tree_flatten, tree_map
from tiny_data import write_jsonl
from tiny_models import write_lora_model
from tiny_tokenizers import CORPUS, train_spm_tokenizer
from typer.testing import CliRunner

from elm_mlx.errors import OptionError, TrainingError
from elm_mlx.loader import load
from elm_mlx.lora import LoRAConfig, apply_lora
from elm_mlx.train.dataset import load_splits, train_batches
from elm_mlx.train.trainer import LOG_FILE, TrainConfig, Trainer

ROWS = [{"prompt": f"Q{i}: {CORPUS[i]}?", "completion": f" {CORPUS[-i - 1]}"} for i in range(6)]
LORA = LoRAConfig(rank=4, alpha=8)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    train_spm_tokenizer(root / "tok")
    write_lora_model(root / "llama", "llama", root / "tok")
    write_lora_model(root / "olmo", "olmo", root / "tok")
    write_jsonl(root / "data", "train", ROWS)
    write_jsonl(root / "data", "valid", ROWS[:3])
    return root


def trainer(root: Path, out: Path, config: TrainConfig, family: str = "llama") -> Trainer:
    model, tokenizer = load(root / family)
    mx.random.seed(0)
    apply_lora(model, LORA)
    splits = load_splits(root / "data", tokenizer, model.model_type, 256)
    return Trainer(model, splits, out, config, LORA, progress=False)


def log_rows(out: Path) -> list[dict[str, str]]:
    with (out / LOG_FILE).open(newline="") as f:
        return list(csv.DictReader(f))


def adapter(out: Path) -> dict[str, mx.array]:
    return mx.load(str(out / "adapters.safetensors"))


# ---- clipping ----------------------------------------------------------------------------


def by_hand(root: Path, config: TrainConfig) -> tuple[dict[str, mx.array], float]:
    """One AdamW step (with bias correction, as PyTorch's) as the definitions say: the gradient
    of the mean loss over every trained token of the global batch (plain cross-entropy of the
    full logits), scaled by min(1, max_norm / norm) when clipping is on. Returns the new LoRA
    weights and the norm."""
    model, tokenizer = load(root / "llama")
    mx.random.seed(0)
    apply_lora(model, LORA)
    splits = load_splits(root / "data", tokenizer, model.model_type, 256)

    def loss_sum(model, inputs, targets, mask):
        logits = model(inputs).astype(mx.float32)
        return (nn.losses.cross_entropy(logits, targets) * mask).sum()

    batches = train_batches(splits.train, config.batch_size, config.seed)
    total, count = None, 0.0
    for _ in range(config.grad_accum):
        b = next(batches)
        _, grads = nn.value_and_grad(model, loss_sum)(
            model, mx.array(b.inputs), mx.array(b.targets), mx.array(b.mask)
        )
        total = grads if total is None else tree_map(mx.add, total, grads)
        count += float(b.mask.sum())
    grads = tree_map(lambda g: g / count, total)
    norm = math.sqrt(sum((g * g).sum().item() for _, g in tree_flatten(grads)))
    if config.max_grad_norm:
        grads = tree_map(lambda g: g * min(1.0, config.max_grad_norm / norm), grads)
    adamw = optim.AdamW(learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                        bias_correction=True)  # as PyTorch's AdamW  # fmt: skip
    adamw.update(model, grads)
    return dict(tree_flatten(model.trainable_parameters())), norm


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-6, 1e6])
def test_one_step_clips_as_the_definition_says(root, tmp_path, max_grad_norm):
    """1e-6 clips hard (the clipped gradient is then of the order of AdamW's eps, so the update
    depends on its size); 1e6 does not clip; 0 turns clipping off."""
    config = TrainConfig(iters=1, batch_size=2, grad_accum=2, learning_rate=1e-2,
                         max_grad_norm=max_grad_norm, val_every=0)  # fmt: skip
    t = trainer(root, tmp_path, config)
    start = dict(tree_flatten(t.model.trainable_parameters()))
    t.run()
    want, norm = by_hand(root, config)
    got = adapter(tmp_path)
    assert got.keys() == want.keys()
    for k in want:
        # compare the updates, not the weights the updates are small against
        assert mx.allclose(got[k] - start[k], want[k] - start[k], rtol=1e-3, atol=1e-7), k
    logged = float(log_rows(tmp_path)[0]["grad_norm"])  # the norm before clipping
    assert logged == pytest.approx(norm, rel=1e-4) and norm > 1e-3
    unclipped, _ = by_hand(root, replace(config, max_grad_norm=0.0))
    moved = max(mx.abs(got[k] - unclipped[k]).max().item() for k in got)
    step = max(mx.abs(unclipped[k] - start[k]).max().item() for k in got)
    if max_grad_norm == 1e-6:
        assert moved > 0.5 * step  # clipping changed the update a lot
    else:
        assert moved < 1e-3 * step


# ---- divergence --------------------------------------------------------------------------

# AdamW's first step moves weights by up to lr whatever the gradient's size: at 1e30 the LoRA
# weights become huge but finite, and the next forward pass overflows float32.
BLOW_UP = TrainConfig(iters=5, batch_size=2, learning_rate=1e30, val_every=0, save_every=0)


def test_a_nan_loss_stops_with_the_last_good_adapter(root, tmp_path):
    t = trainer(root, tmp_path, BLOW_UP)
    after_step: dict[int, dict[str, mx.array]] = {}

    def keep(t: Trainer) -> None:
        after_step[t.step] = dict(tree_flatten(t.model.trainable_parameters()))

    with pytest.raises(TrainingError) as e:
        t.run(on_step=keep)
    message = str(e.value)
    assert re.match(r"step 2: the loss became (nan|inf)", message), message
    assert f"kept the adapter of step 1 in {tmp_path}" in message and "--learning-rate" in message
    assert list(after_step) == [1] and t.step == 1
    saved = adapter(tmp_path)
    assert saved.keys() == after_step[1].keys()
    for k, v in after_step[1].items():
        assert mx.array_equal(saved[k], v), k
        assert mx.isfinite(v).all().item() and mx.abs(v).max().item() > 1e20  # blown up
    assert json.loads((tmp_path / "training_state.json").read_text())["step"] == 1
    assert mx.load(str(tmp_path / "optimizer.safetensors"))["step"].item() == 1
    rows = log_rows(tmp_path)
    assert [r["step"] for r in rows] == ["1", "2"]
    assert math.isfinite(float(rows[0]["loss"])) and not math.isfinite(float(rows[1]["loss"]))
    # the save is sound: a resumed run starts from it
    again = trainer(root, tmp_path, BLOW_UP)
    again.resume()
    assert again.step == 1
    for k, v in tree_flatten(again.model.trainable_parameters()):
        assert mx.array_equal(v, saved[k]), k


def test_cli_exits_with_the_step_on_divergence(root, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "finetune", "-m", str(root / "llama"), "--data", str(root / "data"), "-o", str(out),
        "--iters", "5", "--batch-size", "2", "--learning-rate", "1e30", "--val-every", "0",
    ])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert re.search(r"error: step 2: the loss became (nan|inf)", result.output), result.output
    assert "Traceback" not in result.output
    assert json.loads((out / "training_state.json").read_text())["step"] == 1


def test_max_grad_norm_option_is_checked(root, tmp_path):
    with pytest.raises(OptionError, match="max_grad_norm must be >= 0"):
        TrainConfig(max_grad_norm=-1.0).validate()
    result = CliRunner().invoke(app, [
        "finetune", "-m", str(root / "llama"), "--data", str(root / "data"), "-o",
        str(tmp_path / "out"), "--max-grad-norm", "-1",
    ])  # fmt: skip
    assert result.exit_code == 1 and "error: --max-grad-norm must be >= 0" in result.output


# ---- resume ------------------------------------------------------------------------------

SAVED = TrainConfig(iters=4, batch_size=2, learning_rate=1e-3, val_every=0, save_every=2)


@pytest.fixture(scope="module")
def saved_runs(root, tmp_path_factory) -> Path:
    """Two runs with the same options, interrupted at step 2 (their saves differ only by
    their run id)."""
    folder = tmp_path_factory.mktemp("saved")

    def stop(t: Trainer) -> None:
        if t.step == 2:
            signal.raise_signal(signal.SIGINT)

    for name in ("a", "b"):
        assert trainer(root, folder / name, SAVED).run(on_step=stop).interrupted
    return folder


def rewrite_adapter_shapes(out: Path) -> None:
    weights, metadata = mx.load(str(out / "adapters.safetensors"), return_metadata=True)
    weights = {k: v[:2] if k.endswith("lora_b") else v for k, v in weights.items()}  # rank 2
    mx.save_safetensors(str(out / "adapters.safetensors"), weights, metadata)


def set_state(out: Path, **values) -> None:
    path = out / "training_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def drop_run_id(out: Path) -> None:
    path = out / "training_state.json"
    state = json.loads(path.read_text())
    del state["run"]
    path.write_text(json.dumps(state))


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "state truncated": (lambda out: cut(out / "training_state.json"), "is damaged"),
    "state not JSON": (
        lambda out: (out / "training_state.json").write_text("step: 2"),
        "is damaged",
    ),
    "state of wrong types": (lambda out: set_state(out, step="2"), "is damaged"),
    "negative step": (lambda out: set_state(out, step=-1), "is damaged"),
    "state of an older elm": (drop_run_id, "was saved by an older elm"),
    "step past iters": (
        lambda out: set_state(out, step=9),
        "iters is 4 but the saved run is at step 9",
    ),
    "state of another step": (
        lambda out: set_state(out, step=1),
        r"adapters.safetensors \(run \w+, step 2\) is not the save of training_state.json",
    ),
    "optimizer truncated": (lambda out: cut(out / "optimizer.safetensors"), "cannot be read"),
    "optimizer missing": (lambda out: (out / "optimizer.safetensors").unlink(), "cannot be read"),
    "adapter truncated": (lambda out: cut(out / "adapters.safetensors"), "cannot be read"),
    "adapter shapes": (rewrite_adapter_shapes, r"does not fit the model: .*lora_b: \(2, "),
    "optimizer of another run": (
        lambda out: shutil.copy(out.parent / "b" / "optimizer.safetensors", out),
        "optimizer.safetensors .* is not the save of .* a file of another run",
    ),
    "adapter of another run": (
        lambda out: shutil.copy(out.parent / "b" / "adapters.safetensors", out),
        "adapters.safetensors .* is not the save of",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_refuses_a_damaged_save(root, saved_runs, tmp_path, damage):
    out = tmp_path / "a"
    shutil.copytree(saved_runs / "a", out)
    shutil.copytree(saved_runs / "b", tmp_path / "b")
    apply, message = DAMAGE[damage]
    apply(out)
    t = trainer(root, out, SAVED)
    start = dict(tree_flatten(t.model.trainable_parameters()))
    with pytest.raises((TrainingError, OptionError), match=message):
        t.resume()
    assert t.step == 0  # nothing was loaded
    for k, v in tree_flatten(t.model.trainable_parameters()):
        assert mx.array_equal(v, start[k]), k


def test_resume_of_a_sound_save_and_on_another_base(root, saved_runs, tmp_path):
    shutil.copytree(saved_runs / "a", tmp_path / "a")
    t = trainer(root, tmp_path / "a", SAVED)
    t.resume()
    assert t.step == 2 and t.run().step == 4
    with pytest.raises(TrainingError, match="model_type 'olmo' \\(saved run: 'llama'\\)"):
        trainer(root, saved_runs / "a", SAVED, family="olmo").resume()


def test_cli_resume_of_a_damaged_save(root, saved_runs, tmp_path):
    out = tmp_path / "a"
    shutil.copytree(saved_runs / "a", out)
    cut(out / "training_state.json")
    result = CliRunner().invoke(app, [
        "finetune", "-m", str(root / "llama"), "--data", str(root / "data"), "-o", str(out),
        "--iters", "4", "--batch-size", "2", "--learning-rate", "1e-3", "--val-every", "0",
        "--save-every", "2", "--rank", "4", "--alpha", "8", "--resume",
    ])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert f"error: --resume: {out / 'training_state.json'} is damaged" in result.output
    assert "Traceback" not in result.output


# ---- the progress bar --------------------------------------------------------------------


def test_progress_bar_shows_the_latest_validation_loss(root, tmp_path, capsys):
    """Validation at steps 0, 3, 6 and 7 (the last); interrupted at 4 and resumed."""
    config = TrainConfig(iters=7, batch_size=2, learning_rate=3e-3, val_every=3, save_every=0)
    shown: dict[int, str] = {}

    def render(t: Trainer) -> None:
        shown[t.step] = str(t.bar.bar)  # the line as tqdm draws it
        if t is first and t.step == 4:
            signal.raise_signal(signal.SIGINT)

    first = trainer(root, tmp_path, config)
    first.progress = True
    assert first.run(on_step=render).interrupted
    second = trainer(root, tmp_path, config)
    second.progress = True
    second.resume()
    result = second.run(on_step=render)

    validations = {int(r["step"]): float(r["val_loss"]) for r in log_rows(tmp_path)
                   if r["val_loss"]}  # fmt: skip
    assert sorted(validations) == [0, 3, 6, 7]
    assert sorted(shown) == list(range(1, 8))
    for step, line in shown.items():
        latest = validations[max(s for s in validations if s <= step)]
        assert f"| val {latest:.3f} |" in line, (step, line)
    assert result.val_loss == pytest.approx(validations[7], rel=1e-5)
    # the line left on the terminal at the end
    final = capsys.readouterr().err.rsplit("7/7", 1)[-1]
    assert f"val {validations[7]:.3f}" in final.splitlines()[0]
