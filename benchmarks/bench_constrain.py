"""Constrained decoding: the cost of the per-token mask (llguidance) on SmolLM2-135M-Instruct.

    python benchmarks/bench_constrain.py                       # SmolLM2-135M (49,152 tokens)
    python benchmarks/bench_constrain.py --max-tokens 48 --repeats 1

For each schema (those of tests/test_constrain.py), one greedy answer with the constraint;
every step is timed in parts: `wait` = `Constraint.mask_np()`, the bitmask llguidance computed
ahead during the forward pass, unpacked into (V,) bools; `to_mx` = that as an mx.array; `apply`
= mx.where on the logits, evaluated; `total` = the three. The answer's tokens are then replayed:
the forward passes alone (`step`), and llguidance's mask computed with no overlap, right after
each forward pass (`cold`) and again at once (`hot`). Goal (issue 15): mask <= 250 us p50, under 5% of a 5 ms Metal step of
a 270M model. Then decode throughput through the engine (BatchGenerator), constrained vs
unconstrained, alone and 8 at once (goal: >= 0.9x). Prints tables and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import elm_mlx  # noqa: F401  (selects OpenBLAS before mlx loads)

# isort: split
import mlx.core as mx
import numpy as np

from elm_mlx import _blas
from elm_mlx.engine.config import GenerationConfig
from elm_mlx.engine.constraint import ConstraintSpec, apply_mask, bridge
from elm_mlx.engine.scheduler import BatchGenerator, Request
from elm_mlx.loader import load
from elm_mlx.models import make_cache
from elm_mlx.tokenizer import encode_prompt, render_chat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import smollm2

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "enum_and_bounds": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
            "ok": {"type": "boolean"},
        },
        "required": ["color", "age", "score", "ok"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "pattern": "^[a-z]{1,12}$"},
                "minItems": 2,
                "maxItems": 6,
            }
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    "json_object": None,
}


def us(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.array(seconds) * 1e6, q))


def run_schema(model, tokenizer, prompt: list[int], spec: ConstraintSpec, max_tokens: int):
    """One constrained greedy answer, timed in parts; then its tokens replayed: the forward
    passes alone (the step time), and llguidance's mask computed with no overlap, right after
    each forward pass (cold) and once more straight after (hot)."""
    vocab = model.args.vocab_size
    t0 = time.perf_counter()
    spec.check(tokenizer)
    compile_s = time.perf_counter() - t0
    constraint = spec.build(tokenizer, vocab)
    eos = set(tokenizer.eos_token_ids)
    times: dict[str, list[float]] = {k: [] for k in ("wait", "to_mx", "apply")}
    cache = make_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[0, -1]
    mx.eval(logits)
    tokens: list[int] = []
    for _ in range(max_tokens):
        t0 = time.perf_counter()
        bits = constraint.mask_np()  # computed ahead, during the forward pass: the wait left
        t1 = time.perf_counter()
        mask = mx.array(bits)
        mx.eval(mask)
        t2 = time.perf_counter()
        masked = apply_mask(logits, mask)
        mx.eval(masked)
        t3 = time.perf_counter()
        token = int(mx.argmax(masked))
        times["wait"].append(t1 - t0)
        times["to_mx"].append(t2 - t1)
        times["apply"].append(t3 - t2)
        constraint.advance(token)
        if token in eos or constraint.done:
            break
        tokens.append(token)
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
        mx.eval(logits)
    times |= {"step": [], "cold": [], "hot": []}
    matcher = bridge(tokenizer).prototype(spec).deep_copy()
    words = np.zeros((bridge(tokenizer).vocab_size + 31) // 32, dtype=np.int32)
    cache = make_cache(model)
    mx.eval(model(mx.array([prompt]), cache=cache))
    for token in tokens:
        t0 = time.perf_counter()
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
        mx.eval(mx.argmax(logits))
        t1 = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        t2 = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        t3 = time.perf_counter()
        matcher.consume_token(token)
        times["step"].append(t1 - t0)
        times["cold"].append(t2 - t1)
        times["hot"].append(t3 - t2)
    return tokenizer.decode(tokens), compile_s, times


def decode_rate(model, tokenizer, prompts: list[list[int]], configs: list[GenerationConfig]):
    """Decode tokens/s of the engine with these requests together: B / the median time of
    the steps during which all B rows run (prefill apart)."""
    gen = BatchGenerator(model, tokenizer, max_batch=len(prompts))
    for prompt, config in zip(prompts, configs, strict=True):
        gen.add(Request(prompt, config))
    full: list[float] = []
    while gen.has_work:
        t0 = time.perf_counter()
        events = gen.step()
        seconds = time.perf_counter() - t0
        if len(events) == len(prompts) and gen.active == len(prompts):
            full.append(seconds)
    return len(prompts) / statistics.median(full) if full else float("nan"), len(full)


def throughput(model, tokenizer, rounds: int, max_tokens: int) -> list[dict]:
    """Constrained (each request its schema) vs unconstrained decoding, alone and 8 at once,
    in alternating rounds so that both see the same machine load."""
    specs = [
        ConstraintSpec.json_schema(s) if s else ConstraintSpec("json_object")
        for s in SCHEMAS.values()
    ]
    rows = []
    for batch in (1, 8):
        prompts, constrained, free = [], [], []
        for i in range(batch):
            spec = specs[i % len(specs)]
            question = f"Write a JSON record about city number {i} and its weather."
            messages = [{"role": "user", "content": question}]
            text = render_chat(tokenizer, messages, model.model_type)
            prompts.append(encode_prompt(tokenizer, text))
            free.append(GenerationConfig(max_tokens=max_tokens))
            constrained.append(GenerationConfig(max_tokens=max_tokens, constraint=spec))
        rates: dict[str, list[float]] = {"free": [], "constrained": []}
        for _ in range(rounds):
            rates["free"].append(decode_rate(model, tokenizer, prompts, free)[0])
            rates["constrained"].append(decode_rate(model, tokenizer, prompts, constrained)[0])
        f, c = statistics.median(rates["free"]), statistics.median(rates["constrained"])
        rows.append(
            {
                "batch": batch,
                "free_tps": round(f, 1),
                "constrained_tps": round(c, 1),
                "ratio": round(c / f, 3),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: SmolLM2-135M (HF)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2, help="answers per schema")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (0: none)")
    args = parser.parse_args()
    folder = args.model or smollm2.build_hf_folder(smollm2.default_cache_dir())
    model, tokenizer = load(folder)
    t0 = time.perf_counter()
    bridge(tokenizer)  # llguidance's view of the tokenizer, built once per tokenizer
    bridge_s = time.perf_counter() - t0
    rows, merged_all = [], {}
    for name, schema in SCHEMAS.items():
        spec = (
            ConstraintSpec("json_object") if schema is None else ConstraintSpec.json_schema(schema)
        )
        question = "Describe a person as JSON" + (f": {json.dumps(schema)}" if schema else ".")
        messages = [{"role": "user", "content": question}]
        prompt = encode_prompt(tokenizer, render_chat(tokenizer, messages, model.model_type))
        merged: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            text, compile_s, times = run_schema(model, tokenizer, prompt, spec, args.max_tokens)
            for k, v in times.items():
                merged.setdefault(k, []).extend(v)
        parts = zip(merged["wait"], merged["to_mx"], merged["apply"], strict=True)
        merged["total"] = [a + b + c for a, b, c in parts]
        for k, v in merged.items():
            merged_all.setdefault(k, []).extend(v)
        step = statistics.median(merged["step"])
        row = {"schema": name, "tokens": len(merged["wait"]), "compile_ms": compile_s * 1e3}
        for k in ("cold", "hot", "wait", "to_mx", "apply", "total"):
            row[f"{k}_p50_us"] = us(merged[k], 50)
            if k in ("cold", "wait", "total"):
                row[f"{k}_p99_us"] = us(merged[k], 99)
        row["step_p50_ms"] = step * 1e3
        row["total_pct_of_step"] = 100 * us(merged["total"], 50) / (step * 1e6)
        rows.append({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})
        print(f"{name}: {text[:70]!r}")
    print(
        f"model {folder}, vocab {model.args.vocab_size}, {platform.machine()}, "
        f"{mx.default_device()}, BLAS {_blas.describe()}"
    )
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    print(f"tokenizer bridge built in {bridge_s * 1e3:.0f} ms (once per tokenizer)")
    summary = {"bench": "constrain", "vocab": model.args.vocab_size, "bridge_ms": bridge_s * 1e3}
    for k in ("cold", "hot", "wait", "total"):
        summary[f"{k}_p50_us"] = round(us(merged_all[k], 50), 1)
        summary[f"{k}_p99_us"] = round(us(merged_all[k], 99), 1)
    summary["rows"] = rows
    if args.rounds:
        tput = throughput(model, tokenizer, args.rounds, args.max_tokens)
        print("batch | unconstrained tok/s | constrained tok/s | ratio")
        for r in tput:
            print(f"{r['batch']} | {r['free_tps']} | {r['constrained_tps']} | {r['ratio']}")
        summary["throughput"] = tput
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
