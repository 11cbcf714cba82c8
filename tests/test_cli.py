"""The `elm` command: help texts, a real `elm convert` and `elm generate` process, and the
split between generated text (stdout) and statistics (stderr)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from elm_mlx.cli.main import app
from elm_mlx.convert import ConvertOptions
from helpers import random_ids, write_hf_llama
from oracles import logits_of, torch_logits
from typer.testing import CliRunner

from elm_mlx import _blas, generate
from elm_mlx.engine.config import GenerationConfig
from elm_mlx.loader import load_model
from elm_mlx.tokenizer import render_chat

runner = CliRunner()
PROMPT = "the capital of france is"


def test_elm_help_in_a_real_process():
    proc = subprocess.run(["elm", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for command in ("convert", "generate"):
        assert command in proc.stdout


@pytest.mark.parametrize(
    "command,options",
    [
        ("convert", ["--out", "--dtype", "--quantize", "--bits", "--group-size", "--tokenizer"]),
        ("generate", ["--model", "--prompt", "--max-tokens", "--temp", "--top-p", "--top-k"]),
    ],
)
def test_command_help(command, options):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.stdout
    # Defaults come from the library's dataclasses.
    if command == "generate":
        assert f"[default: {GenerationConfig().max_tokens}]" in result.stdout
    else:
        assert f"[default: {ConvertOptions().group_size}]" in result.stdout


def test_elm_convert_in_a_real_process(tiny, tmp_path):
    """A pickled pytorch_model.bin through the installed `elm` command."""
    src = write_hf_llama(tmp_path / "hf", fmt="bin", tokenizer=tiny.spm, seed=11)
    out = tmp_path / "mlx"
    proc = subprocess.run(
        ["elm", "convert", str(src), "-o", str(out), "--dtype", "float32"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and f"wrote {out}" in proc.stderr
    ids = random_ids(12)
    np.testing.assert_allclose(
        logits_of(load_model(out).model, ids), torch_logits(src, ids), atol=1e-4, rtol=0
    )


def test_convert_quantized_through_the_cli(tiny, tmp_path):
    out = tmp_path / "q"
    args = ["convert", str(tiny.hf("llama")), "-o", str(out), "-q", "--bits", "8"]
    result = runner.invoke(app, [*args, "--group-size", "32"])
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}


@pytest.mark.parametrize("family", ["llama", "openelm"])
def test_elm_generate_in_a_real_process(tiny, family):
    """stdout holds exactly the generated text; stats and --verbose details go to stderr."""
    folder = tiny.converted(family)
    model, tokenizer = tiny.load(family)
    expected = generate(model, tokenizer, PROMPT, max_tokens=12, temperature=1.0, seed=5)
    args = ["-m", str(folder), "-p", PROMPT, "--max-tokens", "12", "--temp", "1.0"]
    proc = subprocess.run(
        ["elm", "generate", *args, "--seed", "5", "--verbose"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"
    assert "tokens/s" in proc.stderr and "peak memory" in proc.stderr
    assert f"BLAS: {_blas.describe()}" in proc.stderr
    for word in ("tokens/s", "peak memory", "BLAS"):
        assert word not in proc.stdout
    assert "[transformers]" not in proc.stderr  # its warning on model types it does not know


def test_generate_options_reach_the_library(tiny):
    folder = str(tiny.converted("olmo"))
    model, tokenizer = tiny.load("olmo")
    args = ["generate", "-m", folder, "-p", PROMPT, "--max-tokens", "20", "--temp", "0.8"]
    result = runner.invoke(app, [*args, "--top-k", "20", "--seed", "2"])
    assert result.exit_code == 0, result.stderr
    expected = generate(model, tokenizer, PROMPT, max_tokens=20, temperature=0.8, top_k=20, seed=2)
    assert result.stdout == expected + "\n"
    assert "tokens/s" in result.stderr and "BLAS" not in result.stderr  # not --verbose
    # the seed keys each position: speculating draws the same tokens
    spec = runner.invoke(app, [*args, "--top-k", "20", "--seed", "2", "--prompt-lookup", "3"])
    assert spec.exit_code == 0 and spec.stdout == result.stdout


def test_generate_chat_and_prompt_file(tiny, tmp_path):
    folder = str(tiny.converted("openelm"))
    model, tokenizer = tiny.load("openelm")
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("hello there")
    args = ["generate", "-m", folder, "--prompt-file", str(prompt_file), "--max-tokens", "8"]
    result = runner.invoke(app, [*args, "--chat", "--system", "be brief"])
    assert result.exit_code == 0, result.stderr
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
    ]
    text = render_chat(tokenizer, messages, "openelm")
    assert text.endswith("<|assistant|>\n")  # OpenELM's Zephyr-style turns
    assert result.stdout == generate(model, tokenizer, text, max_tokens=8) + "\n"
