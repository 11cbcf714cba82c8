"""LoRA: init equals base, training memorizes, fused equals unfused, save/resume, QLoRA,
`elm fuse`, adapters in mlx-lm and back, the CLI, and the loss plot."""

from __future__ import annotations

import json
import os
import signal
import stat
import zlib
from pathlib import Path

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from elm_mlx.cli.main import app
from mlx.utils import tree_flatten
from tiny_data import write_jsonl
from tiny_models import LORA_CONFIGS, smollm2_fp32_folder, write_lora_model
from tiny_tokenizers import train_spm_tokenizer
from typer.testing import CliRunner

from elm_mlx.engine.generation import generate
from elm_mlx.errors import AdapterError, OptionError, TrainingError
from elm_mlx.loader import load
from elm_mlx.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapters,
    merge_lora,
    save_adapters,
)
from elm_mlx.train.dataset import load_splits
from elm_mlx.train.fuse import fuse
from elm_mlx.train.losses import body_and_head, chunked_cross_entropy, cross_entropy_sum
from elm_mlx.train.trainer import LOG_FILE, TrainConfig, Trainer

FAMILIES = tuple(LORA_CONFIGS)
IDS = mx.array([[1, 5, 17, 33, 99, 120, 7, 250, 3, 64]])
ROWS = [
    {"prompt": "Q: capital of france? A:", "completion": " paris is the capital"},
    {"prompt": "Q: capital of italy? A:", "completion": " rome is the capital"},
]
# lr and steps at which every tiny family memorizes ROWS (found by trying, see the report)
MEMORIZE = TrainConfig(iters=150, batch_size=2, learning_rate=3e-3, val_every=0, save_every=0)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    train_spm_tokenizer(root / "tok")
    for family in FAMILIES:
        write_lora_model(root / family, family, root / "tok")
        write_lora_model(root / f"{family}-q4", family, root / "tok", bits=4)
    write_jsonl(root / "data", "train", ROWS)
    write_jsonl(root / "data", "valid", ROWS)
    return root


def lora_model(folder: Path, config: LoRAConfig | None = None, seed: int = 0):
    model, tokenizer = load(folder)
    mx.random.seed(seed)
    apply_lora(model, config or LoRAConfig())
    return model, tokenizer


