"""Calibrated and mixed-precision quantization (`elm convert --quantize --calibrate --bpw B`)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from elm_mlx.cli.main import app
from folders import leftovers, tensors_of
from mlx.utils import tree_flatten
from oracles import dequantize_np, logits_of
from typer.testing import CliRunner

from elm_mlx.eval.perplexity import encode_text
from elm_mlx.loader import build_model, load, load_model
from elm_mlx.lora import LoRAConfig, apply_lora, save_adapters
from elm_mlx.quantize import CalibrationConfig, default_text, split
from elm_mlx.quantize.gptq import asymmetric_target
from elm_mlx.quantize.grid import Setting, fit_grid
from elm_mlx.quantize.layers import quantize_weight
from elm_mlx.quantize.mixed import allocate, lower_hull
from elm_mlx.quantize.recipe import quantize_model
from elm_mlx.quantize.sensitivity import measure, rounded
from elm_mlx.train.dataset import load_splits
from elm_mlx.train.fuse import fuse
from elm_mlx.train.trainer import TrainConfig, Trainer

runner = CliRunner()
BUDGET = 5.0  # bits per weight; float32 folders store 32-bit scales: 4-bit g64 costs 5.0


def held_out(tokenizer, n: int = 512) -> list[int]:
    """Tokens of the default calibration text that calibration never sees."""
    ids = encode_text(tokenizer, default_text())
    return split(ids, CalibrationConfig(), "default").held_out[:n]


def relative_error(folder: Path, reference: np.ndarray, ids: list[int]) -> float:
    logits = logits_of(load_model(folder).model, ids)
    return float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))


# ---------------------------------------------------------------------------- grids and GPTQ


def test_grid_search_hits_a_source_grid_exactly():
    """Weights stored as 4-bit min-max groups of 32 (GGUF Q4_1, like SmolLM2's blocks) come back
    exactly at group 32, where mx.quantize's zero-aligned grid does not; at group 64 the
    sub-block grids keep half of each group exact."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(64, 256)).astype(np.float32)
    codes[:, ::32], codes[:, 1::32] = 0, 15  # each group spans its whole grid
    scale = rng.uniform(0.005, 0.02, size=(64, 8)).astype(np.float16).astype(np.float32)
    low = rng.uniform(-0.2, -0.05, size=(64, 8)).astype(np.float16).astype(np.float32)
    w = (codes.reshape(64, 8, 32) * scale[..., None] + low[..., None]).reshape(64, 256)
    ones = np.ones(256, np.float32)
    s, b = fit_grid(w, ones, Setting(4, 32), mx.float16)
    deq = np.array(mx.dequantize(*mx.quantize(mx.array(w), 32, 4), 32, 4))
    assert np.abs(deq - w).max() > 1e-3  # mx.quantize's own grid misses
    q = np.clip(np.rint((w.reshape(64, 8, 32) - b[..., None]) / s[..., None]), 0, 15)
    np.testing.assert_array_equal(q * s[..., None] + b[..., None], w.reshape(64, 8, 32))


def test_asymmetric_target_is_the_least_squares_fit_to_the_float_outputs():
    """W* = W + W C H^-1 is the weight that, on the quantized model's inputs X_q, best matches
    the float model's outputs X_f W^T (undamped); alpha takes that share of the correction, and
    quantizing W* with GPTQ on H matches the float outputs better than quantizing W."""
    rng = np.random.default_rng(0)
    tokens, n, out = 4096, 64, 32
    x_f = (rng.normal(size=(tokens, n)) @ rng.normal(size=(n, n)) / 8).astype(np.float32)
    x_q = x_f + 0.3 * x_f.std(0) * rng.normal(size=(tokens, n)).astype(np.float32)
    w = rng.normal(size=(out, n)).astype(np.float32)
    h = x_q.T.astype(np.float64) @ x_q / tokens
    cross = (x_f - x_q).T.astype(np.float64) @ x_q / tokens
    best = np.linalg.lstsq(x_q.astype(np.float64), x_f.astype(np.float64) @ w.T, rcond=None)[0].T
    target = asymmetric_target(w, h, cross, damp=0.0)
    np.testing.assert_allclose(target, best, rtol=1e-4, atol=1e-4)
    half = asymmetric_target(w, h, cross, alpha=0.5, damp=0.0)
    np.testing.assert_allclose(half, (w + best) / 2, rtol=1e-4, atol=1e-4)

    def error(weight: np.ndarray) -> float:
        q = quantize_weight(mx.array(weight), Setting(4, 32), mx.float32, h).dequantized()
        return float(np.linalg.norm(x_q @ np.array(q).T - x_f @ w.T))

    assert error(asymmetric_target(w, h, cross)) < 0.9 * error(w)


@pytest.mark.parametrize("family", ["llama", "olmo", "openelm"])
def test_asymmetric_calibration_follows_the_float_model_more_closely(tiny, family):
    """Fitted (half way, block by block) to the float model's outputs rather than to its
    weights on the quantized model's inputs, the 4-bit model's logits move less from the float
    model's, on the calibration windows and on held-out ones (GPTAQ)."""
    path = tiny.converted(family)
    float_model, tokenizer = load(path)
    ids = encode_text(tokenizer, default_text()[:200_000])
    calibration = mx.array(ids[: 16 * 128]).reshape(16, 128)
    held = mx.array(ids[-8 * 128 :]).reshape(8, 128)
    reference = [float_model(x) for x in (calibration, held)]

    def errors(asymmetric: float) -> list[float]:
        model, _ = load(path)  # a fresh copy: `tiny.load` shares one
        config = CalibrationConfig(asymmetric=asymmetric)
        quantize_model(model, calibration, Setting(4, 32), mx.float32, config=config)
        return [
            (mx.linalg.norm(model(x) - r) / mx.linalg.norm(r)).item()
            for x, r in zip((calibration, held), reference, strict=True)
        ]

    (cal_gptq, held_gptq), (cal_gptaq, held_gptaq) = errors(0.0), errors(0.5)
    assert cal_gptaq < 0.95 * cal_gptq, (cal_gptaq, cal_gptq)
    assert held_gptaq < held_gptq, (held_gptaq, held_gptq)


def test_allocation_spends_the_budget_where_error_falls_fastest():
    cheap, dear = Setting(3, 64), Setting(4, 64)
    options = {  # (bits, error, setting): the same price, very different gains
        "sensitive": [(100.0, 50.0, cheap), (150.0, 1.0, dear)],
        "robust": [(100.0, 2.0, cheap), (150.0, 1.0, dear)],
    }
    assert allocate(options, 250.0) == {"sensitive": dear, "robust": cheap}
    assert allocate(options, 300.0) == {"sensitive": dear, "robust": dear}
    assert allocate(options, 200.0) == {"sensitive": cheap, "robust": cheap}
    # a point above the chord of its neighbours is never a step of the hull
    hull = lower_hull([(1.0, 10.0, cheap), (2.0, 9.9, dear), (3.0, 1.0, Setting(8, 64))])
    assert [p[0] for p in hull] == [1.0, 3.0]


# ---------------------------------------------------------------------------- each family


@pytest.mark.parametrize("family", ["llama", "olmo", "openelm"])
def test_calibrated_4bit_beats_round_to_nearest(tiny, family):
    """Same bits, same groups, same text: GPTQ on fitted grids moves the logits on held-out
    tokens less than rounding to nearest does."""
    float_model, tokenizer = tiny.load(family)
    ids = held_out(tokenizer)
    reference = logits_of(float_model, ids)
    plain = tiny.converted(family, quantize=True, bits=4, group_size=64)
    calibrated = tiny.converted(family, quantize=True, calibrate=True, bits=4, group_size=64)
    assert (
        json.loads((calibrated / "config.json").read_text())["quantization"]
        == json.loads((plain / "config.json").read_text())["quantization"]
    )
    err_plain = relative_error(plain, reference, ids)
    err_calibrated = relative_error(calibrated, reference, ids)
    assert err_calibrated < 0.9 * err_plain, (err_calibrated, err_plain)


@pytest.mark.parametrize("family", ["llama", "olmo", "openelm"])
def test_mixed_precision_meets_the_budget(tiny, family):
    """Bits per weight counted from the written tensors (codes + scales + biases over every
    quantized tensor) stay within the budget, several settings are used, config.json names
    each layer's setting, and the model computes with exactly the stored weights."""
    out = tiny.converted(family, quantize=True, bpw=BUDGET)
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization"]
    tensors = tensors_of(out)
    reference = build_model(config)  # its (lazy) parameters give the float shapes
    shapes = {k: v.shape for k, v in tree_flatten(reference.parameters())}
    bits = weights = 0
    settings = set()
    for name in tensors:
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        w, s, b = (tensors[f"{module}.{k}"] for k in ("weight", "scales", "biases"))
        rows, n_in = shapes[f"{module}.weight"]
        setting = (w.shape[-1] * 32 // n_in, n_in // s.shape[-1])  # (bits, group size)
        assert setting == (quant.get(module, quant)["bits"], quant.get(module, quant)["group_size"])
        settings.add(setting)
        bits += 8 * (w.nbytes + s.nbytes + b.nbytes)
        weights += rows * n_in
    assert BUDGET - 0.5 < bits / weights <= BUDGET
    assert len(settings) > 1
    # the loaded model is the dequantized weights (numpy decodes each layer's own setting)
    model = load_model(out).model
    floats = {}
    for name, t in tensors.items():
        module = name[: -len(".weight")]
        if name.endswith(".weight") and f"{module}.scales" in tensors:
            scales, biases = (np.array(tensors[f"{module}.{k}"]) for k in ("scales", "biases"))
            bits, group = (quant.get(module, quant)[k] for k in ("bits", "group_size"))
            floats[name] = mx.array(dequantize_np(np.array(t), scales, biases, bits, group))
        elif not name.endswith((".scales", ".biases")):
            floats[name] = t
    reference.load_weights(list(floats.items()))
    ids = list(range(3, 40))
    np.testing.assert_allclose(logits_of(model, ids), logits_of(reference, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "openelm"])  # mlx-lm's olmo.py is not HF OLMo
def test_mlx_lm_loads_the_mixed_folder(tiny, family):
    out = tiny.converted(family, quantize=True, bpw=BUDGET)
    theirs, _ = mlx_lm.load(str(out))
    ids = list(range(3, 40))
    np.testing.assert_allclose(
        logits_of(theirs, ids), logits_of(load_model(out).model, ids), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("family", ["llama", "olmo", "openelm"])
def test_qlora_and_fuse_on_a_mixed_base(tiny, family, tmp_path):
    base = tiny.converted(family, quantize=True, bpw=BUDGET)
    rows = [{"text": "the capital of france is paris"}, {"text": "the capital of italy is rome"}]
    data = tmp_path / "data"
    data.mkdir()
    for split_name in ("train", "valid"):
        (data / f"{split_name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tokenizer = load(base)
    frozen = {k: v for k, v in tree_flatten(model.parameters())}
    mx.random.seed(0)
    lora = LoRAConfig(rank=4, alpha=8)
    apply_lora(model, lora)
    splits = load_splits(data, tokenizer, model.model_type, 64)
    config = TrainConfig(iters=40, batch_size=2, learning_rate=3e-3, val_every=40, save_every=0)
    trainer = Trainer(model, splits, tmp_path / "run", config, lora, progress=False)
    first = trainer.evaluate(splits.valid, -1)
    assert trainer.run().val_loss < 0.8 * first
    after = {k.replace(".linear.", "."): v for k, v in tree_flatten(model.parameters())}
    assert all(mx.array_equal(after[k], v) for k, v in frozen.items())  # the base stays frozen
    save_adapters(model, tmp_path / "adapter", lora)
    model.eval()
    ids = mx.array([[1, 5, 17, 33, 99, 120]])
    adapted = model(ids)

    fused = fuse(base, tmp_path / "adapter", tmp_path / "fused")
    quant = json.loads((fused / "config.json").read_text())["quantization"]
    assert quant == json.loads((base / "config.json").read_text())["quantization"]
    fused_model, _ = load(fused)
    kinds = {(m.bits, m.group_size) for _, m in fused_model.named_modules()
             if isinstance(m, nn.QuantizedLinear)}  # fmt: skip
    assert len(kinds) > 1  # each layer keeps its own setting
    as_float = fuse(base, tmp_path / "adapter", tmp_path / "float", dequantize=True)
    assert mx.allclose(load(as_float)[0](ids), adapted, atol=1e-4)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--calibrate"], "--calibrate needs --quantize"),
        (["--bpw", "4.5"], "--bpw needs --quantize"),
        (["-q", "--bpw", "2"], "--bpw must be between"),
        (["-q", "--bpw", "17"], "--bpw must be between"),
        (["--asymmetric", "0.5"], "--asymmetric needs --quantize"),
        (["-q", "--asymmetric", "1.5"], "--asymmetric must be between 0 and 1"),
        (["-q", "--calibrate", "--calibration-file", "MISSING"], "does not exist"),
        (["-q", "--calibrate", "--calibration-file", "EMPTY"], "is empty"),
        (["-q", "--calibrate", "--calibration-file", "SHORT"], "one window"),
    ],
)
def test_bad_calibration_options(tiny, tmp_path, extra, message):
    files = {"MISSING": tmp_path / "nope.txt", "EMPTY": tmp_path / "empty.txt",
             "SHORT": tmp_path / "short.txt"}  # fmt: skip
    files["EMPTY"].write_text(" \n")
    files["SHORT"].write_text("the quick brown fox jumps over the lazy dog. " * 20)
    extra = [str(files.get(a, a)) for a in extra]
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(tiny.hf("llama")), "-o", str(out), *extra])
    assert result.exit_code == 1
    assert message in result.stderr and "error: --" in result.stderr
    assert not out.exists() and leftovers(out) == []


