"""Quantization quality, elm vs mlx-lm, on the same float weights and the same calibration text.

Sources: the real SmolLM2-135M-Instruct (its floats are GGUF Q4_1 values, 4-bit grids of 32-wide
groups, which a quantizer can partly recover), "smollm2-noisy": the same with uniform noise of one
Q4_1 bin added to every block weight (continuous values, as a real fp16 checkpoint has; the noisy
model is the float reference), and a random-weight OpenELM-270M with the true config. For each
source and method, one worker process builds the quantized folder and reports its time and peak
memory; the folder is then scored on held-out text that no method calibrated on:

    rtn 8/64, rtn 4/64, rtn 4/32   round to nearest (`mlx_lm.convert -q`; elm's plain
                                   `--quantize` writes the same tensors)
    mlx-lm mixed_4_6               mlx-lm's recipe (v_proj/down_proj of some layers and the head
                                   at 6 bits); it raises on OpenELM/OLMo layer names
    mlx-lm gptq 4/64               `mlx_lm.quant.gptq.gptq_quantize` (its fallback layers, the
                                   embedding here, at 8 bits), fed elm's calibration windows
    elm calibrated 4/64            `elm convert -q --calibrate` as by default: the model's own
    elm mixed B                    text, pydoc and elm's general English (16, 8 and 8 windows)
    elm calibrated 4/64 file only  `elm convert -q --calibrate` and `--bpw B` on the calibration
    elm mixed B file only          file alone, the same windows mlx-lm's GPTQ gets
    ... file only asym A           the same with `--asymmetric A` (GPTAQ), A in 0.25, 0.5
    elm calibrated 4/64 + english  with `--english FILE`: the default rows with that file in
    elm mixed B + english          place of elm's general English

Calibration text: the standard library's pydoc topics (every Python has it); its first 85% of
characters is the calibration file both engines use (elm adds the text the float model writes
and its bundled general English, `elm_mlx/quantize/data/english.txt`, as it does by default).
Held out: "pydoc", the remaining 15% (the calibration's domain), "prose", English fiction
(Alice's Adventures in Wonderland, chapters I-III, public domain, shipped in tests/data), and
with `--news FILE` "news", articles of a third domain. Metrics per held-out text: perplexity in
windows of --window and the mean KL divergence of the quantized model's next-token
distribution from the float one; bits per weight (packed codes + scales + biases over the
quantized tensors, 16-bit scales), convert seconds and the worker's peak resident memory.
mlx-lm's AWQ, DWQ and dynamic quantization are left out: on this CPU they did not finish in 10
minutes for SmolLM2 (issue 11).

    python benchmarks/bench_quant.py                 # every source
    python benchmarks/bench_quant.py --models smollm2-noisy --bpw 4.5 --news news.txt

The news measured (BENCHMARKS.md, issue 17, eleventh round on) is the Lee corpus of Australian
news articles in gensim's test data (neither fiction nor documentation, never calibrated on):
`pip download gensim==4.4.0 --no-deps` and `unzip -p gensim-*.whl
gensim/test/test_data/lee_background.cor > news.txt`. `--english FILE` stands in for what
`--calibration-dataset` gives a user online.

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


PROSE = ROOT / "tests" / "data" / "alice-ch1-3.txt"
ASYMMETRIC_SHARES = (0.25, 0.5)  # `--asymmetric` values the "asym" methods try


def texts() -> tuple[str, dict[str, str]]:
    """(calibration text, {name: held-out text})."""
    from elm_mlx.quantize import default_text

    text = default_text()
    cut = text.rfind("\n\n", 0, int(len(text) * CALIBRATION_SHARE))
    return text[:cut], {"pydoc": text[cut:], "prose": PROSE.read_text()}


# ---------------------------------------------------------------------------- sources


def smollm2_source(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "examples"))
    import smollm2

    return smollm2.build_hf_folder(smollm2.default_cache_dir())


def smollm2_noisy_source(work: Path) -> Path:
    """SmolLM2 with each block weight moved by uniform noise of one Q4_1 bin (the range of its
    32-wide group / 15), seeded: continuous values, off any 4-bit grid."""
    import shutil

    from safetensors.numpy import load_file, save_file

    src, out = smollm2_source(work), work / "smollm2-noisy-hf"
    if (out / "model.safetensors").exists():
        return out
    rng = np.random.default_rng(0)
    tensors = load_file(str(src / "model.safetensors"))
    for name, w in tensors.items():
        if name.startswith("model.layers.") and w.ndim == 2:
            g = w.astype(np.float32).reshape(w.shape[0], -1, 32)
            step = (g.max(-1, keepdims=True) - g.min(-1, keepdims=True)) / 15
            g += (rng.random(g.shape, dtype=np.float32) - 0.5) * step
            tensors[name] = g.reshape(w.shape).astype(w.dtype)
    staging = work / "smollm2-noisy-hf.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    staging.rename(out)
    return out


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


SOURCES = {
    "smollm2": smollm2_source,
    "smollm2-noisy": smollm2_noisy_source,
    "openelm": openelm_source,
}


# ---------------------------------------------------------------------------- methods


def methods(
    bpws: list[float], tunes: list[float], bundled: Path, english: Path | None
) -> dict[str, dict]:
    """Each row's recipe. elm's default rows calibrate as `elm convert` does by default: the
    model's own text, the calibration file (pydoc) and elm's general English (`bundled`)."""
    default = {"engine": "elm", "quantize": True, "english": str(bundled)}
    out = {
        "float16": {"engine": "elm"},
        "rtn 8/64": {"engine": "mlx_lm", "bits": 8, "group_size": 64},
        "rtn 4/64": {"engine": "mlx_lm", "bits": 4, "group_size": 64},
        "rtn 4/32": {"engine": "mlx_lm", "bits": 4, "group_size": 32},
        "mlx-lm mixed_4_6": {"engine": "mlx_lm", "recipe": "mixed_4_6"},
        "mlx-lm gptq 4/64": {"engine": "mlx_lm", "gptq": True},
        "elm calibrated 4/64": {**default, "calibrate": True},
    }
    for b in bpws:
        out[f"elm mixed {b:g}"] = {**default, "bpw": b}
    for t in tunes:  # then tuned to the float model for t seconds (blocks, then end to end)
        out[f"elm calibrated 4/64 tuned {t:g}s"] = {**default, "tune": t}
    # the calibration text alone, as mlx-lm's GPTQ gets it (no windows of the model's own), and
    # the same with each layer fitted that share of the way to the float model's outputs
    file_only = {"elm calibrated 4/64": {"calibrate": True}}
    file_only |= {f"elm mixed {b:g}": {"bpw": b} for b in bpws}
    for label, spec in file_only.items():
        spec = {"engine": "elm", "quantize": True, "own": False, **spec}
        out[f"{label} file only"] = spec
        for a in ASYMMETRIC_SHARES:
            out[f"{label} file only asym {a:g}"] = {**spec, "asymmetric": a}
    if english is not None:  # the user's English in place of elm's, beside pydoc and own text
        for label in file_only:
            out[f"{label} + english"] = {**out[label], "english": str(english.resolve())}
    return out


def build_elm(src: Path, out: Path, spec: dict, calibration: Path) -> None:
    from elm_mlx.convert import ConvertOptions, convert

    files = (str(calibration),) + ((spec["english"],) if "english" in spec else ())
    options = ConvertOptions(
        dtype="float16",
        quantize=spec.get("quantize", False),
        calibrate=spec.get("calibrate", False),
        bpw=spec.get("bpw"),
        calibration_files=files if spec.get("quantize") else (),
        # as without a file (held out apart), unless the method says the file alone
        own_text=spec.get("own", True) if spec.get("quantize") else None,
        asymmetric=spec.get("asymmetric", 0.0),
        tune_seconds=spec.get("tune", 0.0),
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


def score(folder: Path, held: dict[str, list[int]], window: int, reference: dict | None) -> dict:
    """Per held-out text: perplexity and, against `reference` (the float model's log-probs,
    float16 to halve their memory), the mean KL; without it, the log-probs become the reference
    (returned under "logprobs")."""
    from elm_mlx import load
    from elm_mlx.quantize import dequantized_view

    model, _ = load(folder)
    # MLX's CPU quantized matmul is a plain loop (minutes per window): score with the
    # dequantized weights instead, the same values in float32
    dequantized_view(model)
    result: dict = {"bpw": bits_per_weight(folder)}
    logprobs: dict[str, list] = {}
    for name, ids in held.items():
        nll = kl = 0.0
        n = 0
        for i, (lp, targets) in enumerate(next_token_logprobs(model, ids, window)):
            lp = lp[: len(targets)]
            picked = mx.take_along_axis(lp, mx.array(targets)[:, None], axis=-1)
            nll -= picked.sum().item()
            n += len(targets)
            if reference is None:
                logprobs.setdefault(name, []).append(np.array(lp.astype(mx.float16)))
            else:
                ref = mx.array(reference[name][i]).astype(mx.float32)
                kl += (mx.exp(ref) * (ref - lp)).sum().item()
        result[name] = {"ppl": math.exp(nll / n), "tokens": n, "kl": kl / n}
    if reference is None:
        result["logprobs"] = logprobs
    return result


# ---------------------------------------------------------------------------- main


def bench_model(
    name: str,
    work: Path,
    bpws: list[float],
    tunes: list[float],
    english: Path | None,
    news: Path | None,
    tokens: int,
    window: int,
    only: list[str] | None,
) -> list:
    from elm_mlx.quantize.calibration_text import english_text
    from elm_mlx.tokenizer import load_tokenizer

    calibration_text, held_texts = texts()
    if news is not None:
        held_texts["news"] = news.read_text()
    calibration = work / "calibration.txt"
    calibration.write_text(calibration_text)
    bundled = work / "english.txt"
    bundled.write_text(english_text())
    src = SOURCES[name](work)
    rows = []
    reference = None
    float_dir = work / f"{name}-float16"
    for label, spec in methods(bpws, tunes, bundled, english).items():
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
                tokenizer = load_tokenizer(out)
                held = {k: tokenizer.encode(t)[:tokens] for k, t in held_texts.items()}
            scored = score(out, held, window, reference)
            if reference is None:
                reference = scored.pop("logprobs")
            row |= scored
        rows.append(row)
        print(format_row(row), flush=True)
    for row in rows:
        for text in held_texts:
            if text in row and text in rows[0]:
                row[text]["ppl_change"] = row[text]["ppl"] / rows[0][text]["ppl"] - 1
    return rows


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['model']:13} {row['method']:22} error: {row['error']}"
    bpw = "-" if row["bpw"] is None else f"{row['bpw']:.3f}"
    secs = "cached" if row.get("cached") else f"{row['seconds']:.0f}s"
    peak = "" if row.get("cached") else f"{row['peak_rss'] / 2**30:.2f} GiB"
    cells = []
    for text in ("pydoc", "prose", "news"):
        if text not in row:
            continue
        r = row[text]
        change = f" ({100 * r['ppl_change']:+.1f}%)" if "ppl_change" in r else ""
        cells.append(f"{text} ppl {r['ppl']:7.3f}{change:9} KL {r['kl']:.4f}")
    return (
        f"{row['model']:13} {row['method']:22} bpw {bpw:>6}  {'  '.join(cells)}  "
        f"convert {secs:>6}  peak {peak}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--bpw", nargs="+", type=float, default=[4.5, 4.25])
    parser.add_argument(
        "--tune", nargs="*", type=float, default=[], help="--tune-seconds budgets to add as rows"
    )
    parser.add_argument(
        "--english", type=Path, help="general English text: adds the '+ english' rows"
    )
    parser.add_argument(
        "--news", type=Path, help="a third held-out text (news articles): adds its columns"
    )
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
        rows += bench_model(
            name, work, args.bpw, args.tune, args.english, args.news, args.tokens, args.window,
            args.methods,
        )  # fmt: skip
    print()
    for row in rows:
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
