"""Preference tuning (`elm finetune --method dpo|orpo`) on a tiny random Llama: ORPO's first
step and DPO's loss, metrics and gradients with a trained adapter equal transformers'
log-probabilities put through the papers' formulas (TRL's ORPO loss function for ORPO); only
the adapter trains; the reference costs no second model in memory; bad rows are named;
conversational rows follow the chat template; a run resumes exactly."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from oracles import torch_model
from tiny_data import write_jsonl
from tiny_models import write_tiny_chat_model
from tiny_tokenizers import CORPUS

from elm_mlx.errors import DataError, TrainingError
from elm_mlx.loader import load
from elm_mlx.lora import LoRAConfig, apply_lora, load_adapters
from elm_mlx.train.dataset import Tokenize, TokenizePair, collate, load_splits
from elm_mlx.train.objectives import SFT, Preference
from elm_mlx.train.trainer import LOG_FILE, TrainConfig, Trainer

PAIRS = [{"prompt": f"Q{i}: {CORPUS[i]}?", "chosen": f" {CORPUS[-i - 1]}",
          "rejected": f" {CORPUS[(i + 3) % 8]} {CORPUS[i]}"} for i in range(6)]  # fmt: skip
LORA = LoRAConfig(rank=4, alpha=8)
TOL = 1e-4


@pytest.fixture(scope="module")
def llama(tiny, tmp_path_factory):
    """(HF folder, our fp32 conversion, data folder) of the tiny random Llama."""
    data = tmp_path_factory.mktemp("prefs")
    write_jsonl(data, "train", PAIRS)
    write_jsonl(data, "valid", PAIRS[:3])
    return tiny.hf("llama"), tiny.converted("llama"), data


def trainer(folder: Path, data: Path, out: Path, config: TrainConfig, adapter: Path | None = None):
    model, tok = load(folder)
    mx.random.seed(0)
    if adapter is None:
        apply_lora(model, LORA)
    else:
        load_adapters(model, adapter)
    splits = load_splits(data, tok, model.model_type, 256, pairs=config.method != "sft")
    return Trainer(model, splits, out, config, LORA, progress=False)


# ---- the oracle: transformers' log-probabilities, the papers' formulas ---------------------


class TorchLoRA:
    """y = base(x) + scale * x @ A @ B with A, B torch leaves (for their gradients)."""

    def __init__(self, base, a: np.ndarray, b: np.ndarray, scale: float):
        import torch

        self.base, self.scale = base, scale
        self.a = torch.tensor(a, requires_grad=True)
        self.b = torch.tensor(b, requires_grad=True)

    def __call__(self, x):
        return self.base(x) + self.scale * (x @ self.a) @ self.b


def torch_policy(hf: Path, adapter: Path) -> tuple[object, dict[str, TorchLoRA]]:
    """transformers' fp32 model with the saved LoRA layers wrapped around its Linears."""
    model = torch_model(hf)
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {k: np.array(v) for k, v in mx.load(str(adapter / "adapters.safetensors")).items()}
    scale = json.loads((adapter / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    layers = {}
    for path in sorted({k.rsplit(".", 1)[0] for k in weights}):
        module = model.get_submodule(path)
        layer = TorchLoRA(
            module.forward, weights[f"{path}.lora_a"], weights[f"{path}.lora_b"], scale
        )
        module.forward = layer
        layers[path] = layer
    return model, layers


def torch_logps(model, batch) -> tuple[object, object]:
    """Per row: summed log-probability of the trained targets, and their count."""
    import torch

    logits = model(torch.tensor(batch.inputs, dtype=torch.long)).logits.float()  # (B, L, V)
    targets = torch.tensor(batch.targets, dtype=torch.long)
    logps = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    mask = torch.tensor(batch.mask)
    return (logps * mask).sum(-1), mask.sum(-1)


def dpo_oracle(policy, reference, batch, beta: float, loss: str):
    """DPO (Rafailov et al. 2023, eq. 7) or IPO (Azar et al. 2023, eq. 17; per-token log-ratios
    as TRL normalises them) and TRL's logged metrics."""
    import torch
    import torch.nn.functional as F

    logps, counts = torch_logps(policy, batch)
    with torch.no_grad():
        ref, _ = torch_logps(reference, batch)
    n = len(logps) // 2
    chosen_ratio, rejected_ratio = logps[:n] - ref[:n], logps[n:] - ref[n:]
    if loss == "ipo":
        delta = chosen_ratio / counts[:n] - rejected_ratio / counts[n:]
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    margin = beta * (chosen_ratio - rejected_ratio).detach()
    metrics = {
        "loss": losses.mean().item(),
        "reward_accuracy": (margin > 0).float().mean().item(),
        "reward_margin": margin.mean().item(),
        "chosen_logps": logps[:n].mean().item(),
        "rejected_logps": logps[n:].mean().item(),
    }
    return losses.mean(), metrics


def test_orpo_first_step_equals_trl(llama, tmp_path, monkeypatch):
    """Step 1 (2 micro-batches of 3 pairs: the whole set) logs TRL's ORPO loss and metrics."""
    import torch

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    hf, folder, data = llama
    beta = 0.25
    config = TrainConfig(iters=1, batch_size=3, grad_accum=2, val_every=0, method="orpo", beta=beta)
    t = trainer(folder, data, tmp_path / "orpo", config)
    result = t.run()

    batch = collate(t.splits.train, 1)
    with torch.no_grad():
        model = torch_model(hf)  # the adapter starts at zero: the policy is the base
        logps, counts = torch_logps(model, batch)
        logits = model(torch.tensor(batch.inputs, dtype=torch.long)).logits.float()
    n = len(PAIRS)
    labels = torch.where(torch.tensor(batch.mask) > 0, torch.tensor(batch.targets).long(), -100)
    nll = torch.nn.CrossEntropyLoss()(
        logits[:n].reshape(-1, logits.shape[-1]), labels[:n].reshape(-1)
    )
    mean = logps / counts
    trl = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_r, rejected_r, _, log_odds = ORPOTrainer.odds_ratio_loss(trl, mean[:n], mean[n:])
    expected = {
        "loss": (nll - losses.mean()).item(),
        "reward_accuracy": (chosen_r > rejected_r).float().mean().item(),
        "reward_margin": (chosen_r - rejected_r).mean().item(),
        "chosen_logps": mean[:n].mean().item(),
        "rejected_logps": mean[n:].mean().item(),
        "log_odds_ratio": log_odds.item(),
    }
    assert result.metrics == pytest.approx(expected, abs=TOL)
    assert 0 < expected["reward_accuracy"] < 1  # a random model prefers some, not all


@pytest.fixture(scope="module")
def dpo_adapter(llama, tmp_path_factory) -> Path:
    """An adapter after 3 DPO steps, so that policy and reference differ."""
    _, folder, data = llama
    out = tmp_path_factory.mktemp("dpo") / "adapter"
    config = TrainConfig(iters=3, batch_size=2, learning_rate=1e-2, val_every=0, method="dpo")
    trainer(folder, data, out, config).run()
    return out


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_loss_metrics_and_gradients_equal_the_papers(llama, dpo_adapter, tmp_path, loss):
    """With the trained adapter: loss, metrics and the adapter's gradients equal transformers'
    log-probabilities put through the DPO (or IPO) formula; the reference is the base."""
    hf, folder, data = llama
    beta = 0.2
    config = TrainConfig(batch_size=6, val_every=0, method="dpo", beta=beta, loss=loss)
    t = trainer(folder, data, tmp_path / "x", config, adapter=dpo_adapter)
    ours = t.measure(t.splits.train, -1)

    batch = collate(t.splits.train, 1)
    policy, layers = torch_policy(hf, dpo_adapter)
    expected_loss, expected = dpo_oracle(policy, torch_model(hf), batch, beta, loss)
    assert ours == pytest.approx(expected, abs=TOL)
    assert abs(expected["reward_margin"]) > 0.01  # the adapter is not zero

    expected_loss.backward()
    objective = Preference("dpo", beta, loss)
    weights = mx.array(objective.weights(objective.counts(batch)))
    arrays = [mx.array(a) for a in (batch.inputs, batch.targets, batch.mask)]

    def loss_fn(model):
        return (objective.sums(model, *arrays, grad=True) * weights).sum()

    value, grads = nn.value_and_grad(t.model, loss_fn)(t.model)
    assert value.item() == pytest.approx(expected["loss"], abs=TOL)
    grads = dict(tree_flatten(grads))
    assert set(grads) == {f"{p}.lora_{x}" for p in layers for x in "ab"}  # only the adapter
    for path, layer in layers.items():
        for x in "ab":
            theirs = getattr(layer, x).grad.numpy()
            np.testing.assert_allclose(np.array(grads[f"{path}.lora_{x}"]), theirs, atol=1e-5)


def test_dpo_trains_only_the_adapter(llama, dpo_adapter):
    """After DPO steps, every base weight is the stored one; the adapter moved."""
    _, folder, _ = llama
    base, _ = load(folder)
    trained, _ = load(folder)
    load_adapters(trained, dpo_adapter)
    lora = {k: v for k, v in tree_flatten(trained.parameters()) if ".lora_" in k}
    assert max(mx.abs(v).max().item() for k, v in lora.items() if k.endswith("lora_b")) > 0
    stored = dict(tree_flatten(base.parameters()))
    for k, v in tree_flatten(trained.parameters()):
        if ".lora_" not in k:
            key = k.replace(".linear.", ".")
            assert mx.array_equal(v, stored[key]), k


def test_dpo_peak_memory_is_that_of_sft(tiny, tmp_path):
    """The reference is the same weights with the adapter off, not a second model: one DPO
    forward and backward takes at most 1.25x the peak memory of SFT on the same rows. The
    model is sized so that its weights (80 MB) are a large part of the peak: a copy would
    fail the bound."""
    hf = {"hidden_size": 1024, "intermediate_size": 2048, "num_attention_heads": 8,
          "num_key_value_heads": 4}  # fmt: skip
    model, tok = load(tiny.converted("llama", hf=hf))
    apply_lora(model, LORA)
    pairs = TokenizePair(Tokenize(tok, "llama", False), 256)
    batch = collate([pairs(r) for r in PAIRS[:4]], 32)
    arrays = [mx.array(a) for a in (batch.inputs, batch.targets, batch.mask)]
    mx.eval(model.parameters())

    def peak(objective) -> int:
        weights = mx.array(objective.weights(objective.counts(batch)))

        def loss_fn(model):
            return (objective.sums(model, *arrays, grad=True) * weights).sum()

        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(nn.value_and_grad(model, loss_fn)(model))
        return mx.get_peak_memory()

    peak(SFT())  # warm up
    sft, dpo = peak(SFT()), peak(Preference("dpo"))
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert sft + weights > 1.25 * sft, (weights, sft)  # a second copy would not fit
    assert dpo <= 1.25 * sft, (dpo, sft)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_qlora_preference_training_learns_and_stops_on_nan(tmp_path, spm_tokenizer, method):
    """On a 4-bit base: the zero adapter's first DPO loss is log 2 (policy == reference, the
    quantized base with the adapter off); a few steps make the training pairs preferred; a
    blown-up learning rate stops the run with the last good adapter."""
    from tiny_models import write_lora_model

    folder = write_lora_model(tmp_path / "q4", "llama", spm_tokenizer, bits=4)
    write_jsonl(tmp_path / "data", "train", PAIRS)
    write_jsonl(tmp_path / "data", "valid", PAIRS)
    config = TrainConfig(iters=6, batch_size=3, grad_accum=2, learning_rate=1e-2, val_every=6,
                         save_every=0, method=method, beta=0.5)  # fmt: skip
    t = trainer(folder, tmp_path / "data", tmp_path / "out", config)
    before = t.measure(t.splits.valid, -1)
    result = t.run()
    if method == "dpo":
        first = float((tmp_path / "out" / LOG_FILE).read_text().splitlines()[2].split(",")[1])
        assert first == pytest.approx(np.log(2), abs=1e-5)
    assert result.val_metrics["reward_margin"] > before["reward_margin"] + 0.1
    assert result.val_metrics["reward_accuracy"] >= 5 / 6
    blown = TrainConfig(**{**config.__dict__, "learning_rate": 1e30, "max_grad_norm": 0.0})
    with pytest.raises(TrainingError, match="step 2: the loss became"):
        trainer(folder, tmp_path / "data", tmp_path / "blown", blown).run()
    saved = json.loads((tmp_path / "blown" / "training_state.json").read_text())
    assert saved["step"] == 1


def test_cli_orpo_with_plot_and_option_errors(llama, tmp_path):
    """`elm finetune --method orpo --plot` trains and writes the log and the plot; options
    that do not fit the method are refused before anything is written."""
    from elm_mlx.cli.main import app
    from typer.testing import CliRunner

    _, folder, data = llama
    base = ["finetune", "-m", str(folder), "--data", str(data), "--iters", "2",
            "--batch-size", "2", "--val-every", "2", "--rank", "4"]  # fmt: skip
    done = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "o"), "--method", "orpo",
                                    "--beta", "0.2", "--plot"])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "train 6 pairs (ORPO)" in done.output
    assert "step 2: validation loss" in done.output and ", reward accuracy " in done.output
    assert " acc " in done.output  # the bar shows the steps' and validations' accuracy
    assert (tmp_path / "o" / "loss.png").exists()
    header = (tmp_path / "o" / LOG_FILE).read_text().splitlines()[0].split(",")
    assert {"log_odds_ratio", "val_log_odds_ratio", "val_reward_margin"} <= set(header)
    saved = json.loads((tmp_path / "o" / "adapter_config.json").read_text())["training"]
    assert (saved["method"], saved["beta"]) == ("orpo", 0.2)
    for extra, message in ((["--method", "orpo", "--loss", "ipo"], "--loss chooses DPO's loss"),
                           (["--method", "kto"], "--method must be one of sft, dpo, orpo"),
                           (["--method", "dpo", "--beta", "0"], "--beta must be > 0"),
                           (["--method", "dpo", "--train-on-prompt"], "--train-on-prompt is for SFT")):  # fmt: skip
        done = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "x"), *extra])
        assert done.exit_code == 1 and message in done.output, done.output
        assert not (tmp_path / "x").exists()