def randomize_lora_b(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B matrices, as after training, without spending time training."""
    mx.random.seed(seed)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)


def trainer(model, tokenizer, root: Path, out: Path, config: TrainConfig, lora=None) -> Trainer:
    splits = load_splits(root / "data", tokenizer, model.model_type, 256)
    return Trainer(model, splits, out, config, lora or LoRAConfig(), progress=False)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", [None, 4])
def test_init_equals_base(root, family, bits):
    folder = root / (f"{family}-q4" if bits else family)
    base, _ = load(folder)
    model, _ = lora_model(folder, LoRAConfig(rank=4, alpha=32, dropout=0.5))
    n_lora = sum(isinstance(m, LoRALinear) for _, m in model.named_modules())
    assert n_lora == len(model.layers) * (4 if family == "openelm" else 7)
    model.eval()
    assert mx.array_equal(model(IDS), base(IDS))
    # only the LoRA matrices train
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.endswith(("lora_a", "lora_b")) for k in names)


def test_targets_and_last_layers(root):
    model, _ = lora_model(root / "llama", LoRAConfig(num_layers=1, targets=("q_proj", "v_proj")))
    wrapped = sorted(k for k, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(OptionError, match="targets names no layer 'qkv_proj'"):
        lora_model(root / "llama", LoRAConfig(targets=("qkv_proj",)))
    with pytest.raises(OptionError, match="num_layers is 3 but the model has only 2"):
        lora_model(root / "llama", LoRAConfig(num_layers=3))


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_falls_and_model_reproduces_the_data(root, family, tmp_path):
    model, tokenizer = lora_model(root / family)
    t = trainer(model, tokenizer, root, tmp_path, MEMORIZE)
    losses = []
    result = t.run(on_step=lambda t: losses.append(t.optimizer.state["step"].item()))
    log = np.genfromtxt(tmp_path / LOG_FILE, delimiter=",", names=True)
    train_loss = log["loss"][~np.isnan(log["loss"])]
    assert len(train_loss) == MEMORIZE.iters == result.step == losses[-1]
    assert train_loss[:5].mean() > 2.0 and result.loss < 0.05
    model.eval()
    for row in ROWS:
        text = generate(model, tokenizer, row["prompt"], max_tokens=12)
        assert text.strip() == row["completion"].strip()


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_equals_unfused(root, family):
    model, _ = lora_model(root / family)
    randomize_lora_b(model)
    model.eval()
    unfused = model(IDS)
    assert merge_lora(model) == len(model.layers) * (4 if family == "openelm" else 7)
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    assert mx.allclose(model(IDS), unfused, atol=1e-4, rtol=1e-4)


def test_save_resume_continue_equals_uninterrupted(root, tmp_path):
    config = TrainConfig(iters=12, batch_size=1, learning_rate=3e-3, warmup=3, grad_accum=2,
                         val_every=5, save_every=4)  # fmt: skip
    lora = LoRAConfig(dropout=0.1)  # dropout: the random state must resume too
    straight, tok = lora_model(root / "openelm", lora)
    trainer(straight, tok, root, tmp_path / "a", config, lora).run()

    first, _ = lora_model(root / "openelm", lora)

    def ctrl_c(t: Trainer) -> None:
        if t.step == 7:
            signal.raise_signal(signal.SIGINT)  # the real handler: finish the step, save, stop

    result = trainer(first, tok, root, tmp_path / "b", config, lora).run(on_step=ctrl_c)
    assert result.interrupted and result.step == 7
    assert json.loads((tmp_path / "b" / "training_state.json").read_text())["step"] == 7

    second, _ = lora_model(root / "openelm", lora, seed=123)  # init overwritten by the resume
    t = trainer(second, tok, root, tmp_path / "b", config, lora)
    t.resume()
    assert t.run().step == 12
    a = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-6), k
    # the log holds each training step once
    rows = [r.split(",") for r in (tmp_path / "b" / LOG_FILE).read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows if r[1]] == list(range(1, 13))


def test_resume_refuses_other_options(root, tmp_path):
    model, tok = lora_model(root / "llama")
    trainer(model, tok, root, tmp_path, TrainConfig(iters=2, batch_size=1, val_every=0)).run()
    other, _ = lora_model(root / "llama", LoRAConfig(rank=4))
    t = trainer(other, tok, root, tmp_path, TrainConfig(iters=4, batch_size=2), LoRAConfig(rank=4))
    with pytest.raises(
        TrainingError, match=r"batch_size 2 \(saved run: 1\).*rank 4 \(saved run: 8\)"
    ):
        t.resume()


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_on_a_4bit_base_trains(root, family, tmp_path):
    model, tokenizer = lora_model(root / f"{family}-q4")
    assert any(isinstance(m.linear, nn.QuantizedLinear) for _, m in model.named_modules()
               if isinstance(m, LoRALinear))  # fmt: skip
    base = {k: v for k, v in tree_flatten(model.parameters()) if "lora" not in k}
    config = TrainConfig(iters=60, batch_size=2, learning_rate=3e-3, val_every=60, save_every=0)
    t = trainer(model, tokenizer, root, tmp_path, config)
    first = t.evaluate(t.splits.valid, -1)
    result = t.run()
    assert result.val_loss < first / 3
    after = dict(tree_flatten(model.parameters()))
    assert all(mx.array_equal(after[k], v) for k, v in base.items())  # the base stays frozen


def mlx_lm_logits(folder: Path, adapter: Path | None = None) -> mx.array:
    import mlx_lm

    model, _ = mlx_lm.load(str(folder), adapter_path=str(adapter) if adapter else None)
    return model(IDS)


@pytest.mark.parametrize("family", ["llama", "openelm"])  # mlx-lm's OLMo is the pre-HF layout
def test_mlx_lm_loads_our_adapter_and_we_load_theirs(root, family, tmp_path):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    lora = LoRAConfig(rank=4, alpha=8, num_layers=1)
    model, tok = lora_model(root / family, lora)
    trainer(model, tok, root, tmp_path / "ours", TrainConfig(iters=3, batch_size=2), lora).run()
    model.eval()
    ours = model(IDS)
    assert mx.allclose(mlx_lm_logits(root / family, tmp_path / "ours"), ours, atol=1e-5)
    loaded, _ = load(root / family, adapter_path=tmp_path / "ours")
    assert mx.allclose(loaded(IDS), ours, atol=1e-5)

    # an adapter made by mlx-lm's own code (no "keys": every linear layer)
    import mlx_lm

    theirs, _ = mlx_lm.load(str(root / family))
    theirs.freeze()
    linear_to_lora_layers(theirs, 2, {"rank": 4, "scale": 3.0, "dropout": 0.0})
    randomize_lora_b(theirs)
    (tmp_path / "theirs").mkdir()
    weights = dict(tree_flatten(theirs.trainable_parameters()))
    mx.save_safetensors(str(tmp_path / "theirs" / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": 2,
              "lora_parameters": {"rank": 4, "scale": 3.0, "dropout": 0.0}}  # fmt: skip
    (tmp_path / "theirs" / "adapter_config.json").write_text(json.dumps(config))
    loaded, _ = load(root / family, adapter_path=tmp_path / "theirs")
    assert mx.allclose(loaded(IDS), theirs(IDS), atol=1e-5)


def test_adapter_errors(root, tmp_path):
    model, _ = load(root / "llama")
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapters(model, tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{")
    with pytest.raises(AdapterError, match="not a valid LoRA adapter config"):
        load_adapters(model, tmp_path / "bad")
    # an OpenELM adapter does not fit a Llama model
    other, tok = lora_model(root / "openelm")
    trainer(other, tok, root, tmp_path / "elm", TrainConfig(iters=1, batch_size=2)).run()
    with pytest.raises(AdapterError, match="trained on a openelm model"):
        load_adapters(model, tmp_path / "elm")


def mlx_lm_fused_logits(folder: Path, adapter: Path, dequantize: bool) -> mx.array:
    """mlx-lm's own fuse (as `mlx_lm.fuse` does it), as the oracle for ours."""
    import mlx_lm
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model

    model, _ = mlx_lm.load(str(folder), adapter_path=str(adapter))
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules()
             if hasattr(m, "fuse")]  # fmt: skip
    model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
    return model(IDS)


