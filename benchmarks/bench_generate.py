"""Prompt and generation speed and peak memory: elm vs mlx-lm on the same converted weights.

Both engines run in this one process, alternately, on the same folder, prompt and backend,
greedy, with EOS ignored so every run produces exactly --gen-tokens tokens.

    python benchmarks/bench_generate.py                       # SmolLM2-135M + OpenELM-270M
    python benchmarks/bench_generate.py --models smollm2 --precisions fp16,q4 --json out.json

Prints a table and a JSON line. Also estimates the decode bound from memory bandwidth: the
weight bytes read per token divided by a measured streaming bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import elm_mlx  # noqa: F401  (selects OpenBLAS before mlx loads)

# isort: split
import mlx.core as mx
import numpy as np
from elm_mlx.convert import ConvertOptions, convert
from mlx.utils import tree_flatten, tree_map

from elm_mlx import _blas
from elm_mlx.engine.generation import stream_generate as elm_stream
from elm_mlx.loader import load as elm_load

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import smollm2

PRECISIONS = {
    "fp32": ConvertOptions(dtype="float32"),
    "fp16": ConvertOptions(dtype="float16"),
    "bf16": ConvertOptions(dtype="bfloat16"),
    "q8": ConvertOptions(dtype="float16", quantize=True, bits=8),
    "q4": ConvertOptions(dtype="float16", quantize=True, bits=4),
}
PROMPT = (
    "The history of the city begins with a small fishing village on the river. Over the "
    "centuries it grew into a trading port, then an industrial town, and finally a modern "
    "city known for its universities, its parks and its music. "
) * 4


def openelm_270m_hf(root: Path) -> Path:
    """A random-weight OpenELM-270M with the true config, written as an HF checkpoint."""
    folder = root / "openelm-270m-random-hf"
    if (folder / "model.safetensors").exists():
        return folder
    from elm_mlx.models import get_family

    refs = Path(__file__).resolve().parents[1] / "tests" / "data" / "openelm-configs.json"
    config = json.loads(refs.read_text())["apple/OpenELM-270M"]["config.json"]
    family = get_family("openelm")
    model = family.Model(family.ModelArgs.from_dict(config))
    mx.random.seed(0)
    # small random weights keep activations finite in fp16
    weights = {
        k: (0.02 * mx.random.normal(v.shape)).astype(mx.float32)
        for k, v in tree_flatten(model.parameters())
    }
    weights = {k: (mx.ones_like(v) if "norm" in k else v) for k, v in weights.items()}
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def prepare(name: str, precision: str, root: Path) -> Path:
    out = root / f"{name}-{precision}"
    if (out / "config.json").exists():
        return out
    if name == "smollm2":
        src, tokenizer = smollm2.build_hf_folder(smollm2.default_cache_dir()), None
    else:
        # No OpenELM tokenizer offline: borrow SmolLM2's (its 49152 ids cover OpenELM's 32000).
        src = openelm_270m_hf(root)
        tokenizer = str(smollm2.build_hf_folder(smollm2.default_cache_dir()))
    options = PRECISIONS[precision]
    options = ConvertOptions(**{**options.__dict__, "tokenizer": tokenizer})
    return convert(src, out, options, progress=False)


def weight_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def stream_bandwidth() -> float:
    """GB/s of a streaming read of 512 MB, best of 5: the faster of an MLX reduction (bandwidth
    bound on Metal; single-threaded on the CPU backend) and a NumPy reduction on every core."""
    x = mx.ones((128, 1 << 20), dtype=mx.float32)
    mx.eval(x)
    parts = np.array_split(np.ones((128, 1 << 20), dtype=np.float32), os.cpu_count() or 1)
    best_mlx = best_np = float("inf")
    with ThreadPoolExecutor(len(parts)) as pool:  # NumPy releases the GIL while it reduces
        for _ in range(5):
            tic = time.perf_counter()
            mx.eval(x.sum())
            best_mlx = min(best_mlx, time.perf_counter() - tic)
            tic = time.perf_counter()
            list(pool.map(np.sum, parts))
            best_np = min(best_np, time.perf_counter() - tic)
    return x.nbytes / min(best_mlx, best_np) / 1e9


def timed(responses) -> tuple[float, float, float, int]:
    """(prompt tok/s, generation tok/s, peak GB, tokens), timed here the same way for both
    engines: generation speed counts tokens 2..n over the time since token 1 arrived (the
    engines' own figures differ by one token in what they count)."""
    start, n, response = 0.0, 0, None
    for n, response in enumerate(responses, 1):  # noqa: B007  (the last one is used below)
        if n == 1:
            start = time.perf_counter()
    elapsed = time.perf_counter() - start
    return response.prompt_tps, (n - 1) / elapsed, response.peak_memory, n


def run_elm(model, tokenizer, prompt, n):
    return timed(elm_stream(model, tokenizer, prompt, max_tokens=n))


def run_mlx_lm(model, tokenizer, prompt, n):
    from mlx_lm.generate import stream_generate

    return timed(stream_generate(model, tokenizer, prompt, max_tokens=n))


def bench(folder: Path, gen_tokens: int, repeats: int, upcast: bool) -> dict:
    import mlx_lm

    engines = {}
    engines["elm"] = (*elm_load(folder), run_elm)
    lm_model, lm_tokenizer = mlx_lm.load(str(folder))
    if upcast:
        # mlx-lm computes in the stored half precision, whose CPU kernels are 3-30x slower
        # than fp32 (and quantized ones with half scales ~30x): give it elm's fp32 upcast so
        # the engines, not the kernels, are compared.
        half = (mx.float16, mx.bfloat16)
        lm_model.update(
            tree_map(
                lambda p: p.astype(mx.float32) if p.dtype in half else p, lm_model.parameters()
            )
        )
    engines["mlx-lm"] = (lm_model, lm_tokenizer, run_mlx_lm)
    results: dict[str, dict] = {}
    prompt = None
    for _model, tokenizer, _run in engines.values():
        tokenizer.eos_token_ids = set()  # always generate exactly gen_tokens
        prompt = prompt or tokenizer.encode(PROMPT)
    samples = {name: [] for name in engines}
    for r in range(repeats + 1):  # the first round warms up
        order = list(engines.items())
        for name, (model, tokenizer, run) in order if r % 2 else order[::-1]:  # alternate
            mx.clear_cache()
            out = run(model, tokenizer, mx.array(prompt), gen_tokens)
            if r:
                samples[name].append(out)
    for name, runs in samples.items():
        model = engines[name][0]
        results[name] = {
            "prompt_tokens": len(prompt),
            "prompt_tps": statistics.median(s[0] for s in runs),
            "generation_tps": statistics.median(s[1] for s in runs),
            "peak_memory_gb": max(s[2] for s in runs),
            "generation_tokens": runs[0][3],
            "weight_bytes": weight_bytes(model),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,openelm-270m")
    parser.add_argument("--precisions", default="fp32,fp16,q8,q4")
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", type=Path, default=smollm2.default_cache_dir().parent / "bench")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--mlx-lm-as-stored",
        action="store_true",
        help="run mlx-lm in the stored dtype (very slow on the CPU backend for half/quantized)",
    )
    args = parser.parse_args()

    bandwidth = stream_bandwidth()
    env = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.system()}, {mx.default_device()}",
        "blas": _blas.describe(),
        "mlx": mx.__version__,
        "mlx_lm_upcast_to_fp32": not args.mlx_lm_as_stored,
        "stream_bandwidth_gbs": round(bandwidth, 1),
    }
    rows = []
    for name in args.models.split(","):
        for precision in args.precisions.split(","):
            folder = prepare(name, precision, args.root)
            for engine, r in bench(
                folder, args.gen_tokens, args.repeats, not args.mlx_lm_as_stored
            ).items():
                bound = bandwidth * 1e9 / r["weight_bytes"]
                rows.append(
                    {
                        "model": name,
                        "precision": precision,
                        "engine": engine,
                        **r,
                        "bound_tps": bound,
                        "of_bound": r["generation_tps"] / bound,
                    }
                )
                print(
                    f"{name:13s} {precision:5s} {engine:7s} prompt {r['prompt_tps']:.1f} t/s, "
                    f"generation {r['generation_tps']:.1f} t/s, peak {r['peak_memory_gb']:.3f} GB",
                    file=sys.stderr,
                )

    header = (
        f"{'model':13s} {'prec':5s} {'engine':7s} {'prompt t/s':>10s} {'gen t/s':>8s} "
        f"{'peak GB':>8s} {'bound t/s':>9s} {'of bound':>8s}"
    )
    print(f"# {env}")
    print(header)
    for r in rows:
        print(
            f"{r['model']:13s} {r['precision']:5s} {r['engine']:7s} {r['prompt_tps']:10.1f} "
            f"{r['generation_tps']:8.1f} {r['peak_memory_gb']:8.3f} {r['bound_tps']:9.1f} "
            f"{r['of_bound']:8.0%}"
        )
    payload = {"env": env, "results": rows}
    print(json.dumps(payload))
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
