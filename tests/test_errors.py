"""Bad input: each a clear error naming the file and saying what to do, exit code 1 from the
CLI, and nothing left behind (neither the output folder nor a hidden temporary one)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from elm_mlx.cli.main import app
from folders import leftovers
from safetensors.numpy import load_file, save_file
from tiny_checkpoints import convert_tiny
from typer.testing import CliRunner

from elm_mlx.errors import ConfigError, OutputError, UnsupportedModelError, WeightsError
from elm_mlx.models import model_types

runner = CliRunner()


def _no_config(src: Path) -> None:
    (src / "config.json").unlink()


def _unknown_type(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))


def _truncated(src: Path) -> None:
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncated_header(src: Path) -> None:
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:40])


def _wrong_shape(src: Path) -> None:
    tensors = load_file(str(src / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


def _missing_tensor(src: Path) -> None:
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


# (break the source, exception, substrings of the message: what, where, what to do)
BAD_SOURCES = {
    "missing config.json": (_no_config, ConfigError, ["config.json is missing", "model folder"]),
    "unknown model_type": (
        _unknown_type,
        UnsupportedModelError,
        ["config.json", "'gpt2' is not supported", ", ".join(model_types())],
    ),
    "truncated safetensors": (
        _truncated,
        WeightsError,
        ["model.safetensors is truncated", "download the file again"],
    ),
    "truncated header": (
        _truncated_header,
        WeightsError,
        ["model.safetensors is not a valid safetensors file", "download the file again"],
    ),
    "wrong shape": (
        _wrong_shape,
        WeightsError,
        ["model.safetensors", "up_proj.weight has shape [127, 64]", "[128, 64]", "config"],
    ),
    "missing tensor": (
        _missing_tensor,
        WeightsError,
        ["lacks 1 tensors", "model.layers.1.self_attn.k_proj.weight", "download complete"],
    ),
}


@pytest.fixture
def llama_src(tiny, tmp_path):
    """A fresh, writable copy of the tiny fp32 Llama checkpoint (intermediate 128)."""
    return Path(shutil.copytree(tiny.hf("llama"), tmp_path / "src"))


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_bad_source(llama_src, tmp_path, case):
    breaker, error, expected = BAD_SOURCES[case]
    breaker(llama_src)
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        convert_tiny(llama_src, out)
    message = str(info.value)
    assert str(llama_src) in message
    for part in expected:
        assert part in message
    assert not out.exists() and leftovers(out) == []
    # The CLI: one line on stderr, exit code 1, no traceback, nothing written.
    result = runner.invoke(app, ["convert", str(llama_src), "-o", str(out)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {message}"
    assert result.stdout == ""
    assert not out.exists() and leftovers(out) == []


def test_unwritable_output(llama_src, tmp_path):
    """Tests run as root, so a read-only folder would not stop us: use a path under a file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "sub"
    with pytest.raises(OutputError) as info:
        convert_tiny(llama_src, out)
    assert str(out) in str(info.value) and "choose another output folder" in str(info.value)
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "src"]
    result = runner.invoke(app, ["convert", str(llama_src), "-o", str(out)])
    assert result.exit_code == 1 and result.stderr.startswith(f"error: cannot create {out}")


def test_output_exists(llama_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError) as info:
        convert_tiny(llama_src, out)
    assert str(out) in str(info.value) and "--force" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(out) == []
    result = runner.invoke(app, ["convert", str(llama_src), "-o", str(out)])
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces it with a converted model
    result = runner.invoke(app, ["convert", str(llama_src), "-o", str(out), "--force"])
    assert result.exit_code == 0, result.stderr
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--bits", "3"], "--bits must be one of (4, 8)"),
        (["--group-size", "48"], "--group-size must be one of (32, 64, 128)"),
        (["--dtype", "float64"], "--dtype must be one of float16, bfloat16, float32"),
    ],
)
def test_bad_convert_options(llama_src, tmp_path, args, expected):
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(llama_src), "-o", str(out), *args])
    assert result.exit_code == 1 and expected in result.stderr
    assert not out.exists() and leftovers(out) == []


def test_generate_without_prompt(tiny):
    result = runner.invoke(app, ["generate", "-m", str(tiny.converted("llama"))])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: give exactly one of --prompt TEXT or --prompt-file FILE"
    )
    assert result.stdout == ""


def test_generate_missing_model_folder(tmp_path):
    missing = tmp_path / "no_such_model"
    result = runner.invoke(app, ["generate", "-m", str(missing), "-p", "hi"])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {missing}: no such folder")
    assert result.stdout == ""


def test_generate_folder_without_weights(tiny, tmp_path):
    folder = Path(shutil.copytree(tiny.converted("llama"), tmp_path / "m"))
    for f in folder.glob("*.safetensors"):
        f.unlink()
    result = runner.invoke(app, ["generate", "-m", str(folder), "-p", "hi"])
    assert result.exit_code == 1
    assert str(folder) in result.stderr and "elm convert" in result.stderr


def test_real_process_exit_code(llama_src, tmp_path):
    """Through a real `elm` process: exit status 1, one line on stderr, no traceback."""
    _no_config(llama_src)
    out = tmp_path / "out"
    proc = subprocess.run(
        ["elm", "convert", str(llama_src), "-o", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {llama_src / 'config.json'} is missing")
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out.exists() and leftovers(out) == []


def as_foreground_job(args: list[str]) -> subprocess.Popen[str]:
    """Start `args` with SIGINT's default action, as a terminal's foreground job gets it. A
    process started in the background by a non-interactive shell (a CI job may be) ignores
    SIGINT, and its children inherit that: exec keeps an ignored signal ignored, while it
    resets a caught one to the default, so catch it here for the moment of the start."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_calibrating_leaves_nothing(llama_src, tmp_path):
    """Ctrl-C in the middle of a calibrated, tuned conversion (a real `elm` process, SIGINT once
    its staging folder holds the tokenizer): exit status 130, no traceback, and neither the
    output folder nor the staging folder left."""
    out = tmp_path / "out"
    args = [str(llama_src), "-o", str(out), "-q", "--calibrate", "--tune-seconds", "60"]
    proc = as_foreground_job(["elm", "convert", *args])
    try:
        deadline = time.monotonic() + 120
        while not any(any((tmp_path / s).glob("*token*")) for s in leftovers(out)):
            assert proc.poll() is None, proc.stderr.read()  # exited: say why
            assert time.monotonic() < deadline, "never started calibrating"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)  # the tuning alone would take 60 s
    finally:
        proc.kill()  # a failed check leaves no conversion running (no-op once it has exited)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not out.exists() and leftovers(out) == []
