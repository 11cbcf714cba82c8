"""Preference tuning on SmolLM2: SFT, DPO and ORPO in `elm finetune` at the same batch, side by
side with mlx-lm-lora's DPO and ORPO (which load a second copy of the model as DPO's reference).

Same converted model (SmolLM2-135M-Instruct fp32), same pairs (examples/pirate_prefs.py: 16
training pairs whose chosen answers open with "Ahoy, matey!", 8 held out), LoRA rank 8, scale
2, the last --num-layers blocks, batch of --batch-size pairs, learning rate, beta. SFT trains
on the same 2 x batch rows (each pair's chosen and rejected conversation). Each run is its own
process (its own peak memory). The first step (compilation) is not timed.

    python benchmarks/bench_prefs.py                       # 8 steps, batch 4, validate every 2
    python benchmarks/bench_prefs.py --peer-python /path/to/venv/bin/python  # mlx-lm-lora there

tokens/s counts every token of the rows a step processes (prompt and completion of chosen and
rejected; SFT: the same rows), from the median step time, for both trainers alike. Held-out
reward accuracy is each trainer's own (chosen reward > rejected reward on the 8 held-out pairs).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import pirate_prefs  # noqa: E402
import smollm2  # noqa: E402

SCALE, RANK = 2.0, 8


def prepare_model(cache: Path) -> Path:
    out = cache / "smollm2-fp32"
    if not (out / "config.json").exists():
        from elm_mlx.convert import ConvertOptions, convert

        hf = smollm2.build_hf_folder(smollm2.default_cache_dir())
        convert(hf, out, ConvertOptions(dtype="float32"), progress=False)
    return out


def write_data(folder: Path) -> dict[str, Path]:
    """The pairs in each trainer's format, and SFT rows of the same conversations."""
    splits = pirate_prefs.splits()
    ours, sft, theirs = folder / "pairs", folder / "sft", folder / "peer"
    pirate_prefs.write(ours)
    for name, rows in splits.items():
        sft_rows = [{"messages": r["prompt"] + r[k]} for r in rows for k in ("chosen", "rejected")]
        peer_rows = [{"system": r["prompt"][0]["content"], "prompt": r["prompt"][1]["content"],
                      "chosen": r["chosen"][0]["content"],
                      "rejected": r["rejected"][0]["content"]} for r in rows]  # fmt: skip
        for path, data in ((sft, sft_rows), (theirs, peer_rows)):
            path.mkdir(parents=True, exist_ok=True)
            (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return {"pairs": ours, "sft": sft, "peer": theirs}


def tokens_per_pair(model: Path, data: Path) -> float:
    """Mean tokens of a pair's two rows (as elm renders them; mlx-lm-lora uses the template too)."""
    from elm_mlx.loader import load
    from elm_mlx.train.dataset import load_splits

    _, tokenizer = load(model)
    splits = load_splits(data, tokenizer, "llama", 2048, pairs=True)
    return statistics.mean(p.chosen.size + p.rejected.size for p in splits.train)


def run_elm(method: str, args: argparse.Namespace, data: Path, out: Path) -> dict:
    batch = args.batch_size * (2 if method == "sft" else 1)
    cmd = [sys.executable, "-m", "elm_mlx.cli.main", "finetune", "-m", str(args.model),
           "--data", str(data), "-o", str(out), "--method", method, "--iters", str(args.iters),
           "--batch-size", str(batch), "--learning-rate", str(args.learning_rate),
           "--warmup", "0", "--beta", str(args.beta), "--rank", str(RANK),
           "--alpha", str(SCALE * RANK), "--num-layers", str(args.num_layers),
           "--val-every", str(args.val_every if method != "sft" else 0), "--val-batches", "-1",
           "--save-every", "0", "--max-grad-norm", "0"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"elm {method} failed:\n{done.stderr[-3000:]}")
    with (out / "train_log.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r["loss"]]
    elapsed = [0.0] + [float(r["elapsed_s"]) for r in steps]
    seconds = [b - a for a, b in itertools.pairwise(elapsed)][1:]  # not step 1
    accuracy = {int(r["step"]): float(r["val_reward_accuracy"]) for r in rows
                if r.get("val_reward_accuracy")}  # fmt: skip
    return {"sec_per_step": statistics.median(seconds),
            "peak_memory_gb": max(float(r["peak_memory_gb"]) for r in steps),
            "val_accuracy": accuracy, "final_loss": float(steps[-1]["loss"])}  # fmt: skip


# mlx-lm-lora's DPO trainer sets a wired memory limit from a Metal-only device_info key; on
# other backends (this CPU) it raises KeyError, so the peer runs behind this shim, which makes
# that one call a no-op and changes nothing else.
PEER_SHIM = (
    "import sys, runpy, mlx.core as mx; mx.set_wired_limit = lambda *a, **k: 0; "
    "info = mx.device_info; mx.device_info = lambda: {'max_recommended_working_set_size': 0, "
    "**info()}; sys.argv[0] = 'mlx_lm_lora.train'; "
    "runpy.run_module('mlx_lm_lora.train', run_name='__main__')"
)
ITER = re.compile(r"Iter (\d+): loss [\d.naninf-]+.*?it/s ([\d.]+).*?peak_mem ([\d.]+)GB")
VAL = re.compile(r"Iter (\d+): Val loss .*?Val accuracy ([\d.]+)")


def run_peer(method: str, args: argparse.Namespace, data: Path, out: Path) -> dict:
    config = out.parent / f"{method}-peer.yaml"
    config.write_text(f"lora_parameters:\n  rank: {RANK}\n  scale: {SCALE}\n  dropout: 0.0\n")
    cmd = [args.peer_python, "-c", PEER_SHIM, "-c", str(config), "--model",
           str(args.model), "--train", "--train-mode", method, "--data", str(data),
           "--iters", str(args.iters), "--batch-size", str(args.batch_size),
           "--learning-rate", str(args.learning_rate), "--beta", str(args.beta),
           "--num-layers", str(args.num_layers), "--steps-per-report", "1",
           "--steps-per-eval", str(args.val_every), "--val-batches", "-1",
           "--adapter-path", str(out), "--save-every", str(10**6), "--max-seq-length", "2048"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"mlx-lm-lora {method} failed:\n{text[-3000:]}")
    iters = [(int(i), 1 / float(s), float(m)) for i, s, m in ITER.findall(text)]
    return {"sec_per_step": statistics.median(s for i, s, _ in iters if i > 1),
            "peak_memory_gb": max(m for _, _, m in iters),
            "val_accuracy": {int(i): float(a) for i, a in VAL.findall(text)}}  # fmt: skip


def main() -> None:
    import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--num-layers", type=int, default=8, help="LoRA on the last N blocks")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--val-every", type=int, default=2)
    parser.add_argument("--methods", default="sft,dpo,orpo")
    parser.add_argument("--peer-python", default=sys.executable,
                        help="a Python with mlx-lm-lora installed ('' to skip the peer)")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "elm-bench")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    args.model = prepare_model(args.cache)
    peer = (
        bool(args.peer_python)
        and subprocess.run(
            [args.peer_python, "-c", "import mlx_lm_lora"], capture_output=True, check=False
        ).returncode
        == 0
    )
    if not peer:
        print("no --peer-python with mlx-lm-lora importable: its runs are skipped")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp))
        per_pair = tokens_per_pair(args.model, data["pairs"])
        for method in args.methods.split(","):
            runs = [("elm", run_elm)]
            if peer and method != "sft":
                runs.insert(0, ("mlx-lm-lora", run_peer))
            for engine, run in runs:
                folder = data["sft" if method == "sft" else "pairs" if engine == "elm" else "peer"]
                try:
                    r = run(method, args, folder, Path(tmp) / f"{engine}-{method}")
                except RuntimeError as e:  # report it and go on with the other runs
                    print(e, file=sys.stderr)
                    continue
                r["tokens_per_sec"] = args.batch_size * per_pair / r["sec_per_step"]
                results.append({"method": method, "engine": engine, **r})
                print(json.dumps(results[-1]), flush=True)
    print(f"\nbatch {args.batch_size} pairs ({args.batch_size * per_pair:.0f} tokens), "
          f"{args.iters} steps, LoRA rank {RANK} on the last {args.num_layers} blocks")  # fmt: skip
    print(f"{'method':<7}{'engine':<13}{'tokens/s':>9}{'s/step':>8}{'peak GB':>9}  "
          "held-out reward accuracy by step")  # fmt: skip
    for r in results:
        accuracy = ", ".join(f"{s}: {a:.2f}" for s, a in sorted(r["val_accuracy"].items()))
        print(f"{r['method']:<7}{r['engine']:<13}{r['tokens_per_sec']:>9.1f}"
              f"{r['sec_per_step']:>8.2f}{r['peak_memory_gb']:>9.3f}  {accuracy or '-'}")  # fmt: skip
    line = json.dumps({"bench": "prefs", "args": {k: str(v) for k, v in vars(args).items()},
                       "tokens_per_pair": per_pair, "results": results})  # fmt: skip
    print(line)
    if args.json:
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    if importlib.util.find_spec("elm_mlx") is None:
        sys.exit("install elm-mlx first (pip install -e .)")
    main()
