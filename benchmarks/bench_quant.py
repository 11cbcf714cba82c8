"""Quantization quality, elm vs mlx-lm, on the same float weights and the same calibration text.

For each model (the real SmolLM2-135M-Instruct, and a random-weight OpenELM-270M with the true
config) and each method, one worker process builds the quantized folder and reports its time
and peak memory; the folder is then scored on held-out text that no method calibrated on:

    rtn 8/64, rtn 4/64, rtn 4/32   round to nearest (`mlx_lm.convert -q`; elm's plain
                                   `--quantize` writes the same tensors)
    mlx-lm mixed_4_6               mlx-lm's recipe (v_proj/down_proj of some layers and the head
                                   at 6 bits); it raises on OpenELM/OLMo layer names
    mlx-lm gptq 4/64               `mlx_lm.quant.gptq.gptq_quantize` (its fallback layers, the
                                   embedding here, at 8 bits), fed elm's calibration windows
    elm calibrated 4/64            `elm convert -q --calibrate`
    elm mixed B                    `elm convert -q --bpw B`

The text is the standard library's pydoc topics (every Python has it): the first 85% of its
characters is the calibration file both engines use, the rest is held out. Metrics: bits per
weight (packed codes + scales + biases over the quantized tensors, 16-bit scales), perplexity of
the held-out tokens in windows of --window (SmolLM2) and the mean KL divergence of the quantized
model's next-token distribution from the float one (both), convert seconds and the worker's peak
resident memory. mlx-lm's AWQ, DWQ and dynamic quantization are left out: on this CPU they did
not finish in 10 minutes for SmolLM2 (issue 11).

    python benchmarks/bench_quant.py                 # both models
    python benchmarks/bench_quant.py --models smollm2 --bpw 4.5 4.25

One run; prints a table per model and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_SHARE = 0.85  # of the text's characters; the rest is held out


def texts() -> tuple[str, str]:
    """(calibration text, held-out text)."""
    from elm_mlx.quantize import default_text

    text = default_text()
    cut = text.rfind("\n\n", 0, int(len(text) * CALIBRATION_SHARE))
    return text[:cut], text[cut:]


# ---------------------------------------------------------------------------- sources


def smollm2_source(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "examples"))
    import smollm2

    return smollm2.build_hf_folder(smollm2.default_cache_dir())


def openelm_source(work: Path) -> Path:
    """Random OpenELM-270M (true dims) with a SentencePiece tokenizer trained on the calibration
    text (no OpenELM tokenizer offline; its ids stay inside OpenELM's vocabulary)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sentencepiece as spm
    from bench_generate import openelm_270m_hf

    from elm_mlx.model_folder import SPM_TOKENIZER_CONFIG

    folder = openelm_270m_hf(work)
    if not (folder / "tokenizer.model").exists():
        corpus = work / "spm-corpus.txt"
        corpus.write_text(texts()[0])
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=8000,
            model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            minloglevel=2,
        )  # fmt: skip
        (folder / "tokenizer_config.json").write_text(json.dumps(SPM_TOKENIZER_CONFIG))
    return folder


SOURCES = {"smollm2": smollm2_source, "openelm": openelm_source}


# ---------------------------------------------------------------------------- methods


def methods(bpws: list[float]) -> dict[str, dict]:
    out = {
        "float16": {"engine": "elm"},
        "rtn 8/64": {"engine": "mlx_lm", "bits": 8, "group_size": 64},
        "rtn 4/64": {"engine": "mlx_lm", "bits": 4, "group_size": 64},
        "rtn 4/32": {"engine": "mlx_lm", "bits": 4, "group_size": 32},
        "mlx-lm mixed_4_6": {"engine": "mlx_lm", "recipe": "mixed_4_6"},
        "mlx-lm gptq 4/64": {"engine": "mlx_lm", "gptq": True},
        "elm calibrated 4/64": {"engine": "elm", "quantize": True, "calibrate": True},
    }
    for b in bpws:
        out[f"elm mixed {b:g}"] = {"engine": "elm", "quantize": True, "bpw": b}
    return out


def build_elm(src: Path, out: Path, spec: dict, calibration: Path) -> None:
    from elm_mlx.convert import ConvertOptions, convert

    options = ConvertOptions(
        dtype="float16",
        quantize=spec.get("quantize", False),
        calibrate=spec.get("calibrate", False),
        bpw=spec.get("bpw"),
        calibration_file=str(calibration) if spec.get("quantize") else None,
    )
    convert(src, out, options, progress=False, report=lambda r: print(r.summary(), file=sys.stderr))


def build_mlx_lm(float_dir: Path, out: Path, spec: dict, calibration: Path) -> None:
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.quant.gptq import gptq_quantize
    from mlx_lm.utils import load, quantize_model, save

    from elm_mlx.quantize import CalibrationConfig, split

    model, tokenizer, config = load(str(float_dir), return_config=True, lazy=True)
    if spec.get("gptq"):
        ids = tokenizer.encode(calibration.read_text())  # the windows elm calibrates on
        data = split(ids, CalibrationConfig(), str(calibration)).windows
        # in float32 as elm calibrates (float16 matmuls crawl on the CPU backend), then the
        # floats (scales, biases, norms) back to the folder's float16
        model.set_dtype(mx.float32)
        model, config["quantization"] = gptq_quantize(model, data, 4, 64, 8, 64)
        model.set_dtype(mx.float16)
    else:
        predicate = None
        if "recipe" in spec:
            predicate = mixed_quant_predicate_builder(spec["recipe"], model, 64)
        model, config = quantize_model(
            model, config, spec.get("group_size", 64), spec.get("bits", 4),
            quant_predicate=predicate,
        )  # fmt: skip
    save(out, float_dir, model, tokenizer, config)