@pytest.mark.parametrize("dequantize", [False, True])
def test_fuse_a_quantized_base(root, tmp_path, dequantize):
    import mlx_lm

    folder = root / "llama-q4"
    model, tok = lora_model(folder)
    randomize_lora_b(model)
    adapter = tmp_path / "adapter"
    save_adapters(model, adapter, LoRAConfig())
    model.eval()
    unfused = model(IDS)
    out = fuse(folder, adapter, tmp_path / "fused", dequantize=dequantize)
    config = json.loads((out / "config.json").read_text())
    fused, _ = load(out)
    kinds = {type(m) for _, m in fused.named_modules()}
    if dequantize:
        assert "quantization" not in config and "quantization_config" not in config
        assert nn.QuantizedLinear not in kinds and nn.QuantizedEmbedding not in kinds
        assert mx.allclose(fused(IDS), unfused, atol=1e-4)
    else:
        assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
        assert nn.QuantizedLinear in kinds and nn.Linear not in kinds
    assert mx.allclose(fused(IDS), mlx_lm_fused_logits(folder, adapter, dequantize), atol=1e-4)
    # the folder loads in mlx-lm too, with the same weights and tokenizer
    assert mx.allclose(mlx_lm_logits(out), fused(IDS), atol=1e-4)
    assert mlx_lm.load(str(out))[1].encode("paris") == tok.encode("paris")


def test_fuse_keeps_the_stored_dtype(root, tmp_path):
    """A float16 base fuses into float16 weights (and float16 scales when quantized)."""
    for bits in (None, 4):
        folder = write_lora_model(tmp_path / f"fp16-{bits}", "openelm", root / "tok", bits=bits,
                            dtype=mx.float16)  # fmt: skip
        model, _ = lora_model(folder)
        save_adapters(model, tmp_path / f"adapter-{bits}", LoRAConfig())
        out = fuse(folder, tmp_path / f"adapter-{bits}", tmp_path / f"fused-{bits}")
        stored = mx.load(str(folder / "model.safetensors"))
        fused = mx.load(str(out / "model.safetensors"))
        assert {k: v.dtype for k, v in fused.items()} == {k: v.dtype for k, v in stored.items()}
        assert mx.float16 in {v.dtype for v in fused.values()}


