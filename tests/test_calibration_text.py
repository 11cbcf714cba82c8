"""What calibration reads: windows and the held-out tail, the model's own text, files and
datasets, and what the report says it read (`elm convert --calibrate`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from elm_mlx.cli.main import app
from folders import leftovers
from tiny_models import write_tiny_chat_model
from typer.testing import CliRunner

from elm_mlx.loader import load
from elm_mlx.quantize import CalibrationConfig, default_text, split
from elm_mlx.quantize.calibration_text import combine, spread, written_by_model
from elm_mlx.quantize.self_text import (
    ANSWER,
    NGRAM,
    answered_windows,
    deduplicate,
    first,
    requests,
    sample_sequences,
    self_generated_windows,
)
from elm_mlx.tokenizer import encode_prompt, load_tokenizer, render_chat

runner = CliRunner()


def test_calibration_windows_never_overlap_the_held_out_tail():
    ids = list(range(10_000))
    config = CalibrationConfig(window=512, windows=8, held_out=1000)
    data = split(ids, config, "text")
    assert data.held_out == ids[-1000:]
    windows = np.array(data.windows)
    assert windows.shape == (8, 512)
    assert windows.max() < 9000  # every calibration token precedes the held-out tail
    for row in windows:  # each window is a contiguous run of the text
        assert list(row) == list(range(row[0], row[0] + 512))
    assert windows[0, 0] == 0 and windows[-1, -1] == 8999  # spread over the whole head


def test_the_sensitivity_sample_spans_the_sources():
    """The windows the plan is measured on come from every part of the calibration windows
    (own text first, then each file's), not only the first window."""
    own, text = mx.zeros((16, 8), mx.int32), mx.ones((16, 8), mx.int32)
    picked = spread(mx.concatenate([own, text]), CalibrationConfig().sensitivity_windows)
    assert picked.shape == (CalibrationConfig().sensitivity_windows, 8)
    assert set(np.array(picked[:, 0]).tolist()) == {0, 1}
    assert spread(own[:2], 4).shape == (2, 8)  # fewer windows than asked: each once


def test_own_text_drops_loops_and_duplicates():
    rng = np.random.default_rng(0)
    fresh = rng.integers(0, 1000, size=(2, 64))
    loop = np.tile(np.arange(5), 13)[:64]
    rows = np.stack([fresh[0], loop, fresh[0], fresh[1]])
    kept = deduplicate(rows)
    assert [list(k) for k in kept] == [list(fresh[0]), list(fresh[1])]


def test_own_text_samples_again_when_the_model_loops(tiny):
    """A model that all but always takes its top choice falls into the same loops from most
    starts: the first batch loses rows to deduplication and the later tries must add to it."""
    model, _ = load(tiny.converted("llama"))  # a fresh copy: tiny.load's is shared
    model.model.norm.weight = model.model.norm.weight * 1000  # logits x1000: near-greedy
    own = self_generated_windows(model, 400, count=4, window=64, seed=0)
    assert 0 < len(own) <= 4 and own.shape[1] == 64
    rows = own.reshape(-1, 16)  # the packed sequences
    assert len(deduplicate(rows)) == len(rows)  # none of them mostly seen already


def test_default_calibration_mixes_the_models_own_text_with_the_stdlib(tiny):
    model, _ = tiny.load("llama")
    own = self_generated_windows(model, 400, count=2, window=64, seed=1)
    assert own.shape == (2, 64) and own.max() < 400
    np.testing.assert_array_equal(own, self_generated_windows(model, 400, 2, 64, seed=1))
    text = list(range(1000, 3000))
    data = combine([written_by_model(own), split(text, CalibrationConfig(64, 2), "the text")])
    rows = np.array(data.windows)
    assert rows.shape == (4, 64)
    assert [i for i, r in enumerate(rows) if r.max() < 400] == [0, 2]  # alternating
    assert data.held_out == text[-len(data.held_out) :] and rows.max() < text[-len(data.held_out)]
    assert data.calibrated_on == "128 tokens the float model wrote and 128 tokens of the text"


def test_a_chat_model_is_asked_for_non_fiction_of_many_kinds():
    asks = requests()
    assert len(asks) == len(set(asks)) == 192 and asks == requests(0) and asks != requests(1)
    words = {w.strip(".").lower() for a in asks for w in a.split()}
    assert not words & {"story", "stories", "tale", "novel", "poem", "fiction", "fairy"}
    assert len({a.split(" about ")[0] for a in asks[:16]}) >= 4  # a leading slice mixes kinds


def test_rows_that_end_leave_the_batch_and_the_others_write_on(tiny):
    """Greedy rows (each its own, whatever the batch) with a stop that some reach early: every
    row writes what it writes alone up to its stop, then only the stop."""
    model, _ = tiny.load("llama")
    prompts = np.array([[5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 16]], np.int32)
    alone = [sample_sequences(model, p[None], 12, greedy=12)[0] for p in prompts]
    stop = int(alone[0][2])  # row 0 ends at its third token at the latest
    out = sample_sequences(model, prompts, 12, greedy=12, stops=[stop])
    assert out.shape == (4, 12)
    ends = []
    for row, own in zip(out, alone, strict=True):
        end = first(own, [stop])
        ends.append(end)
        np.testing.assert_array_equal(row[: end + 1], own[: end + 1])
        assert (row[end + 1 :] == stop).all()
    assert min(ends) <= 2 and max(ends) > min(ends)  # rows left the batch while others wrote
    every = sample_sequences(model, prompts, 12, stops=range(400))  # all end at once
    assert (every[:, 1:] == 0).all()


def test_a_chat_model_writes_its_calibration_text_as_answers(tmp_path):
    """With a chat template the model's own text is its answers to rendered prompts (of several
    lengths, one batch), each cut at the end of its turn and packed after the one before."""
    folder = write_tiny_chat_model(tmp_path / "chat", "chatml")
    model, _ = load(folder)
    tokenizer = load_tokenizer(folder)
    ends = sorted(tokenizer.eos_token_ids)
    prompts = [
        encode_prompt(tokenizer, render_chat(tokenizer, [{"role": "user", "content": r}], "llama"))
        for r in requests()
    ]
    assert len({len(p) for p in prompts[:8]}) > 1  # left padding has work to do
    own = answered_windows(model, prompts, count=2, window=2 * ANSWER, ends=ends, seed=0)
    assert own.shape == (2, 2 * ANSWER) and own.dtype == np.int32
    # answers are at most ANSWER long, so each window holds the end of one
    assert all(ends[0] in row for row in own)
    np.testing.assert_array_equal(own, answered_windows(model, prompts, 2, 2 * ANSWER, ends))
    # between two ends, one answer: cut at its end of turn, no prompt, none too short to keep
    stream = own.ravel()
    bounds = np.flatnonzero(np.isin(stream, ends))
    pieces = np.diff(bounds) - 1
    assert len(pieces) and pieces.min() >= NGRAM and pieces.max() <= ANSWER


def test_the_report_says_a_chat_model_answered_prompts(tmp_path):
    folder = write_tiny_chat_model(tmp_path / "chat", "chatml")
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(folder), "-o", str(out), "-q", "--calibrate"])
    assert result.exit_code == 0, result.stderr
    assert "tokens the float model wrote answering prompts and" in result.stderr


