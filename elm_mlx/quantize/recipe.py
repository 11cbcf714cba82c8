"""What `elm convert --quantize --calibrate [--bpw B]` does to a float model: choose each
layer's setting (one for all, or mixed to a bit budget by measured sensitivity), then quantize
block by block with GPTQ on fitted grids."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from ..errors import OptionError
from ..models import CausalLM
from .block_tuning import BlockTuned, BlockTuning
from .blockwise import calibrate
from .calibration_text import CalibrationConfig, spread
from .grid import Setting
from .mixed import CANDIDATES, MAX_BPW, budget_plan, cheapest_bpw, uniform_plan
from .sensitivity import measure

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def check_budget(model: CausalLM, bpw: float, dtype: mx.Dtype) -> None:
    scale_bytes = mx.zeros((), dtype).itemsize
    lowest = cheapest_bpw(model, scale_bytes)
    if not lowest <= bpw <= MAX_BPW:
        raise OptionError(
            "bpw",
            f"must be between {lowest:.2f} (the cheapest settings, {CANDIDATES[0].bits}-bit, "
            f"with {8 * scale_bytes}-bit scales) and {MAX_BPW:g}, not {bpw:g}",
        )


def quantize_model(
    model: CausalLM,
    windows: mx.array,
    setting: Setting,
    dtype: mx.Dtype,
    bpw: float | None = None,
    progress: Progress | None = None,
    config: CalibrationConfig | None = None,
    tune: BlockTuning | None = None,
) -> tuple[dict[str, Setting], list[BlockTuned]]:
    """Quantize `model` in place, calibrated on the token windows (N, L); return the plan
    (module path -> setting) and, with `tune`, what tuning each block did. Without `bpw` every
    layer gets `setting`; with it, layers get the candidate settings that lose least within the
    budget, each layer's loss measured with `setting` as the probe on
    `config.sensitivity_tokens` tokens, the first of `config.sensitivity_windows` windows
    spread over the text's parts and sources (the output layer fitted by GPTQ to
    `config.output_probe_windows` of them). Each layer is fitted as `config.asymmetric` says,
    and each block tuned as `tune` says (`blockwise.calibrate`)."""
    config = config or CalibrationConfig()
    if bpw is None:
        plan = uniform_plan(model, setting)
    else:
        check_budget(model, bpw, dtype)

        def stage(done: int, total: int) -> None:
            if progress is not None:
                progress("sensitivity", done, total)

        n = config.sensitivity_windows
        tokens = spread(windows, n)[:, : config.sensitivity_tokens // n]  # (n, tokens / n)
        candidates = sorted({*CANDIDATES, setting})
        fit_to = spread(windows, config.output_probe_windows)  # (n, window)
        costs = measure(model, tokens, candidates, setting, dtype, stage, fit_to)
        plan = budget_plan(costs, bpw)

    def calibrating(done: int, total: int) -> None:
        if progress is not None:
            progress("calibrating", done, total)

    tuned = calibrate(model, windows, plan, dtype, calibrating, config.asymmetric, tune)
    return plan, tuned
