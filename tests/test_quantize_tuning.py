"""Tuning a quantized model's scales and biases to the float model (`elm convert
--tune-seconds`)."""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from elm_mlx.cli.main import app
from folders import leftovers, tensors_of
from mlx.utils import tree_flatten
from oracles import logits_of
from typer.testing import CliRunner

from elm_mlx.eval.perplexity import encode_text
from elm_mlx.loader import load, load_model
from elm_mlx.quantize import default_text
from elm_mlx.quantize.block_tuning import BlockTuning, block_error, tune_block, tune_norms
from elm_mlx.quantize.calibration_text import spread_index
from elm_mlx.quantize.distill import DistillConfig, cut, distill, kl_divergence, teacher
from elm_mlx.quantize.grid import Setting
from elm_mlx.quantize.recipe import quantize_model

runner = CliRunner()


@pytest.mark.parametrize("family", ["llama", "openelm"])
def test_teacher_gives_the_float_models_own_next_token_distributions(tiny, family):
    """Oracle: the float model's forward pass. The teacher, kept as final hidden states and
    the output layer's weight, gives back its log-probabilities on any of the windows, and
    the KL against them is 0 for the float model itself and the numpy KL for a perturbed one."""
    model, tokenizer = tiny.load(family)
    ids = encode_text(tokenizer, default_text()[:20_000])
    windows = mx.array(ids[: 6 * 32]).reshape(6, 32)
    target = teacher(model, windows)
    index = mx.array([4, 1])
    logits = model(windows[index]).astype(mx.float32)  # (2, 32, V)
    expected = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    got = target.logprobs(index)
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.array(got), expected, atol=1e-4)
    assert kl_divergence(logits, got).item() == pytest.approx(0.0, abs=1e-5)
    other = np.array(logits) + np.random.default_rng(0).normal(size=logits.shape)
    q = other - np.log(np.exp(other).sum(-1, keepdims=True))
    p = np.exp(expected)
    oracle = (p * (expected - q)).sum(-1).mean()
    assert kl_divergence(mx.array(other, mx.float32), got).item() == pytest.approx(oracle, rel=1e-3)


def test_cut_windows_keeps_each_window_in_order():
    """The tuning windows are the calibration windows cut to length, in order, each window's
    tail that does not fill one dropped; windows already short enough stay as they are."""
    windows = mx.arange(20).reshape(2, 10)
    assert cut(windows, 4).tolist() == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [10, 11, 12, 13],
        [14, 15, 16, 17],
    ]
    assert cut(windows, 10).tolist() == windows.tolist()
    assert cut(windows, 16).tolist() == windows.tolist()


def _tiny_tuning_case(tiny):
    float_model, tokenizer = tiny.load("llama")
    ids = encode_text(tokenizer, default_text()[:80_000])
    windows = mx.array(ids[: 16 * 64]).reshape(16, 64)
    model, _ = load(tiny.converted("llama", quantize=True, bits=4, group_size=32))
    return model, windows, teacher(float_model, windows)


def test_tuning_learns_a_systematic_error_and_keeps_the_codes(tiny):
    """Every quantized layer's scales 10% too large (a systematic error, which tuning to the
    float model on some windows must undo on others): the KL on the held-out windows falls by
    more than half; the codes, the dtypes and everything but scales and biases stay."""
    model, windows, target = _tiny_tuning_case(tiny)
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            m.scales = m.scales * 1.1
    before = dict(tree_flatten(model.parameters()))
    # a fixed number of steps, whatever the machine's load (the budget is far above it)
    config = DistillConfig(seconds=600.0, learning_rate=1e-2, held_out_windows=2, max_steps=128)
    result = distill(model, windows, target, config)
    assert result.steps == 128
    assert result.held_out_after < 0.5 * result.held_out_before, result
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()
    changed = 0
    for name, value in after.items():
        assert value.dtype == before[name].dtype and value.shape == before[name].shape, name
        if name.endswith((".scales", ".biases")):
            changed += not mx.array_equal(value, before[name]).item()
        else:  # the codes, norms and everything else
            assert mx.array_equal(value, before[name]).item(), name
    assert changed > 0
    assert all(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in
               model.named_modules() if hasattr(m, "scales"))  # fmt: skip


def test_tuning_that_does_not_help_keeps_the_parameters_it_started_from(tiny):
    """A learning rate far too high makes every step worse on the held-out windows: the scales
    and biases are then exactly GPTQ's (here rounding's) again."""
    model, windows, target = _tiny_tuning_case(tiny)
    before = dict(tree_flatten(model.parameters()))
    result = distill(model, windows, target, DistillConfig(seconds=1.0, learning_rate=1.0))
    assert result.held_out_after == result.held_out_before
    for name, value in tree_flatten(model.parameters()):
        assert mx.array_equal(value, before[name]).item(), name