def test_calibrate_through_the_cli_reports_held_out_perplexity(tiny, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(default_text()[:60_000])
    out = tmp_path / "out"
    args = ["convert", str(tiny.hf("llama")), "-o", str(out), "-q", "--calibrate"]
    result = runner.invoke(app, [*args, "--calibration-file", str(text)])
    assert result.exit_code == 0, result.stderr
    assert f"held-out tokens of {text}" in result.stderr
    assert "bits per weight" in result.stderr and f"wrote {out}" in result.stderr
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert "4-bit g64" in result.stderr and "layers (100%)" in result.stderr  # the plan
    assert "float model wrote" not in result.stderr  # a file alone, unless --own-text


def test_asymmetric_calibration_through_the_cli(tiny, tmp_path):
    """--asymmetric reaches the quantizer (the codes differ from GPTQ's on the same text), the
    report says so, and the folder loads in mlx-lm with the same tensors."""
    text = tmp_path / "text.txt"
    text.write_text(default_text()[:60_000])
    args = [str(tiny.hf("llama")), "-q", "--calibration-file", str(text), "--dtype", "float32"]
    outs = [tmp_path / "gptq", tmp_path / "gptaq"]
    result = runner.invoke(app, ["convert", *args, "-o", str(outs[0])])
    assert result.exit_code == 0, result.stderr
    assert "calibrated (GPTQ) on" in result.stderr
    result = runner.invoke(app, ["convert", *args, "-o", str(outs[1]), "--asymmetric", "0.5"])
    assert result.exit_code == 0, result.stderr
    assert "calibrated (GPTAQ, 0.5 of the way to the float outputs) on" in result.stderr
    gptq, gptaq = tensors_of(outs[0]), tensors_of(outs[1])
    assert sorted(gptq) == sorted(gptaq)
    codes = [k for k in gptq if k.endswith("mlp.down_proj.weight")]
    assert codes and any(not np.array_equal(gptq[k], gptaq[k]) for k in codes)
    theirs, _ = mlx_lm.load(str(outs[1]))
    ids = list(range(3, 40))
    np.testing.assert_allclose(
        logits_of(theirs, ids), logits_of(load_model(outs[1]).model, ids), atol=1e-4, rtol=0
    )


def test_a_tokenizer_beyond_the_vocabulary_is_refused(tiny, tmp_path):
    """Ids past the embedding would index garbage: the converter names the mismatch instead."""
    src = tiny.hf("llama", vocab_size=256)  # its tokenizer has 400 ids
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(src), "-o", str(out), "-q", "--calibrate"])
    assert result.exit_code == 1
    assert "the model has 256 embeddings" in result.stderr and "--tokenizer" in result.stderr
    assert not out.exists() and leftovers(out) == []