# ---- data ------------------------------------------------------------------------------


def test_bad_preference_rows_are_named(llama, tmp_path):
    _, folder, _ = llama
    _, tok = load(folder)
    rows = [
        PAIRS[0],
        {"prompt": "Q", "chosen": " yes"},
        {"prompt": "Q", "chosen": " ", "rejected": " no"},
        {"prompt": "Q", "chosen": " same", "rejected": " same"},
        {"prompt": "Q", "chosen": " " + " ".join(CORPUS), "rejected": " no"},
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": "yes",
            "rejected": [{"role": "assistant", "content": "no"}],
        },
        {"prompt": 3, "chosen": " a", "rejected": " b"},
        {"prompt": "", "chosen": " a", "rejected": " b"},
    ]
    write_jsonl(tmp_path / "d", "train", rows)
    with pytest.raises(DataError) as e:
        load_splits(tmp_path / "d", tok, "llama", 40, pairs=True)
    path = tmp_path / "d" / "train.jsonl"
    message = str(e.value)
    assert "7 bad row(s)" in message
    for line, reason in [(2, "missing ['rejected']"), (3, "'chosen' is empty"),
                         (4, "'chosen' and 'rejected' are the same"),
                         (5, "the pair is longer than --max-seq-len 40 even with the prompt cut"),
                         (6, "'chosen' must be a list of messages"),
                         (7, "'prompt' must be a string or a list"),
                         (8, "'prompt' is empty")]:  # fmt: skip
        assert f"{path}:{line}: {reason}" in message, (line, message)
    # SFT data for a preference method, and preference data for SFT, say what to do
    write_jsonl(tmp_path / "s", "train", [{"prompt": "Q", "completion": " A"}])
    with pytest.raises(DataError, match="a preference row has 'prompt', 'chosen' and 'rejected'"):
        load_splits(tmp_path / "s", tok, "llama", 64, pairs=True)
    with pytest.raises(DataError, match="train it with --method dpo or orpo"):
        load_splits(tmp_path / "d", tok, "llama", 64)


