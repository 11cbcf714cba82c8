"""Calibration text: where it comes from, and its split into the windows the quantizer fits to
and the held-out tail that perplexity is measured on (never the same tokens).

The default text is one every Python installation ships, the standard library's documentation
topics (`pydoc_data.topics`: ~465k characters of English prose and code about Python), so
calibration works offline. Split: the last `held_out` tokens are held out; calibration windows
are spread evenly over the tokens before them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import OptionError

DEFAULT_SOURCE = "the Python documentation topics (pydoc_data.topics)"


@dataclass(frozen=True)
class CalibrationConfig:
    """How much text calibration uses (defaults sized for minutes on a laptop CPU)."""

    window: int = 512  # tokens per calibration sequence
    windows: int = 8  # calibration sequences (window * windows tokens in all)
    held_out: int = 4096  # tokens at the end of the text kept for perplexity
    sensitivity_tokens: int = 256  # of the calibration tokens, those the sensitivity pass uses


@dataclass(frozen=True)
class CalibrationData:
    windows: mx.array  # (N, window) token ids the quantizer fits to
    held_out: list[int]  # token ids after them, for perplexity only
    source: str  # names the text in messages


def default_text() -> str:
    """The standard library's documentation topics, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(path: str | Path | None) -> tuple[str, str]:
    """(text, name for messages) of a calibration file, or of the default text for None."""
    if path is None:
        return default_text(), DEFAULT_SOURCE
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
    return CalibrationData(mx.array(windows), list(ids[head:]), source)
