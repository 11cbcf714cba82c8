"""`elm convert --quantize --calibrate [--bpw B]`: quantize the float model in memory against
calibration text (`elm_mlx.quantize`), and measure what it cost on held-out text."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import TokenizerError
from ..eval.perplexity import encode_text, score_tokens
from ..loader import default_compute_dtype
from ..models import CausalLM, context_length, vocab_size
from ..quantize import (
    CalibrationConfig,
    Setting,
    bits_per_weight,
    float_weights,
    quantization_config,
    quantize_model,
    split,
)
from ..quantize.block_tuning import BlockTuning, summary
from ..quantize.calibration_text import CalibrationData, combine, written_by_model
from ..quantize.distill import (
    DistillConfig,
    check_tuning_budget,
    cut,
    distill,
    end_to_end,
    teacher,
)
from ..quantize.mixed import describe_plan, quantizable
from ..quantize.self_text import answered_windows, requests, self_generated_windows
from ..tokenizer import Tokenizer, encode_prompt, load_tokenizer, render_chat


@dataclass(frozen=True)
class QuantizationReport:
    """What calibrated quantization did, measured on text it did not calibrate on."""

    float_perplexity: float
    quantized_perplexity: float
    held_out_tokens: int  # tokens scored
    calibration_tokens: int
    calibration_source: str  # the text the held-out tokens come from
    calibrated_on: str  # what the calibration windows are
    bits_per_weight: float  # packed codes + scales + biases over the quantized layers
    seconds: float
    plan: str  # settings used: layers and share of the weights per setting
    stages: tuple[tuple[str, float], ...] = ()  # (stage, seconds) in the order they ran
    tuning: str = ""  # what tuning the scales and biases to the float model did, if it ran
    fit: str = "GPTQ"  # how each layer was fitted

    def summary(self) -> str:
        change = 100 * (self.quantized_perplexity / self.float_perplexity - 1)
        stages = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in self.stages)
        return (
            f"perplexity on {self.held_out_tokens} held-out tokens of {self.calibration_source}: "
            f"float {self.float_perplexity:.3f}, quantized {self.quantized_perplexity:.3f} "
            f"({change:+.1f}%); {self.bits_per_weight:.3f} bits per weight; "
            f"calibrated ({self.fit}) on {self.calibrated_on} in {self.seconds:.0f}s ({stages}); {self.plan}"
            + (f"; {self.tuning}" if self.tuning else "")
        )


class StageClock:
    """Seconds per stage: each stage runs from the end of the one before it."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        """`stage` has run (or run on) until now."""
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self._last
        self._last = now


def load_float(model: CausalLM, tensors: Iterator[tuple[str, mx.array]], dtype: mx.Dtype) -> None:
    """Fill the model with the checkpoint's tensors rounded to the output dtype (what would be
    written unquantized), computing in float32 on the CPU backend as the loader does."""
    compute = default_compute_dtype() or dtype
    weights = [(name, t.astype(dtype).astype(compute)) for name, t in tensors]
    model.load_weights(weights, strict=True)
    model.eval()
    mx.eval(model.parameters())


def held_out_perplexity(model: CausalLM, ids: list[int]) -> float:
    window = min(context_length(model), len(ids))
    total, scored = score_tokens(model, ids, window, window)
    return math.exp(total / scored)


def own_windows(
    model: CausalLM, tokenizer: Tokenizer, config: CalibrationConfig
) -> CalibrationData:
    """Calibration windows the float model writes: a chat model's answers to requests for
    non-fiction of many kinds (its tokenizer has a chat template and an end of turn), any other
    model's text from random first tokens."""
    ends = sorted(tokenizer.eos_token_ids)
    if not (getattr(tokenizer, "chat_template", None) and ends):
        own = self_generated_windows(model, vocab_size(model), config.own_windows, config.window)
        return written_by_model(own)
    kind = model.model_type
    prompts = [
        encode_prompt(tokenizer, render_chat(tokenizer, [{"role": "user", "content": r}], kind))
        for r in requests()
    ]
    own = answered_windows(model, prompts, config.own_windows, config.window, ends)
    return written_by_model(own, " answering prompts")