class InputEnergy(nn.Module):
    """The test's own record of diag E[x x^T] over a linear layer's inputs."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear, self.inputs = linear, []

    def __call__(self, x: mx.array) -> mx.array:
        self.inputs.append(x.reshape(-1, x.shape[-1]))
        return self.linear(x)


@pytest.mark.parametrize("family", ["llama", "openelm"])
def test_measured_cost_is_the_kl_of_rounding_that_layer_alone(tiny, family):
    """A layer's measured cost at the probe setting is the mean KL, over the positions, of the
    float model's next-token distribution against the same model with only that layer rounded
    (computed here with whole forward passes), and other settings scale it by their rounding
    error."""
    model, tokenizer = load(tiny.converted(family))
    tokens = mx.array(held_out(tokenizer, 48))[None]
    probe, finer = Setting(4, 32), Setting(8, 32)
    measured = measure(model, tokens, [probe, finer], probe, mx.float32)
    reference = nn.log_softmax(model(tokens).astype(mx.float32))
    layers = dict(model.named_modules())
    blocks = [p for p in measured if isinstance(layers[p], nn.Linear) and ".layers." in p]
    for path in (blocks[0], blocks[len(blocks) // 2], blocks[-1]):
        linear = layers[path]
        parent, name = path.rsplit(".", 1)
        recorder = InputEnergy(linear)
        setattr(layers[parent], name, recorder)
        model(tokens)
        setattr(layers[parent], name, linear)
        x = mx.concatenate(recorder.inputs).astype(mx.float32)
        h_diag = np.array((x * x).mean(0))
        w = np.array(linear.weight)
        linear.weight = mx.array(rounded(w, h_diag, probe, mx.float32))
        logprobs = nn.log_softmax(model(tokens).astype(mx.float32))
        linear.weight = mx.array(w)
        kl = (mx.exp(reference) * (reference - logprobs)).sum(-1).mean().item()
        costs = {s: err for _, err, s in measured[path].options}
        assert kl > 0
        np.testing.assert_allclose(costs[probe], kl, rtol=1e-3)
        assert 0 < costs[finer] < costs[probe] / 50  # 8 bits: 16x finer steps, ~256x less error
    embeddings = [p for p in measured if isinstance(layers[p], nn.Embedding)]
    assert len(embeddings) == 1 and measured[embeddings[0]].options[0][1] > 0


class Outputs(nn.Module):
    """The test's own record of a module's outputs."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module, self.outputs = module, []

    def __call__(self, x: mx.array) -> mx.array:
        y = self.module(x)
        self.outputs.append(y.reshape(-1, y.shape[-1]))
        return y