def test_tuned_folder_loads_in_mlx_lm_and_reports_the_tuning(tiny, tmp_path):
    out = tmp_path / "out"
    # a budget well above the few steps the check asks for, even on a loaded machine
    args = ["convert", str(tiny.hf("llama")), "-o", str(out), "-q", "--tune-seconds", "12"]
    args += ["--dtype", "float32"]  # (as the tiny conversions: mlx-lm computes in it too)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "blocks tuned to the float model for" in result.stderr
    assert "norms' gains" in result.stderr
    assert "scales and biases tuned to the float model for" in result.stderr  # then end to end
    assert re.search(r"teacher \d+s", result.stderr) and re.search(r"tuning \d+s", result.stderr)
    untuned = tiny.converted("llama", quantize=True, calibrate=True)
    assert sorted(tensors_of(out)) == sorted(tensors_of(untuned))
    theirs, _ = mlx_lm.load(str(out))
    ids = list(range(3, 40))
    np.testing.assert_allclose(
        logits_of(theirs, ids), logits_of(load_model(out).model, ids), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--tune-seconds", "5"], "--tune-seconds needs --quantize"),
        (["-q", "--tune-seconds", "-1"], "--tune-seconds must be >= 0"),
        (["-q", "--tune-seconds", "0.001"], "too short for tuning"),
    ],
)
def test_bad_tuning_budgets(tiny, tmp_path, extra, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(tiny.hf("llama")), "-o", str(out), *extra])
    assert result.exit_code == 1
    assert message in result.stderr and "error: --" in result.stderr
    assert not out.exists() and leftovers(out) == []


# ---------------------------------------------------------------------------- block by block


def _tiny_block_case(tiny, factor: float):
    """A block of the tiny Llama rounded to 4-bit g32 (its scales times `factor`), its float
    block's outputs as the target, on 16 windows of 64 tokens."""
    float_model, tokenizer = tiny.load("llama")
    ids = encode_text(tokenizer, default_text()[:80_000])
    h = float_model.model.embed_tokens(mx.array(ids[: 16 * 64]).reshape(16, 64))  # (N, L, D)
    target = float_model.model.layers[0](h, "causal", None)
    model, _ = load(tiny.converted("llama", quantize=True, bits=4, group_size=32))
    block = model.model.layers[0]
    for _, m in block.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            m.scales = m.scales * factor
    return block, h, target


def test_block_tuning_learns_a_systematic_error_and_keeps_the_codes(tiny):
    """The block's scales 10% too large: tuning its scales (the norms' stage given no time)
    to the float block's outputs on some windows more than halves its error on the held-out
    ones; only scales and biases change."""
    block, h, target = _tiny_block_case(tiny, 1.1)
    before = dict(tree_flatten(block.parameters()))
    config = BlockTuning(seconds=600.0, norm_share=0.0, learning_rate=1e-2, max_steps=60)
    result = tune_block(block, h, target, target, config).scales
    assert result.steps == 60
    assert result.after < 0.5 * result.before, result
    # the result is what the block now does on the held-out windows
    held = spread_index(h.shape[0], config.held_out_windows)
    assert block_error(block, h, target, held) == pytest.approx(result.after, rel=1e-3)
    for name, value in tree_flatten(block.parameters()):
        assert value.dtype == before[name].dtype and value.shape == before[name].shape, name
        same = mx.array_equal(value, before[name]).item()
        assert same != name.endswith((".scales", ".biases")), name
    assert all(isinstance(m, nn.QuantizedLinear) for _, m in block.named_modules()
               if hasattr(m, "scales"))  # fmt: skip


def test_block_tuning_that_does_not_help_keeps_the_parameters_it_started_from(tiny):
    block, h, target = _tiny_block_case(tiny, 1.0)
    before = dict(tree_flatten(block.parameters()))
    config = BlockTuning(seconds=600.0, norm_learning_rate=1.0, learning_rate=1.0, max_steps=7)
    result = tune_block(block, h, target, target, config)
    assert result.norms.steps == result.scales.steps == 7
    assert result.norms.after == result.norms.before
    assert result.scales.after == result.scales.before
    for name, value in tree_flatten(block.parameters()):
        assert mx.array_equal(value, before[name]).item(), name