def test_a_long_prompt_is_cut_from_the_left(llama):
    _, folder, _ = llama
    _, tok = load(folder)
    pairs = TokenizePair(Tokenize(tok, "llama", False), 20)
    long = {"prompt": " ".join(CORPUS[:4]), "chosen": " yes it is", "rejected": " no"}
    pair = pairs(long)
    full = TokenizePair(Tokenize(tok, "llama", False), 1000)(long)
    assert pair.chosen.size == 20 and pair.size == 20
    cut = full.chosen.size - 20
    np.testing.assert_array_equal(pair.chosen.tokens, full.chosen.tokens[cut:])
    np.testing.assert_array_equal(pair.rejected.tokens, full.rejected.tokens[cut:])
    np.testing.assert_array_equal(pair.chosen.mask, full.chosen.mask[cut:])
    assert pair.rejected.mask.sum() == full.rejected.mask.sum()  # completions stay whole


def test_conversational_rows_follow_the_chat_template(tmp_path):
    """TRL's conversational form: the rows are the template's rendering of prompt + answer;
    the loss covers what follows the rendered prompt with its generation prompt."""
    folder = write_tiny_chat_model(tmp_path / "chat", "chatml")
    _, tok = load(folder)
    hf = tok._tokenizer
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
              {"role": "assistant", "content": "hi"}, {"role": "user", "content": "how are you"}]  # fmt: skip
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "fine thanks"}],
           "rejected": [{"role": "assistant", "content": "go away"}]}  # fmt: skip
    pair = TokenizePair(Tokenize(tok, "llama", False), 512)(row)
    rendered = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    start = len(hf.encode(rendered, add_special_tokens=False))
    for example, key in ((pair.chosen, "chosen"), (pair.rejected, "rejected")):
        text = hf.apply_chat_template(prompt + row[key], tokenize=False).rstrip()
        ids = hf.encode(text, add_special_tokens=False)
        if ids[-1] != hf.eos_token_id:
            ids.append(hf.eos_token_id)
        assert example.tokens.tolist() == ids
        assert example.mask.tolist() == [i >= start for i in range(len(ids))]


