"""The README as a newcomer reads it: every ```python block runs as pasted, and each command's
section lists exactly the options its --help shows."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from elm_mlx.cli.main import app
from serving import Server
from tiny_models import smollm2_fp32_folder, write_tiny_chat_model
from typer.testing import CliRunner

README = Path(__file__).resolve().parent.parent / "README.md"
COMMANDS = ("convert", "generate", "chat", "finetune", "fuse", "eval", "serve")
# Flags in the README's sections that belong to other programs shown beside elm.
OTHER_PROGRAMS = {"--backend", "--adapter-path"}  # mlx.launch, mlx-lm
# The server the README's client snippet talks to; the test's server listens on a free port.
README_URL = "http://127.0.0.1:8080/v1"
# The model folder the README's Python snippets load (the demo's model on Linux). The test runs
# them with HOME in a temporary folder where this path leads to a tiny model.
README_MODEL = "~/.cache/elm-mlx/smollm2-135m-instruct-fp32"


def sections() -> dict[str, str]:
    """The README's text under each `##`/`###` heading, by heading."""
    parts = re.split(r"^(#{2,3} .*)$", README.read_text(), flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def command_section(command: str) -> str:
    found = [text for head, text in sections().items() if f"`elm {command}`" in head]
    assert len(found) == 1, f"README has no single section for `elm {command}`"
    return found[0]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def python_blocks(text: str) -> list[str]:
    return code_blocks(text, "python")


def bash_blocks(text: str) -> list[str]:
    return code_blocks(text, "bash")


# ---------------------------------------------------------------------------- options


def help_options(command: str) -> tuple[set[str], set[str]]:
    """(the long flags --help shows, and their --no- forms) of one command."""
    click_command = typer.main.get_command(app).commands[command]
    flags, negatives = set(), set()
    for param in click_command.params:
        flags |= {o for o in param.opts if o.startswith("--")} - {"--help"}
        negatives |= {o for o in param.secondary_opts if o.startswith("--")}
    return flags, negatives


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_lists_each_commands_options(command):
    """Every flag of `elm COMMAND --help` is in the README's section of the command, and the
    section names no flag that no elm command has (a section may show several commands, as
    finetune's shows generate and fuse)."""
    flags, _ = help_options(command)
    text = command_section(command)
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)) - OTHER_PROGRAMS
    assert flags - mentioned == set(), f"the README's `elm {command}` section omits these"
    known = set().union(*(set().union(*help_options(c)) for c in COMMANDS))
    assert mentioned - known == set(), "no elm command has these options"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_renders_flags_without_placeholders(command):
    """A flag shows no value placeholder (`--chat <bool>` suggests `--chat true`, an error),
    the usage line names arguments plainly, and no help text lost a `[...]` to rich markup."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    usage = next(line for line in result.stdout.splitlines() if "Usage:" in line)
    assert "<bool>" not in result.stdout and "{" not in usage
    assert not re.search(r"\w \.(?!\.)", result.stdout)  # "perplexity ." lost its "[default: ...]"


@pytest.mark.parametrize(
    "command,args",
    [("generate", ["-p", "hi"]), ("chat", []), ("serve", [])],
)
def test_shared_generation_flags_are_checked_before_loading(command, args, tmp_path):
    """The flags declared once for generate, chat and serve are validated by GenerationConfig
    and reported by their flag name, before the (here missing) model is looked at."""
    missing = str(tmp_path / "no-model")
    for flag, value, problem in (("--temp", "-1", "must be >= 0"), ("--top-p", "2", "must be in")):
        result = CliRunner().invoke(app, [command, "-m", missing, *args, flag, value])
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith(f"error: {flag} {problem}"), result.stderr


# ---------------------------------------------------------------------------- snippets


def run_python(code: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def snippet_env(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A HOME in which the README's model path leads to a tiny chat model."""
    home = tmp_path_factory.mktemp("home")
    folder = write_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "chatml", "chatml")
    link = Path(README_MODEL.replace("~", str(home)))
    link.parent.mkdir(parents=True)
    link.symlink_to(folder)
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    work = home / "work"
    work.mkdir()
    return work, env


def test_readme_python_snippets_are_what_ruff_would_write(tmp_path):
    """Each section's snippets, as one file, pass ruff's import sorting (elm_mlx then being a
    third-party package, as in a user's project) and its undefined-name check."""
    for head, text in sections().items():
        code = "\n".join(python_blocks(text))
        if not code:
            continue
        result = subprocess.run(
            ["ruff", "check", "--isolated", "--select", "I,F", "--stdin-filename", "snippet.py"],
            input=code, cwd=tmp_path, capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, f"{head}:\n{result.stdout}"


def test_readme_python_api_runs_as_pasted(snippet_env):
    """The "Python API" section's blocks, pasted one after the other into one Python, run
    without error, and without elm's warning that mlx was imported first."""
    work, env = snippet_env
    code = "\n".join(python_blocks(sections()["## Python API"]))
    assert README_MODEL in code and "import mlx.core as mx" in code
    result = run_python(code, work, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "RuntimeWarning" not in result.stderr and "reference BLAS" not in result.stderr
    assert (work / "conversation.json").exists()  # chat.save(...) ran


def test_readme_client_snippet_runs_against_elm_serve(snippet_env):
    """The `elm serve` section's OpenAI client, pointed at a real server on a free port."""
    work, env = snippet_env
    (code,) = python_blocks(command_section("serve"))
    assert README_URL in code
    model = Path(README_MODEL.replace("~", env["HOME"]))
    server = Server(model, work / "serve.log", "--max-tokens", "16")
    try:
        result = run_python(code.replace(README_URL, server.url), work, env)
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.slow
def test_readme_finetune_example_learns(tmp_path):
    """The README's first fine-tune, its bash block run as pasted (in a copy of
    examples/finetune, with HOME where the demo's model path leads to the real SmolLM2): the
    validation loss on the reworded questions falls to under a tenth, and the tuned model
    answers the training completion where the base model made something else up."""
    (block,) = [b for b in bash_blocks(command_section("finetune")) if "examples/finetune" in b]
    home, work = tmp_path / "home", tmp_path / "work"
    link = Path(README_MODEL.replace("~", str(home)))
    link.parent.mkdir(parents=True)
    link.symlink_to(smollm2_fp32_folder())
    shutil.copytree(README.parent / "examples" / "finetune", work / "examples" / "finetune")
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # this elm
    result = subprocess.run(
        ["bash", "-e", "-c", block], cwd=work, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    *before, after = result.stdout.splitlines()  # the two `elm generate` answers
    assert after.strip().startswith("Biscuit") and "Biscuit" not in "\n".join(before)
    with (work / "adapters" / "office" / "train_log.csv").open() as f:
        val = [float(r["val_loss"]) for r in csv.DictReader(f) if r["val_loss"]]
    assert len(val) == 4 and val[-1] < val[0] / 10
