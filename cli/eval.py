"""`elm eval`."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer

from ..errors import EvaluationError
from ..eval.loglikelihood import EvalConfig
from .options import (
    GENERATION,
    KvBits,
    KvFullTokens,
    KvGroupSize,
    KvRecentTokens,
    MaxKvSize,
)

DEFAULTS = EvalConfig()
LONG_TEXT = 2048  # tokens: longer texts get a progress bar


def read_text(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise EvaluationError(f"cannot read --perplexity {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise EvaluationError(f"--perplexity {path} is not UTF-8 text ({e.reason})") from e


def import_harness() -> ModuleType:
    """elm's lm-eval model, or a clear error when lm-evaluation-harness is not installed."""
    try:
        from ..eval import lm_eval_model as harness
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        raise EvaluationError(
            "--tasks needs lm-evaluation-harness, which is not installed: "
            "pip install 'elm-mlx[eval]' (or pip install lm-eval)"
        ) from e
    return harness


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Written next to the target and renamed, so a failed run leaves no half file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise EvaluationError(f"cannot write --output {path}: {e.strerror}") from e


def progress_bar(enabled: bool):
    """A progress callback that opens a tqdm bar once the text turns out to be long."""
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None and enabled and total >= LONG_TEXT:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="tok", file=sys.stderr, leave=False)
        if bar is not None:
            bar.update(done - bar.n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return update, close


def command(
    model: Annotated[str, typer.Option("--model", "-m", help="Model folder or hub id.")],
    perplexity: Annotated[
        list[Path] | None,
        typer.Option(help="Text file whose perplexity to measure ('-' reads stdin; repeatable)."),
    ] = None,
    window: Annotated[
        int | None,
        typer.Option(
            help="Perplexity window in tokens (default: the model's whole context, e.g. 8192 for "
            "SmolLM2: slow on a CPU, where 512 or 1024 is quicker)."
        ),
    ] = DEFAULTS.window,
    stride: Annotated[
        int | None,
        typer.Option(help="Tokens between window starts; below --window, windows overlap."),
    ] = DEFAULTS.stride,
    tasks: Annotated[
        str | None, typer.Option(help="lm-evaluation-harness tasks, comma-separated.")
    ] = None,
    include_path: Annotated[
        Path | None, typer.Option(help="Folder of extra task YAMLs (e.g. with local data).")
    ] = None,
    limit: Annotated[
        float | None, typer.Option(help="Documents per task (a fraction if below 1).")
    ] = DEFAULTS.limit,
    num_fewshot: Annotated[
        int | None, typer.Option(help="Few-shot examples per prompt (default: the task's).")
    ] = DEFAULTS.num_fewshot,
    batch_size: Annotated[
        int, typer.Option(help="Continuations scored per forward pass.")
    ] = DEFAULTS.batch_size,
    output: Annotated[Path | None, typer.Option(help="Write the results as JSON.")] = None,
    adapter: Annotated[
        Path | None, typer.Option(help="LoRA adapter folder (evaluated without fusing).")
    ] = None,
    kv_bits: KvBits = GENERATION.kv_bits,
    kv_group_size: KvGroupSize = GENERATION.kv_group_size,
    kv_full_tokens: KvFullTokens = GENERATION.kv_full_tokens,
    kv_recent_tokens: KvRecentTokens = GENERATION.kv_recent_tokens,
    max_kv_size: MaxKvSize = GENERATION.max_kv_size,
) -> None:
    """Evaluate a model: perplexity of text files and/or lm-evaluation-harness tasks.

    Perplexity: in windows of the model's context (--window, --stride);
    prints tokens, perplexity, bits per byte and time. With --kv-bits or --max-kv-size the
    text is fed in chunks through that KV cache, so the perplexity shows what it costs.

    Tasks: lm-eval's names, e.g. arc_easy,hellaswag (pip install 'elm-mlx\\[eval]').

    Data-parallel: mlx.launch -n 2 -- elm eval ...
    """
    import mlx.core as mx

    from ..engine.batch_kv import one_row_cache
    from ..eval.perplexity import perplexity as measure
    from ..loader import load
    from ..models import make_cache

    kv = replace(
        GENERATION, kv_bits=kv_bits, kv_group_size=kv_group_size,
        kv_full_tokens=kv_full_tokens, kv_recent_tokens=kv_recent_tokens,
        max_kv_size=max_kv_size,
    )  # fmt: skip
    kv.validate()
    new_cache = make_cache  # a plain cache, unless the KV options ask for another
    if kv_bits is not None or max_kv_size is not None:
        new_cache = partial(one_row_cache, kv=kv.kv_config())
    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if not perplexity and not names:
        raise EvaluationError("nothing to evaluate: give --perplexity FILE and/or --tasks a,b")
    texts = [(path, read_text(path)) for path in perplexity or []]
    harness = manager = None
    if names:  # fail on a missing lm-eval or a wrong task name before loading the model
        harness = import_harness()
        manager = harness.task_manager(include_path, names)
        harness.check_tasks(manager, names)
    world = mx.distributed.init()
    lead = world.rank() == 0
    echo = typer.echo if lead else (lambda *a, **k: None)
    if world.size() > 1:
        echo(f"evaluating on {world.size()} processes")
    lm, tokenizer = load(model, adapter_path=adapter)
    report: dict[str, Any] = {"model": model, "adapter": adapter, "perplexity": []}
    for path, text in texts:
        update, close = progress_bar(lead)
        try:
            result = measure(
                lm, tokenizer, text, window, stride, update, world, str(path), new_cache
            )
        finally:
            close()
        echo(
            f"{path}: {result.tokens} tokens, perplexity {result.perplexity:.4f}, "
            f"{result.bits_per_byte:.4f} bits per byte, {result.seconds:.1f} s "
            f"({result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s)"
        )
        report["perplexity"].append({"file": str(path), **asdict(result)})
    if names:
        from lm_eval.utils import make_table

        runner = harness.ElmLM(model, loaded=(lm, tokenizer), batch_size=batch_size)
        results = harness.run_tasks(runner, names, manager, limit, num_fewshot)
        echo(make_table(results))
        keys = ("results", "groups", "n-shot", "n-samples", "versions", "higher_is_better")
        report["tasks"] = {k: results[k] for k in keys if k in results}
    if output is not None and lead:
        write_json(output, report)
        echo(f"wrote {output}")