# ---- resume ----------------------------------------------------------------------------


def test_dpo_resume_continues_exactly(llama, tmp_path):
    _, folder, data = llama
    config = TrainConfig(iters=6, batch_size=2, grad_accum=2, learning_rate=5e-3, warmup=2,
                         val_every=3, save_every=2, method="dpo", beta=0.2)  # fmt: skip
    trainer(folder, data, tmp_path / "a", config).run()

    def ctrl_c(t: Trainer) -> None:
        if t.step == 3:
            signal.raise_signal(signal.SIGINT)  # the real handler: finish the step, save, stop

    assert trainer(folder, data, tmp_path / "b", config).run(on_step=ctrl_c).step == 3
    t = trainer(folder, data, tmp_path / "b", config)
    t.resume()
    result = t.run()
    assert result.step == 6 and set(result.val_metrics) >= {"reward_accuracy", "reward_margin"}
    a = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-6), k
    rows = (tmp_path / "b" / LOG_FILE).read_text().splitlines()
    header = rows[0].split(",")
    assert {"reward_accuracy", "val_reward_accuracy", "chosen_logps", "log_odds_ratio"} <= set(
        header
    )
    steps = [int(r.split(",")[0]) for r in rows[1:] if r.split(",")[1]]
    assert steps == list(range(1, 7))
    # the options that give the saved run its meaning must match
    other = TrainConfig(**{**config.__dict__, "beta": 0.5})
    t = trainer(folder, data, tmp_path / "b", other)
    with pytest.raises(TrainingError, match="beta"):
        t.resume()