def worker(args: argparse.Namespace) -> None:
    spec = json.loads(args.worker)
    out, calibration = Path(spec["out"]), Path(spec["calibration"])
    tic = time.perf_counter()
    if spec["engine"] == "elm":
        build_elm(Path(spec["src"]), out, spec, calibration)
    else:
        build_mlx_lm(Path(spec["float_dir"]), out, spec, calibration)
    seconds = time.perf_counter() - tic
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "mlx_peak": mx.get_peak_memory()}))


def run_worker(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": last[:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- scoring


def bits_per_weight(folder: Path) -> float | None:
    """From the written tensors (a loaded model may hold upcast copies): codes + scales + biases
    over the weights of every quantized tensor."""
    tensors: dict[str, mx.array] = {}
    for f in folder.glob("*.safetensors"):
        tensors |= mx.load(str(f))
    quant = json.loads((folder / "config.json").read_text()).get("quantization", {})
    bits = weights = 0
    for name, scales in tensors.items():
        if name.endswith(".scales"):
            module = name[: -len(".scales")]
            codes = tensors[f"{module}.weight"]
            bits += 8 * (codes.nbytes + scales.nbytes + tensors[f"{module}.biases"].nbytes)
            weights += codes.size * 32 // quant.get(module, quant)["bits"]
    return bits / weights if weights else None


def next_token_logprobs(model, ids: list[int], window: int):
    """Log-probabilities (tokens, V) of each next token, window by window (no overlap)."""
    for s in range(0, len(ids) - 1, window):
        x = mx.array(ids[s : s + window])[None]
        logits = model(x)[0].astype(mx.float32)
        yield logits - mx.logsumexp(logits, axis=-1, keepdims=True), ids[s + 1 : s + window + 1]


def score(folder: Path, ids: list[int], window: int, reference: list | None) -> dict:
    from elm_mlx import load
    from elm_mlx.quantize import dequantized_view

    model, _ = load(folder)
    # MLX's CPU quantized matmul is a plain loop (minutes per window): score with the
    # dequantized weights instead, the same values in float32
    dequantized_view(model)
    nll = kl = 0.0
    n = 0
    logprobs = []
    for i, (lp, targets) in enumerate(next_token_logprobs(model, ids, window)):
        lp = lp[: len(targets)]
        picked = mx.take_along_axis(lp, mx.array(targets)[:, None], axis=-1)
        nll -= picked.sum().item()
        n += len(targets)
        if reference is None:
            logprobs.append(np.array(lp))
        else:
            ref = mx.array(reference[i])
            kl += (mx.exp(ref) * (ref - lp)).sum().item()
    result = {"ppl": math.exp(nll / n), "tokens": n, "bpw": bits_per_weight(folder)}
    if reference is None:
        result["logprobs"] = logprobs
    else:
        result["kl"] = kl / n
    return result


# ---------------------------------------------------------------------------- main


def bench_model(
    name: str, work: Path, bpws: list[float], tokens: int, window: int, only: list[str] | None
) -> list:
    from elm_mlx.tokenizer import load_tokenizer

    calibration_text, held_text = texts()
    calibration = work / "calibration.txt"
    calibration.write_text(calibration_text)
    src = SOURCES[name](work)
    rows = []
    reference = None
    float_dir = work / f"{name}-float16"
    for label, spec in methods(bpws).items():
        if only and label != "float16" and label not in only:
            continue
        slug = label.replace(" ", "-").replace("/", "g")
        out = float_dir if label == "float16" else work / f"{name}-{slug}"
        spec = {**spec, "src": str(src), "float_dir": str(float_dir), "out": str(out),
                "calibration": str(calibration)}  # fmt: skip
        if not (out / "config.json").exists():
            built = run_worker(spec)
        else:
            built = {"seconds": None, "peak_rss": None, "mlx_peak": None, "cached": True}
        row = {"model": name, "method": label, **built}
        if "error" not in built:
            if reference is None:
                ids = load_tokenizer(out).encode(held_text)[:tokens]
            scored = score(out, ids, window, reference)
            if reference is None:
                reference = scored.pop("logprobs")
                scored["kl"] = 0.0
            row |= scored
        rows.append(row)
        print(format_row(row), flush=True)
    base = rows[0]["ppl"]
    for row in rows:
        if "ppl" in row:
            row["ppl_change"] = row["ppl"] / base - 1
    return rows


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['model']:8} {row['method']:22} error: {row['error']}"
    bpw = "-" if row["bpw"] is None else f"{row['bpw']:.3f}"
    secs = "cached" if row.get("cached") else f"{row['seconds']:.0f}s"
    peak = "" if row.get("cached") else f"{row['peak_rss'] / 2**30:.2f} GiB"
    return (
        f"{row['model']:8} {row['method']:22} bpw {bpw:>6}  ppl {row['ppl']:8.3f}  "
        f"KL {row['kl']:.5f}  convert {secs:>6}  peak {peak}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "openelm"], choices=SOURCES)
    parser.add_argument("--bpw", nargs="+", type=float, default=[4.5, 4.25])
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--methods", nargs="+", help="only these rows (labels as printed)")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache/elm-mlx/bench/quant")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for name in args.models:
        work = args.work / name
        work.mkdir(parents=True, exist_ok=True)
        rows += bench_model(name, work, args.bpw, args.tokens, args.window, args.methods)
    print()
    for row in rows:
        if "ppl_change" in row:
            print(f"{format_row(row)}  ({100 * row['ppl_change']:+.1f}%)")
        else:
            print(format_row(row))
    summary = {
        "bench": "quant",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.system()}",
        "mlx": mx.__version__,
        "rows": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
