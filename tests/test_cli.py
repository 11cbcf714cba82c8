"""The `elm` command: help texts, a real `elm convert` and `elm generate` process, and the
split between generated text (stdout) and statistics (stderr)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from elm_mlx.cli.chat import HELP
from elm_mlx.cli.main import app
from elm_mlx.convert import ConvertOptions
from oracles import logits_of, torch_logits
from tiny_checkpoints import write_hf_llama
from tiny_data import random_ids
from typer.testing import CliRunner

from elm_mlx import _blas, generate, stream_generate
from elm_mlx.engine.chat_session import ChatSession
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


def first_sentence(doc: str) -> str:
    """Up to the first full stop that ends a sentence (followed by a space or the end)."""
    text = " ".join(doc.split())
    end = next((i for i, c in enumerate(text) if c == "." and text[i + 1 : i + 2] in ("", " ")))
    return text[: end + 1]


def test_each_command_is_summed_up_by_its_first_sentence():
    """`elm --help` lists each command with its docstring's first sentence, on one line;
    `elm COMMAND --help` still shows the whole docstring."""
    env = {**os.environ, "COLUMNS": "300"}  # wide enough that no summary needs wrapping
    proc = subprocess.run(["elm", "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    top = next(i for i, line in enumerate(lines) if "Commands" in line)
    rows = lines[top + 1 : next(i for i in range(top, len(lines)) if lines[i].startswith("╰"))]
    listed = [row.strip("│ ").split(maxsplit=1) for row in rows]
    commands = {c.name: c.callback.__doc__ for c in app.registered_commands}
    assert [name for name, _ in listed] == list(commands)  # no row continues a summary
    for name, summary in listed:
        assert summary == first_sentence(commands[name])
    for name in ("chat", "serve"):  # the two whose first sentence used to break
        full = runner.invoke(app, [name, "--help"], env={"COLUMNS": "300"}).stdout
        assert " ".join(commands[name].split()) in " ".join(full.replace("│", " ").split())


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


def test_chat_commands_in_a_script(tiny, tmp_path):
    """Every /command of `elm chat`, its usage errors and an unknown one, read from a pipe:
    what each says (on stderr) and does; the one message is answered as the library answers."""
    folder = tiny.converted("llama")
    model, tokenizer = tiny.load("llama")
    session = ChatSession(
        model, tokenizer, system="be brief", config=GenerationConfig(max_tokens=4)
    )
    expected = "".join(r.text for r in session.send("hello"))
    saved = tmp_path / "chat.json"
    said = [
        ("/help", HELP),
        ("/system be brief", "(system prompt set)"),
        ("/system", "be brief"),
        ("hello", ""),
        ("/save", "usage: /save FILE"),
        (f"/save {saved}", f"(saved 3 messages to {saved})"),
        ("/reset", "(conversation cleared)"),
        ("/stats", "conversation: 1 messages"),
        ("/load", "usage: /load FILE"),
        (f"/load {saved}", f"(loaded 3 messages from {saved})"),
        ("/stats", "conversation: 3 messages"),
        ("/set temp", "usage: /set temp|top_p|top_k|min_p|max_tokens|... VALUE"),
        ("/set top_k 3", "(top_k = 3)"),
        ("/set seed none", "(seed = none)"),
        ("/frobnicate now", "unknown command '/frobnicate now'; /help lists them"),
        ("/exit", ""),
        ("never sent", ""),
    ]
    script = "".join(f"{line}\n" for line, _ in said)
    result = runner.invoke(app, ["chat", "-m", str(folder), "--max-tokens", "4"], input=script)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    at = 0
    for _, reply in said:  # each reply, in order
        at = result.stderr.index(reply, at)
    assert json.loads(saved.read_text())["messages"] == session.messages


def test_generate_says_why_an_answer_is_empty(tiny, tmp_path):
    """When the first new token ends the answer, stdout is empty and stderr says so (hinting
    --chat); an answer that does not end at once gets no such notice. The model's greedy
    first token is made its end-of-sequence token by listing it in config.json."""
    model, tokenizer = tiny.load("llama")
    first = next(stream_generate(model, tokenizer, PROMPT, max_tokens=1)).token
    folder = tmp_path / "ends-at-once"
    shutil.copytree(tiny.converted("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], first]
    (folder / "config.json").write_text(json.dumps(config))
    args = ["generate", "-m", str(folder), "--max-tokens", "8", "-p"]
    result = runner.invoke(app, [*args, PROMPT])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "\n"
    assert "empty answer: the model ended at once" in result.stderr and "--chat" in result.stderr
    other = runner.invoke(app, [*args, "the quick brown fox"])
    assert other.exit_code == 0, other.stderr
    assert other.stdout.strip() and "empty answer" not in other.stderr