def test_fused_folder_gets_the_usual_permissions(root, tmp_path):
    """Like the adapter folder: the modes the umask allows, not the staging folder's 0700."""
    model, _ = lora_model(root / "llama")
    save_adapters(model, tmp_path / "adapter", LoRAConfig())
    old = os.umask(0o022)
    try:
        out = fuse(root / "llama", tmp_path / "adapter", tmp_path / "fused")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o644}


def test_cli_finetune_generate_fuse(root, tmp_path):
    runner = CliRunner()
    out = tmp_path / "adapter"
    args = ["finetune", "-m", str(root / "olmo"), "--data", str(root / "data"), "-o", str(out),
            "--iters", "150", "--batch-size", "2", "--learning-rate", "3e-3", "--val-every",
            "50", "--save-every", "100", "--plot"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "LoRA on 14 layers" in result.output and "saved the adapter" in result.output
    # an existing adapter is not overwritten by accident
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "--resume" in again.output
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and b"IEND" in png[-12:]
    row = ROWS[0]
    gen = runner.invoke(app, ["generate", "-m", str(root / "olmo"), "--adapter", str(out),
                              "-p", row["prompt"], "--max-tokens", "12"])  # fmt: skip
    assert gen.exit_code == 0, gen.output
    assert row["completion"].strip() in gen.output
    fused = runner.invoke(app, ["fuse", "-m", str(root / "olmo"), "--adapter", str(out), "-o",
                                str(tmp_path / "fused")])  # fmt: skip
    assert fused.exit_code == 0, fused.output
    model, tok = load(tmp_path / "fused")
    assert generate(model, tok, row["prompt"], max_tokens=12).strip() == row["completion"].strip()


def test_cli_reports_bad_data_before_training(root, tmp_path):
    write_jsonl(tmp_path / "data", "train", [{"text": "fine"}, {"txt": "typo"}])
    result = CliRunner().invoke(app, ["finetune", "-m", str(root / "llama"), "--data",
                                      str(tmp_path / "data"), "-o", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 1
    assert "train.jsonl:2: unknown keys ['txt']" in result.output
    assert not (tmp_path / "out").exists()


def png_pixels(path: Path) -> np.ndarray:
    """Decode the 8-bit RGB, filter-0 PNG that elm_mlx.train.plot writes."""
    data = path.read_bytes()
    width, height = np.frombuffer(data[16:24], ">u4")
    idat, pos = b"", 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, -1)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, 3)


def test_plot_draws_both_curves(tmp_path):
    from elm_mlx.train.plot import BLUE, ORANGE, plot_log

    log = tmp_path / LOG_FILE
    lines = ["step,loss,val_loss,learning_rate,tokens,tokens_per_sec,peak_memory_gb,elapsed_s",
             "0,,3.0,,,,,0"]  # fmt: skip
    lines += [f"{s},{3 / s:.4f},,1e-4,{10 * s},100,0.1,{s}" for s in range(1, 101)]
    lines += ["50,,1.5,,,,,50", "100,,1.0,,,,,100"]
    log.write_text("\n".join(lines) + "\n")
    pixels = png_pixels(plot_log(log, tmp_path / "loss.png"))
    assert pixels.shape == (420, 720, 3)
    blue = np.argwhere((pixels == BLUE).all(axis=-1))
    orange = np.argwhere((pixels == ORANGE).all(axis=-1))
    assert len(blue) > 500 and len(orange) > 300
    # the training curve falls: its right end is lower on the image (larger row index)
    curve = blue[blue[:, 0] > 40]
    left = curve[curve[:, 1] < 120][:, 0].mean()
    right = curve[curve[:, 1] > 650][:, 0].mean()
    assert right > left + 150


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_equals_plain_cross_entropy(root, family):
    model, _ = lora_model(root / family)
    randomize_lora_b(model)
    inputs = mx.random.randint(0, 400, (3, 19))
    targets = mx.random.randint(0, 400, (3, 19))
    mask = (mx.random.uniform(shape=(3, 19)) > 0.3).astype(mx.float32)

    def plain(model, inputs, targets, mask):
        logits = model(inputs).astype(mx.float32)
        return (nn.losses.cross_entropy(logits, targets) * mask).sum()

    def chunked(model, inputs, targets, mask):
        body, _, head = body_and_head(model)
        h = body(inputs, None)  # (3, 19, D) -> 57 positions in chunks of 10
        h = h.reshape(-1, h.shape[-1])
        return chunked_cross_entropy(head, h, targets.reshape(-1), mask.reshape(-1), rows=10)

    want, want_grads = nn.value_and_grad(model, plain)(model, inputs, targets, mask)
    got, got_grads = nn.value_and_grad(model, chunked)(model, inputs, targets, mask)
    assert mx.allclose(got, want, rtol=1e-5)
    want_grads, got_grads = dict(tree_flatten(want_grads)), dict(tree_flatten(got_grads))
    assert len(want_grads) == len(got_grads) > 0
    for k, g in want_grads.items():
        assert mx.abs(g).max().item() > 0
        assert mx.allclose(got_grads[k], g, atol=1e-5, rtol=1e-4), k
    # what the trainer calls: the same value, and without the gradient work for validation
    for grad in (True, False):
        loss, count = cross_entropy_sum(model, inputs, targets, mask, grad=grad)
        assert mx.allclose(loss, want, rtol=1e-5) and count.item() == mask.sum().item()


def test_grad_checkpointing_trains_the_same_adapter(root, tmp_path):
    adapters = []
    for checkpoint in (False, True):
        model, tok = lora_model(root / "llama")
        layer_class = type(model.layers[0])
        config = TrainConfig(iters=4, batch_size=2, learning_rate=3e-3, val_every=0,
                             grad_checkpoint=checkpoint)  # fmt: skip
        trainer(model, tok, root, tmp_path / str(checkpoint), config).run()
        assert type(model.layers[0]) is layer_class  # restored after training
        adapters.append(mx.load(str(tmp_path / str(checkpoint) / "adapters.safetensors")))
    for k, v in adapters[0].items():
        assert mx.allclose(adapters[1][k], v, atol=1e-6), k


@pytest.fixture(scope="module")
def smollm2_fp32() -> Path:
    """The real SmolLM2 in float32 (see tiny_models.py); QLoRA is covered by the tiny quantized models
    above."""
    return smollm2_fp32_folder()


@pytest.mark.slow
def test_lora_on_the_real_model(smollm2_fp32, tmp_path):
    """LoRA on SmolLM2 learns a few chat answers; mlx-lm computes the same adapted logits;
    the fused folder answers like the adapter."""
    import mlx_lm

    facts = [("the secret word", "pineapple"), ("the project's mascot", "a purple owl"),
             ("the meeting room", "room 42"), ("the wifi password", "blue-harbor-7")]  # fmt: skip
    rows = [{"messages": [{"role": "user", "content": f"What is {q}?"},
                          {"role": "assistant", "content": f"It is {a}."}]} for q, a in facts]  # fmt: skip
    write_jsonl(tmp_path / "data", "train", rows)
    write_jsonl(tmp_path / "data", "valid", rows)
    config = TrainConfig(iters=24, batch_size=2, learning_rate=2e-3, warmup=4, val_every=24)
    lora = LoRAConfig(rank=8, alpha=16, num_layers=8)
    out = tmp_path / "adapter"
    model, tok = load(smollm2_fp32)
    mx.random.seed(0)
    apply_lora(model, lora)
    splits = load_splits(tmp_path / "data", tok, model.model_type, 512)
    t = Trainer(model, splits, out, config, lora, progress=False)
    first = t.evaluate(splits.valid, -1)
    result = t.run()
    assert result.val_loss < first / 4

    messages = [{"role": "user", "content": "What is the secret word?"}]
    prompt = tok._tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    ids = mx.array(tok.encode(prompt, add_special_tokens=False))[None]
    ours, _ = load(smollm2_fp32, adapter_path=out)
    theirs, _ = mlx_lm.load(str(smollm2_fp32), adapter_path=str(out))
    assert mx.allclose(ours(ids), theirs(ids), atol=1e-3, rtol=1e-4)
    model.eval()
    answer = generate(model, tok, prompt, max_tokens=12)
    assert "pineapple" in answer

    fused = fuse(smollm2_fp32, out, tmp_path / "fused")
    fused_model, fused_tok = load(fused)
    assert "pineapple" in generate(fused_model, fused_tok, prompt, max_tokens=12)