@pytest.mark.parametrize("own", ["default", "--own-text"])
def test_the_report_says_what_calibration_read(tiny, tmp_path, own):
    """By default half the windows are the model's own text; with a file, only with --own-text."""
    out = tmp_path / "out"
    args = ["convert", str(tiny.hf("llama")), "-o", str(out), "-q", "--calibrate"]
    source = "the Python documentation topics"
    if own == "--own-text":
        source = tmp_path / "text.txt"
        source.write_text(default_text()[:60_000])
        args += ["--calibration-file", str(source), "--own-text"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "tokens the float model wrote and" in result.stderr
    assert f"tokens of {source}" in result.stderr
    # by default the documentation shares its windows with elm's general English, half each
    shares = re.findall(
        r"(\d+) tokens of (the Python documentation|elm's general English)", result.stderr
    )
    if own == "default":
        assert [name for _, name in shares] == ["the Python documentation", "elm's general English"]
        assert shares[0][0] == shares[1][0] != "0"
    else:
        assert shares == []
    stages = re.search(r"in \d+s \((.*?)\);", result.stderr).group(1)  # seconds per stage
    names = [part.rsplit(" ", 1)[0] for part in stages.split(", ")]
    assert names == [
        "own text", "calibration text", "float perplexity", "calibrating", "quantized perplexity"
    ]  # fmt: skip


def test_calibration_files_repeat_and_share_the_windows(tiny, tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text(default_text()[:80_000])
    second.write_text(default_text()[-80_000:])
    out = tmp_path / "out"
    args = ["convert", str(tiny.hf("llama")), "-o", str(out), "-q", "--calibrate"]
    result = runner.invoke(
        app, [*args, "--calibration-file", str(first), "--calibration-file", str(second)]
    )
    assert result.exit_code == 0, result.stderr
    assert f"held-out tokens of {first} and {second}" in result.stderr
    windows = CalibrationConfig().windows // 2 * CalibrationConfig().window  # tokens each
    assert f"{windows} tokens of {first} and {windows} tokens of {second}" in result.stderr
    assert "float model wrote" not in result.stderr


def test_a_dataset_folder_calibrates_through_datasets(tiny, tmp_path):
    """--calibration-dataset reads a dataset's train split with `datasets` (a local folder
    here; a hub id the same way when online) and calibrates on it alone."""
    folder = tmp_path / "prose"
    folder.mkdir()
    paragraphs = default_text()[:60_000].split("\n\n")
    with open(folder / "train.jsonl", "w") as f:
        for i, text in enumerate(paragraphs):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    out = tmp_path / "out"
    args = ["convert", str(tiny.hf("llama")), "-o", str(out), "-q"]
    result = runner.invoke(app, [*args, "--calibration-dataset", str(folder)])
    assert result.exit_code == 0, result.stderr
    assert f"held-out tokens of the dataset {folder}" in result.stderr  # it implies calibration
    assert "float model wrote" not in result.stderr
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4


def test_a_hub_dataset_offline_is_a_clear_error(tiny, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = [str(tiny.hf("llama")), "-o", str(out), "-q", "--calibration-dataset", "wikitext"]
    result = subprocess.run(
        [sys.executable, "-m", "elm_mlx.cli.main", "convert", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "--calibration-dataset" in result.stderr and "--calibration-file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and leftovers(out) == []
