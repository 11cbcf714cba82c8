"""Calibration text: where it comes from, and its split into the windows the quantizer fits to
and the held-out tail that perplexity is measured on (never the same tokens).

By default, offline, half the windows are text the float model writes itself (`self_text.py`:
a chat model's answers to requests for non-fiction of many kinds, any other model's text from
random first tokens) and half come from two texts that ship with elm: the standard library's
documentation topics (`pydoc_data.topics`, every Python has it: ~465k characters of English
prose and code about Python) and `data/english.txt`, ~3,800 words of general English written
for elm (an encyclopedia entry, a guide, a letter, an essay, a review, an FAQ, a speech, a short
biography, an interview, a science explainer, minutes, a recipe, a travel guide; no fiction and
no news), so that no one domain dominates. Calibrated on the documentation alone, the quantized
model lost three times as much (KL to the float model) on English prose as on held-out
documentation; with half of its own text, a third less on prose; with a quarter of the windows
from the general English instead of the documentation, 10-12% less again on fiction and news
that calibration never saw (BENCHMARKS.md, issue 17; Williams & Aletras 2024,
arXiv:2311.09755, on the calibration set's domain). Split: the last `held_out` tokens are held
out; calibration windows are spread evenly over the tokens before them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import OptionError

DEFAULT_SOURCE = "the Python documentation topics (pydoc_data.topics)"
ENGLISH_SOURCE = "elm's general English text (elm_mlx/quantize/data/english.txt)"


@dataclass(frozen=True)
class CalibrationConfig:
    """How much text calibration uses (defaults sized for minutes on a laptop CPU)."""

    window: int = 512  # tokens per calibration sequence
    # calibration sequences (window * windows tokens in all): on the noisy SmolLM2, 32 windows
    # (half its own text) lost 8% less KL on held-out prose than 16 (BENCHMARKS.md, issue 17)
    windows: int = 32
    own_windows: int = 16  # of them, text the float model writes (when it writes any)
    held_out: int = 4096  # tokens at the end of the text kept for perplexity
    sensitivity_tokens: int = 256  # of the calibration tokens, those the sensitivity pass uses
    # ... the first tokens of this many windows spread over them, so every source counts (on
    # the noisy SmolLM2 at 4.5 bits, 4 windows of 64 gave a plan with 3% less KL on prose and
    # 5% less on pydoc than the first 256 tokens of one window, the model's own babble; 4x the
    # tokens, as 16 windows of 64 or 4 of 256, moved plans within a sample's noise: issue 17)
    sensitivity_windows: int = 4
    # ... and the output layer is probed by GPTQ on the final hidden states of this many windows
    # spread over them (4,096 tokens: 16 s on the SmolLM2 on a 2-core CPU, 69 s for all 32)
    output_probe_windows: int = 8
    dataset_characters: int = 400_000  # read from a hub dataset (about the default text's size)
    # share of each layer's target taken from the float model's own outputs instead of its
    # weights applied to the quantized model's inputs (GPTAQ; `blockwise.calibrate`); 0 is
    # GPTQ. Off by default (`elm convert --asymmetric A`): on SmolLM2 0.25 cut held-out KL by
    # 10-20% on the calibration text's domain but not on prose (0.5 and 1 did worse there), for
    # 1.3-2x the calibration time, and on the random OpenELM it changed nothing (issue 17)
    asymmetric: float = 0.0


def spread_index(count: int, n: int) -> list[int]:
    """n of the indices 0..count-1 (each at most once), evenly spread over them."""
    return [round(i * count / n) for i in range(min(n, count))]


def held_out_split(count: int, n: int) -> tuple[list[int], list[int]]:
    """(held-out, the rest) of the indices 0..count-1: n of them spread evenly, to score tuning
    on windows it does not train on."""
    held = spread_index(count, n)
    return held, sorted(set(range(count)) - set(held))


def spread(windows: mx.array, n: int) -> mx.array:
    """n of the windows (N, L), evenly spread over them (the text's parts and sources)."""
    return windows[mx.array(spread_index(windows.shape[0], n))]


@dataclass(frozen=True)
class CalibrationData:
    windows: mx.array  # (N, window) token ids the quantizer fits to
    held_out: list[int]  # token ids after them, for perplexity only
    source: str  # names the text in messages (the held-out tokens come from it)
    calibrated_on: str = ""  # what the windows are, for the report


def default_text() -> str:
    """The standard library's documentation topics, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def english_text() -> str:
    """The general English text that ships with elm (see the module's docstring)."""
    return resources.files(__package__).joinpath("data/english.txt").read_text(encoding="utf-8")


def default_texts() -> list[tuple[str, str]]:
    """(text, name for messages) of each text calibration reads when given none."""
    return [(default_text(), DEFAULT_SOURCE), (english_text(), ENGLISH_SOURCE)]


def read_text(path: str | Path) -> tuple[str, str]:
    """(text, name for messages) of a calibration file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise OptionError("calibration_file", f"{path} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError("calibration_file", f"{path} cannot be read as UTF-8 text: {e}") from e
    if not text.strip():
        raise OptionError("calibration_file", f"{path} is empty; give a file of plain text")
    return text, str(path)


def read_dataset(spec: str, characters: int) -> tuple[str, str]:
    """(text, name for messages) of the first `characters` of a dataset's train split, read
    through `datasets` (streamed: only what is used is downloaded). `spec` is a hub id or a
    local dataset folder, optionally ":CONFIG"; the "text" column, or else the first column of
    strings."""
    name, _, subset = spec.partition(":")
    try:
        import datasets
    except ImportError as e:
        raise OptionError(
            "calibration_dataset", "needs the `datasets` package: pip install 'elm-mlx[hub]'"
        ) from e
    parts, size = [], 0
    try:
        for row in datasets.load_dataset(name, subset or None, split="train", streaming=True):
            column = (
                "text"
                if "text" in row
                else next((k for k, v in row.items() if isinstance(v, str)), None)
            )
            if column is None:
                raise OptionError("calibration_dataset", f"{spec} has no column of text")
            parts.append(row[column])
            size += len(row[column])
            if size >= characters:
                break
    except (OSError, ValueError) as e:  # no network: ConnectionError (an OSError), ValueError
        raise OptionError(
            "calibration_dataset",
            f"cannot read {spec} ({e}); a hub dataset needs a network connection: offline, "
            "calibrate on text files with --calibration-file",
        ) from e
    text = "\n\n".join(parts)[:characters]
    if not text.strip():
        raise OptionError("calibration_dataset", f"{spec} has no text in its train split")
    return text, f"the dataset {spec}"


def split(ids: list[int], config: CalibrationConfig, source: str) -> CalibrationData:
    """Hold out the last tokens (up to `config.held_out`, at most a tenth of the text, at least
    2) and spread up to `config.windows` windows over the rest."""
    held = max(2, min(config.held_out, len(ids) // 10))
    head = len(ids) - held
    if head < config.window:
        raise OptionError(
            "calibration_file",
            f"{source} has {len(ids)} tokens; calibration needs at least {config.window} (one "
            f"window) besides the {held} held out for perplexity: give a longer text",
        )
    count = min(config.windows, head // config.window)
    starts = np.linspace(0, head - config.window, count).round().astype(int)
    windows = np.stack([ids[s : s + config.window] for s in starts]).astype(np.int32)
    return CalibrationData(
        mx.array(windows), list(ids[head:]), source, f"{windows.size} tokens of {source}"
    )


def written_by_model(windows: np.ndarray, how: str = "") -> CalibrationData:
    """Windows (n, window) the float model wrote (`how`, for the report), as calibration data
    with nothing held out."""
    return CalibrationData(
        mx.array(windows.astype(np.int32)),
        [],
        "the float model's own text",
        f"{windows.size} tokens the float model wrote{how}",
    )


def combine(parts: list[CalibrationData]) -> CalibrationData:
    """The parts' windows taken in turn (so that any leading slice, e.g. the sensitivity
    tokens, holds some of each) and their held-out tails one after another."""
    arrays = [np.array(p.windows) for p in parts]
    longest = max(len(a) for a in arrays)
    rows = [a[i] for i in range(longest) for a in arrays if i < len(a)]
    return CalibrationData(
        mx.array(np.stack(rows)),
        [t for p in parts for t in p.held_out],
        " and ".join(p.source for p in parts if p.held_out),
        " and ".join(p.calibrated_on for p in parts),
    )