def test_plot_adds_the_reward_accuracy_panel(tmp_path):
    """--plot on a preference log: the loss panel, and below it reward accuracy rising."""
    import struct
    import zlib

    from elm_mlx.train.plot import BLUE, HEIGHT, ORANGE, plot_log

    log = tmp_path / LOG_FILE
    lines = ["step,loss,val_loss,reward_accuracy,val_reward_accuracy", "0,,0.69,,0.5"]
    lines += [f"{s},{0.7 - s / 200:.4f},,{min(1, 0.4 + s / 100):.3f}," for s in range(1, 101)]
    lines += ["100,,0.2,,1.0"]
    log.write_text("\n".join(lines) + "\n")
    data = plot_log(log, tmp_path / "loss.png").read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (720, 2 * HEIGHT)
    idat, pos = b"", 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    pixels = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, -1)[:, 1:]
    pixels = pixels.reshape(height, width, 3)
    lower = pixels[HEIGHT + 40 :]  # the accuracy panel, below its labels
    blue = np.argwhere((lower == BLUE).all(axis=-1))
    assert len(blue) > 500 and (lower == ORANGE).all(axis=-1).sum() > 100
    left = blue[blue[:, 1] < 120][:, 0].mean()
    right = blue[blue[:, 1] > 650][:, 0].mean()
    assert right < left - 150  # accuracy rises: its right end is higher on the image


