"""What `elm convert --quantize --calibrate [--bpw B]` does to a float model: choose each
layer's setting (one for all, or mixed to a bit budget by measured sensitivity), then quantize
block by block with GPTQ on fitted grids."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from ..errors import OptionError
from ..models import CausalLM
from .blockwise import calibrate
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
    sensitivity_tokens: int = 256,
    progress: Progress | None = None,
    asymmetric: float = 0.0,
) -> dict[str, Setting]:
    """Quantize `model` in place, calibrated on the token windows (N, L); return the plan
    (module path -> setting). Without `bpw` every layer gets `setting`; with it, layers get
    the candidate settings that lose least within the budget, each layer's loss measured on the
    first `sensitivity_tokens` of the windows with `setting` as the probe. `asymmetric`: the
    share of each layer's target taken from the float model's outputs (`blockwise.calibrate`)."""
    if bpw is None:
        plan = uniform_plan(model, setting)
    else:
        check_budget(model, bpw, dtype)

        def stage(done: int, total: int) -> None:
            if progress is not None:
                progress("sensitivity", done, total)

        tokens = windows.reshape(1, -1)[:, :sensitivity_tokens]  # (1, tokens)
        candidates = sorted({*CANDIDATES, setting})
        plan = budget_plan(measure(model, tokens, candidates, setting, dtype, stage), bpw)

    def calibrating(done: int, total: int) -> None:
        if progress is not None:
            progress("calibrating", done, total)

    calibrate(model, windows, plan, dtype, calibrating, asymmetric)
    return plan