@pytest.mark.parametrize("family", ["llama", "openelm"])
def test_the_output_layer_is_probed_as_calibration_fits_it(tiny, family):
    """The output layer's measured cost at the probe setting is the KL of the model with that
    layer fitted by GPTQ to the final hidden states of the calibration windows (the second
    moment of the final norm's outputs, recorded here), not rounded to nearest."""
    model, tokenizer = load(tiny.converted(family))
    ids = held_out(tokenizer, 144)
    tokens, windows = mx.array(ids[:48])[None], mx.array(ids).reshape(3, 48)
    probe = Setting(4, 32)
    measured = measure(model, tokens, [probe], probe, mx.float32, windows=windows)
    layers = dict(model.named_modules())
    norm_path = next(p for p, m in layers.items() if p.endswith(".norm") and ".layers." not in p)
    parent, name = norm_path.rsplit(".", 1)
    recorder = Outputs(layers[norm_path])
    setattr(layers[parent], name, recorder)
    model(windows)
    setattr(layers[parent], name, recorder.module)
    x = mx.concatenate(recorder.outputs).astype(mx.float32)  # (tokens, D)
    moment = np.array(x.T @ x, np.float64) / x.shape[0]
    output = (
        "lm_head"
        if "lm_head" in measured
        else next(p for p in measured if isinstance(layers[p], nn.Embedding))
    )
    module = layers[output]
    reference = nn.log_softmax(model(tokens).astype(mx.float32))

    def kl_with(weight: mx.array) -> float:
        original, module.weight = module.weight, weight
        logprobs = nn.log_softmax(model(tokens).astype(mx.float32))
        module.weight = original
        return (mx.exp(reference) * (reference - logprobs)).sum(-1).mean().item()

    fitted = kl_with(quantize_weight(module.weight, probe, mx.float32, moment).dequantized())
    w = np.array(module.weight)
    by_rounding = kl_with(
        mx.array(rounded(w, np.diag(moment).astype(np.float32), probe, mx.float32))
    )
    cost = {s: err for _, err, s in measured[output].options}[probe]
    np.testing.assert_allclose(cost, fitted, rtol=1e-3)
    assert cost > 0 and abs(cost - by_rounding) > 1e-2 * by_rounding  # not the rounding's KL
