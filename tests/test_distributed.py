"""Data parallel: `mlx.launch -n 2 --backend ring -- elm finetune ...` on localhost trains the
same adapter, within float tolerance, as one process over the same global batches (gradient
clipping included), and both processes stop at the same step when the loss diverges."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import pytest
from oracles import free_port_pair
from tiny_data import write_jsonl
from tiny_models import write_lora_model
from tiny_tokenizers import CORPUS, train_spm_tokenizer

from elm_mlx.lora import LoRAConfig
from elm_mlx.train.finetune import finetune
from elm_mlx.train.trainer import TrainConfig

# Rows of different lengths, so the two processes pad their halves of a batch differently.
ROWS = [{"text": " ".join(CORPUS[: 1 + i % 5])} for i in range(10)]
ROWS += [{"prompt": f"Q{i}: {CORPUS[i]}?", "completion": f" {CORPUS[-i - 1]}"} for i in range(6)]
# The gradient norm grows from about 1.6 to 5 over these steps: 2.0 clips all but the first ones.
CONFIG = TrainConfig(iters=6, batch_size=4, grad_accum=2, learning_rate=3e-3, warmup=2,
                     max_grad_norm=2.0, val_every=3, val_batches=-1, save_every=0)  # fmt: skip
LORA = LoRAConfig(rank=4, alpha=8, num_layers=1, targets=("q_proj", "v_proj", "down_proj"))


def launch_two(*options: str) -> subprocess.CompletedProcess:
    """`elm finetune OPTIONS` in two processes on this machine."""
    launch = shutil.which("mlx.launch")
    assert launch, "mlx.launch comes with mlx; is mlx installed in this environment?"
    elm = shutil.which("elm")
    assert elm, "the elm command comes with `pip install -e .`"
    command = [launch, "-n", "2", "--backend", "ring", "--starting-port", str(free_port_pair()),
               "--", elm, "finetune", *options]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def grad_norms(out) -> list[float]:
    with (out / "train_log.csv").open(newline="") as f:
        return [float(r["grad_norm"]) for r in csv.DictReader(f) if r["grad_norm"]]


def test_two_processes_train_the_same_adapter_as_one(tmp_path):
    train_spm_tokenizer(tmp_path / "tok")
    model = write_lora_model(tmp_path / "model", "llama", tmp_path / "tok")
    write_jsonl(tmp_path / "data", "train", ROWS)
    write_jsonl(tmp_path / "data", "valid", ROWS[::3])

    single = finetune(model, tmp_path / "data", tmp_path / "one", CONFIG, LORA, progress=False)

    options = [
        "-m", str(model), "--data", str(tmp_path / "data"), "-o", str(tmp_path / "two"),
        "--iters", str(CONFIG.iters), "--batch-size", str(CONFIG.batch_size),
        "--grad-accum", str(CONFIG.grad_accum), "--learning-rate", str(CONFIG.learning_rate),
        "--warmup", str(CONFIG.warmup), "--max-grad-norm", str(CONFIG.max_grad_norm),
        "--val-every", str(CONFIG.val_every), "--val-batches", "-1", "--save-every", "0",
        "--rank", "4", "--alpha", "8", "--num-layers", "1", "--targets", "q_proj,v_proj,down_proj",
    ]  # fmt: skip
    done = launch_two(*options)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "2 processes" in output
    assert output.count("saved the adapter") == 1  # only the first process prints

    one = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    two = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    assert one.keys() == two.keys() and len(one) == 6
    for k in one:
        assert mx.allclose(one[k], two[k], atol=1e-5, rtol=1e-4), k
        assert mx.abs(one[k]).max().item() > 0  # trained (B starts at zero)
    # the same losses, logged by the first process only
    log_one = (tmp_path / "one" / "train_log.csv").read_text().splitlines()
    log_two = (tmp_path / "two" / "train_log.csv").read_text().splitlines()
    assert len(log_one) == len(log_two) == 1 + CONFIG.iters + 3  # header, steps, 3 validations
    for a, b in zip(log_one[1:], log_two[1:], strict=True):
        loss_a, loss_b = (row.split(",")[1] or row.split(",")[2] for row in (a, b))
        assert abs(float(loss_a) - float(loss_b)) <= 2e-4 * float(loss_a)  # 6 digits logged
    # the norms before clipping are the same; clipping acted on some steps, not on all
    norms = grad_norms(tmp_path / "one")
    assert grad_norms(tmp_path / "two") == pytest.approx(norms, rel=2e-4)
    assert min(norms) < CONFIG.max_grad_norm < max(norms)
    config = json.loads((tmp_path / "two" / "adapter_config.json").read_text())
    assert config["training"]["batch_size"] == 4
    assert config["training"]["max_grad_norm"] == CONFIG.max_grad_norm
    assert single.step == CONFIG.iters

    # A learning rate that blows the weights up: each process stops at step 2 and exits 1.
    # Started as mlx.launch starts them, but each on its own, to see each one's exit status
    # (mlx.launch ends the others when one exits with an error, and itself exits with 0).
    options[options.index("-o") + 1] = str(tmp_path / "blown")
    options[options.index("--learning-rate") + 1] = "1e30"
    port = free_port_pair()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    processes = [
        subprocess.Popen([shutil.which("elm"), "finetune", *options], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)})
        for rank in (0, 1)
    ]  # fmt: skip
    for p in processes:
        output = p.communicate(timeout=600)[0]
        assert p.returncode == 1, output
        assert re.search(r"error: step 2: the loss became (nan|inf)", output), output
    assert json.loads((tmp_path / "blown" / "training_state.json").read_text())["step"] == 1


def test_two_processes_train_the_same_dpo_adapter_as_one(tmp_path):
    """DPO over mlx.launch: each process holds half of every batch of pairs; the counts the
    loss is divided by are global, so the adapter and the logged metrics are one process's."""
    train_spm_tokenizer(tmp_path / "tok")
    model = write_lora_model(tmp_path / "model", "llama", tmp_path / "tok")
    pairs = [{"prompt": f"Q{i}: {CORPUS[i]}?", "chosen": f" {CORPUS[-i - 1]}",
              "rejected": " ".join(CORPUS[: 1 + i % 3])} for i in range(8)]  # fmt: skip
    write_jsonl(tmp_path / "data", "train", pairs)
    write_jsonl(tmp_path / "data", "valid", pairs[::3])
    config = TrainConfig(iters=3, batch_size=4, grad_accum=2, learning_rate=3e-3,
                         val_every=3, val_batches=-1, save_every=0, method="dpo", beta=0.2)  # fmt: skip
    finetune(model, tmp_path / "data", tmp_path / "one", config, LORA, progress=False)
    done = launch_two(
        "-m", str(model), "--data", str(tmp_path / "data"), "-o", str(tmp_path / "two"),
        "--iters", "3", "--batch-size", "4", "--grad-accum", "2", "--learning-rate", "3e-3",
        "--val-every", "3", "--val-batches", "-1", "--save-every", "0", "--method", "dpo",
        "--beta", "0.2", "--rank", "4", "--alpha", "8", "--num-layers", "1",
        "--targets", "q_proj,v_proj,down_proj",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    one = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    two = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    for k in one:
        assert mx.allclose(one[k], two[k], atol=1e-5, rtol=1e-4), k
        assert mx.abs(one[k]).max().item() > 0
    rows = [list(csv.DictReader((tmp_path / d / "train_log.csv").open())) for d in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) == 3 + 2  # steps, validations at 0 and 3
    for a, b in zip(*rows, strict=True):
        for key in ("loss", "reward_accuracy", "reward_margin", "chosen_logps", "val_loss",
                    "val_reward_accuracy", "val_reward_margin", "val_rejected_logps"):  # fmt: skip
            if a[key] or b[key]:
                assert float(a[key]) == pytest.approx(float(b[key]), rel=2e-4, abs=1e-5), key