# ---- the real model --------------------------------------------------------------------


@pytest.mark.slow
def test_dpo_teaches_smollm2_a_preference_it_does_not_have(tmp_path):
    """examples/pirate_prefs.py: DPO prefers answers opening with "Ahoy, matey!". SmolLM2 does
    not greet so (held-out reward accuracy 0 at the start, no greeting in its greedy answers);
    8 DPO steps on 16 pairs make held-out pairs >= 90% right and the greedy answers to
    held-out questions open with the greeting."""
    from tiny_models import load_example, smollm2_fp32_folder

    from elm_mlx import generate

    pirate = load_example("pirate_prefs")
    folder = smollm2_fp32_folder()
    pirate.write(tmp_path / "data")
    held_out = [q for q, _ in pirate.QA[pirate.N_TRAIN :]][:4]
    model, tok = load(folder)

    def answers() -> list[str]:
        model.eval()
        chat = tok._tokenizer.apply_chat_template
        prompts = [chat(pirate.prompt(q), add_generation_prompt=True, tokenize=False)
                   for q in held_out]  # fmt: skip
        return [generate(model, tok, p, max_tokens=8) for p in prompts]

    assert not any(pirate.GREETING.split(",")[0] in a for a in answers())
    config = TrainConfig(iters=8, batch_size=4, learning_rate=5e-3, val_every=8, val_batches=-1,
                         save_every=0, method="dpo", beta=0.1)  # fmt: skip
    lora = LoRAConfig(rank=8, alpha=16, num_layers=4)
    mx.random.seed(0)
    apply_lora(model, lora)
    splits = load_splits(tmp_path / "data", tok, model.model_type, 512, pairs=True)
    t = Trainer(model, splits, tmp_path / "out", config, lora, progress=False)
    result = t.run()
    rows = (tmp_path / "out" / LOG_FILE).read_text().splitlines()
    assert rows[1].split(",")[rows[0].split(",").index("val_reward_accuracy")] == "0"  # step 0
    assert result.val_metrics["reward_accuracy"] >= 0.9, result.val_metrics
    greeted = [a for a in answers() if a.startswith(pirate.GREETING.split(",")[0])]
    assert len(greeted) >= 3, answers()