def quantize_calibrated(
    model: CausalLM,
    texts: list[tuple[str, str]],
    own_text: bool,
    tokenizer_dir: Path,
    setting: Setting,
    bpw: float | None,
    dtype: mx.Dtype,
    progress: bool,
    tune: DistillConfig | None = None,
    config: CalibrationConfig | None = None,
) -> tuple[dict[str, Any], QuantizationReport]:
    """Quantize the loaded float `model` in place; return config.json's "quantization" and the
    report. Calibration windows are shared among the texts (text, name), each with its tail held
    out; with `own_text`, half of them are text the float model writes. The tokenizer is the one
    the output folder ships (`tokenizer_dir`). With `tune.seconds`, the scales and biases are
    tuned to the float model: each block's to the float block's outputs as calibration goes
    (`block_tuning`, `tune.block_share` of the budget), then the whole model's to its
    next-token distributions on some of the windows (`distill`)."""
    tic = time.perf_counter()
    clock = StageClock()
    config = config or CalibrationConfig()
    parts = []
    tokenizer = load_tokenizer(tokenizer_dir)
    if own_text:
        parts.append(own_windows(model, tokenizer, config))
        clock.lap("own text")
    share = replace(
        config,
        windows=max(1, (config.windows - (config.own_windows if own_text else 0)) // len(texts)),
        held_out=config.held_out // len(texts),
    )
    for text, source in texts:
        ids = encode_text(tokenizer, text)
        if ids and max(ids) >= vocab_size(model):
            raise TokenizerError(
                f"the tokenizer gives id {max(ids)} for {source}, but the model has "
                f"{vocab_size(model)} embeddings; is it the model's own tokenizer (--tokenizer)?"
            )
        parts.append(split(ids, share, source))
    data = combine(parts)
    sizes = {p: m.weight.size for p, m in quantizable(model).items()}
    clock.lap("calibration text")
    float_ppl = held_out_perplexity(model, data.held_out)
    clock.lap("float perplexity")
    tune = tune or DistillConfig()
    if tune.seconds:  # the float model's answers, before it is quantized; fails early
        tune_windows = cut(data.windows, tune.window)
        target = teacher(model, tune_windows)
        check_tuning_budget(tune, target)
        clock.lap("teacher")
    # the budget: a share block by block as the blocks are calibrated, the rest end to end
    blocks = BlockTuning(seconds=tune.seconds * tune.block_share / len(model.layers))
    tune = end_to_end(tune)
    bars: dict[str, Any] = {}

    def show(stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        clock.lap(stage)
        if stage not in bars:  # disable=None: no bar when stderr is not a terminal
            bars[stage] = tqdm(
                total=total,
                desc=stage,
                unit={"sensitivity": "layer", "tuning": "s"}.get(stage, "block"),
                disable=None if progress else True,
                leave=False,
            )
        bars[stage].update(done - bars[stage].n)

    tuned = None
    try:
        plan, tuned_blocks = quantize_model(
            model, data.windows, setting, dtype, bpw, show, config, blocks
        )
        if tune.seconds:
            clock.lap("calibrating")  # the output layer, after the last block's progress
            tuned = distill(
                model,
                tune_windows,
                target,
                tune,
                lambda spent, budget: show("tuning", int(spent), int(budget)),
            )
    finally:
        for bar in bars.values():
            bar.close()
    clock.lap("tuning" if tuned is not None else "calibrating")
    # on the CPU backend quantized matmuls are slow; on a GPU they are the fast path
    with float_weights(model) if default_compute_dtype() is not None else nullcontext():
        quant_ppl = held_out_perplexity(model, data.held_out)
    clock.lap("quantized perplexity")
    report = QuantizationReport(
        float_perplexity=float_ppl,
        quantized_perplexity=quant_ppl,
        held_out_tokens=len(data.held_out) - 1,
        calibration_tokens=data.windows.size,
        calibration_source=data.source,
        calibrated_on=data.calibrated_on,
        bits_per_weight=bits_per_weight(model),
        seconds=time.perf_counter() - tic,
        plan=describe_plan(plan, sizes),
        stages=tuple(clock.stages.items()),
        tuning="; ".join(
            ([summary(tuned_blocks)] if tuned_blocks else [])
            + ([tuned.summary()] if tuned is not None else [])
        ),
        fit=f"GPTAQ, {config.asymmetric:g} of the way to the float outputs"
        if config.asymmetric
        else "GPTQ",
    )
    return quantization_config(plan, sizes), report


def model_tensors(model: CausalLM, dtype: mx.Dtype) -> Iterator[tuple[str, mx.array]]:
    """The quantized model's tensors as written: codes as they are, floats in `dtype`."""
    for name, tensor in tree_flatten(model.parameters()):
        yield name, tensor.astype(dtype) if mx.issubdtype(tensor.dtype, mx.floating) else tensor