def test_norm_tweaking_recovers_a_perturbed_gain(tiny):
    """Oracle: the float block itself. Its norms' gains moved by up to 25% either way, tuned
    towards the unperturbed block's outputs on some windows: the error on the held-out ones
    falls by more than half and the gains come back towards the true ones; nothing but the
    norms' weights changes, and they keep their shape and dtype."""
    float_model, tokenizer = tiny.load("llama")
    ids = encode_text(tokenizer, default_text()[:80_000])
    h = float_model.model.embed_tokens(mx.array(ids[: 16 * 64]).reshape(16, 64))  # (N, L, D)
    model, _ = load(tiny.converted("llama"))  # a fresh copy to perturb
    block = model.model.layers[0]
    target = block(h, "causal", None)
    truth = dict(tree_flatten(block.parameters()))
    rng = np.random.default_rng(0)
    for norm in (block.input_layernorm, block.post_attention_layernorm):
        factor = mx.array(rng.uniform(0.75, 1.25, norm.weight.shape), norm.weight.dtype)
        norm.weight = norm.weight * factor
    perturbed = dict(tree_flatten(block.parameters()))
    config = BlockTuning(norm_learning_rate=2e-2, max_steps=100)
    result = tune_norms(block, h, target, config, seconds=600.0)
    assert result.steps == 100
    assert result.after < 0.5 * result.before, result

    def distance(params):
        return sum(
            mx.abs(params[k] - truth[k]).sum().item() for k in truth if k.endswith("norm.weight")
        )

    after = dict(tree_flatten(block.parameters()))
    assert distance(after) < 0.7 * distance(perturbed)
    for name, value in after.items():
        assert value.dtype == perturbed[name].dtype and value.shape == perturbed[name].shape
        assert mx.array_equal(value, perturbed[name]).item() != name.endswith("norm.weight")


def test_norm_tweaking_a_quantized_block_trains_its_norms_only(tiny):
    """A 4-bit block's norms' gains moved 20% up, tuned towards its own outputs before that:
    the held-out error falls by more than half; the block keeps its quantized layers (which the
    stage computes through float stand-ins) with their codes, scales and biases as they were."""
    block, h, _ = _tiny_block_case(tiny, 1.0)
    target = block(h, "causal", None)
    for norm in (block.input_layernorm, block.post_attention_layernorm):
        norm.weight = norm.weight * 1.2
    before = dict(tree_flatten(block.parameters()))
    config = BlockTuning(norm_learning_rate=2e-2, max_steps=60)
    result = tune_norms(block, h, target, config, 600.0)
    assert result.steps == 60
    assert result.after < 0.5 * result.before, result
    # what the stand-ins trained is what the quantized block now does on the held-out windows
    held = spread_index(h.shape[0], config.held_out_windows)
    weight = 1.0 / (mx.mean(mx.square(target.astype(mx.float32)), axis=(0, 1)) + 1e-6)
    assert block_error(block, h, target, held, weight) == pytest.approx(result.after, rel=1e-3)
    assert all(isinstance(m, nn.QuantizedLinear) for _, m in block.named_modules()
               if hasattr(m, "scales"))  # fmt: skip
    for name, value in tree_flatten(block.parameters()):
        assert mx.array_equal(value, before[name]).item() != name.endswith("norm.weight"), name


@pytest.mark.parametrize("family", ["llama", "olmo", "openelm"])
def test_each_family_calibrates_with_its_blocks_tuned(tiny, family):
    """Through calibration: one result per block, none worse on its held-out windows than
    GPTQ's parameters, and every layer of the plan quantized in MLX's layout afterwards."""
    model, tokenizer = load(tiny.converted(family))  # a fresh copy: `tiny.load` shares one
    ids = encode_text(tokenizer, default_text()[:80_000])
    windows = mx.array(ids[: 8 * 64]).reshape(8, 64)
    tune = BlockTuning(seconds=600.0, max_steps=7)
    plan, tuned = quantize_model(model, windows, Setting(4, 32), mx.float32, tune=tune)
    assert len(tuned) == len(model.layers)
    assert all(t.scales.steps == 7 and t.scales.after <= t.scales.before for t in tuned), tuned
    # OLMo's norms have no weights to tune; the others' gains tune
    norm_steps = 0 if family == "olmo" else 7
    assert all(t.norms.steps == norm_steps and t.norms.after <= t.norms.before for t in tuned)
    layers = dict(model.named_modules())
    assert all(isinstance(layers[p], (nn.QuantizedLinear, nn.QuantizedEmbedding)) for p in plan)
