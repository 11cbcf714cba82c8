"""Speculative decoding: plain decoding vs prompt lookup vs a draft model, side by side.

    python benchmarks/bench_speculative.py                      # SmolLM2-135M + OpenELM-270M
    python benchmarks/bench_speculative.py --models smollm2 --max-tokens 200 --repeats 2

Two kinds of prompts, in the model's chat format: input-grounded (correct, edit, extract or
summarise a given text or code: the answer copies from the prompt) and open-ended.

- smollm2: the real SmolLM2-135M-Instruct (fp32), greedy, so every method must produce the same
  tokens (checked). There is no smaller model of its tokenizer, so the draft model is its own
  8-bit quantization, or with --smollm2-draft layersN its own first N blocks.
- openelm-270m: OpenELM-270M's true dimensions with random weights, sampled at temperature 1:
  its text is noise that no proposer predicts, which shows the overhead speculation costs when
  it cannot help (the adaptive proposal length should bring it back to plain decoding). Its
  draft is its own 4-bit quantization. Token ids are folded into its 32000-token vocabulary.

Prints a table and a JSON line: generation tokens/s per run, the speedup over plain decoding
on the same prompt, the acceptance rate and accepted tokens per step.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import elm_mlx  # noqa: F401  (selects OpenBLAS before mlx loads)

# isort: split
import mlx.core as mx

from elm_mlx import _blas
from elm_mlx.engine.config import GenerationConfig
from elm_mlx.engine.generation import stream_generate
from elm_mlx.loader import load
from elm_mlx.models import vocab_size
from elm_mlx.tokenizer import render_chat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import prepare, smollm2

DOCUMENT = (
    "The river town of Alder Bay was founded in 1823 by fishermen who settled on the north "
    "bank. In 1870 the railway reached the town and the harbour was extended to take steam "
    "ships. The cannery opened in 1891 and employed four hundred people at its peak. After the "
    "cannery closed in 1962, the town turned to tourism, and today its old warehouses hold "
    "shops, cafes and a maritime museum. The museum's collection includes the bell of the "
    "steamer Margaret, which sank off the point in 1903 with all of its cargo but none of its "
    "crew. Every August the town holds a regatta in her memory."
)
CODE = '''def moving_average(values, window):
    """Average of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
PROMPTS = {
    "grounded": {
        "correct-text": "Correct the spelling mistakes in this text and output the whole "
        "corrected text.\n\n"
        + DOCUMENT.replace("fishermen", "fishermn").replace("railway", "railwey"),
        "edit-code": "Rename the function moving_average to rolling_mean and output the "
        "complete code.\n\n" + CODE,
        "extract": "List every year mentioned in this text, each with the sentence it appears "
        "in.\n\n" + DOCUMENT,
        "summarize": "Summarize this text in three sentences.\n\n" + DOCUMENT,
    },
    "open-ended": {
        "story": "Write a short story about a robot who learns to paint.",
        "explain": "Explain why the sky is blue.",
        "tips": "Give me five tips for learning a new language.",
    },
}
MODELS = {
    # name: (target precision, draft precision, sampling temperature)
    "smollm2": ("fp32", "q8", 0.0),
    "openelm-270m": ("fp32", "q4", 1.0),
}


def encode(tokenizer, model, text: str, vocab: int) -> list[int]:
    chat = render_chat(tokenizer, [{"role": "user", "content": text}], model.model_type)
    return [i % vocab for i in tokenizer.encode(chat, add_special_tokens=False)]


def run(model, tokenizer, prompt: list[int], config: GenerationConfig) -> dict:
    tokens, last = [], None
    for last in stream_generate(model, tokenizer, prompt, config):
        tokens.append(last.token)
    stats = last.speculative
    return {
        "tokens": tokens,
        "generation_tokens": last.generation_tokens,
        "generation_tps": last.generation_tps,
        "acceptance": stats.acceptance_rate if stats else None,
        "accepted_per_step": stats.accepted_per_step if stats else None,
        "estimated_speedup": stats.speedup if stats else None,
    }


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    target_precision, draft_precision, temperature = MODELS[name]
    if name == "smollm2":
        draft_precision = args.smollm2_draft
    model, tokenizer = load(prepare(name, target_precision, args.root))
    if draft_precision.startswith("layers"):
        # A self-draft (LayerSkip-style): the target's own first N blocks, final norm and head.
        # On the CPU backend the quantized drafts are slower than the fp32 target, so this is
        # the one draft here that is cheaper than the model it drafts for.
        draft, _ = load(prepare(name, target_precision, args.root))
        draft.model.layers = draft.model.layers[: int(draft_precision.removeprefix("layers"))]
    else:
        draft, _ = load(prepare(name, draft_precision, args.root))
    vocab = vocab_size(model)
    base = GenerationConfig(max_tokens=args.max_tokens, temperature=temperature, seed=0)
    methods = {
        "plain": base,
        f"lookup-{args.prompt_lookup}": replace(base, prompt_lookup=args.prompt_lookup),
        f"draft-{draft_precision}": replace(base, draft_model=draft, num_draft=args.num_draft),
    }
    rows = []
    for kind, prompts in PROMPTS.items():
        for prompt_name, text in prompts.items():
            prompt = encode(tokenizer, model, text, vocab)
            runs: dict[str, list[dict]] = {m: [] for m in methods}
            run(model, tokenizer, prompt[:8], GenerationConfig(max_tokens=4))  # warm up
            for _ in range(args.repeats):  # methods interleaved, so that load drifts evenly
                for method, config in methods.items():
                    mx.clear_cache()
                    runs[method].append(run(model, tokenizer, prompt, config))
            plain_tps = statistics.median(r["generation_tps"] for r in runs["plain"])
            for method, results in runs.items():
                r = results[0]
                tps = statistics.median(x["generation_tps"] for x in results)
                rows.append(
                    {
                        "model": name,
                        "kind": kind,
                        "prompt": prompt_name,
                        "method": method,
                        "prompt_tokens": len(prompt),
                        "generation_tokens": r["generation_tokens"],
                        "generation_tps": tps,
                        "speedup": tps / plain_tps,
                        "acceptance": r["acceptance"],
                        "accepted_per_step": r["accepted_per_step"],
                        "estimated_speedup": r["estimated_speedup"],
                        # greedy: every method must give plain decoding's tokens
                        "same_tokens": r["tokens"] == runs["plain"][0]["tokens"]
                        if temperature == 0
                        else None,
                    }
                )
                print(f"{name} {prompt_name} {method}: {tps:.1f} tok/s", file=sys.stderr)
    return rows


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,openelm-270m")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--prompt-lookup", type=int, default=10)
    parser.add_argument("--num-draft", type=int, default=4)
    parser.add_argument(
        "--smollm2-draft",
        default="q8",
        help="SmolLM2's draft: a precision (q8, q4) or layersN (its first N blocks)",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--root", type=Path, default=smollm2.default_cache_dir().parent / "bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    env = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.system()}, {mx.default_device()}",
        "blas": _blas.describe(),
        "mlx": mx.__version__,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
    }
    rows = [row for name in args.models.split(",") for row in bench_model(name, args)]

    print(f"# {env}")
    print(
        f"{'model':13s} {'kind':10s} {'prompt':12s} {'method':10s} {'tokens':>6s} "
        f"{'tok/s':>6s} {'speedup':>7s} {'accept':>6s} {'acc/step':>8s} {'est.':>5s} same"
    )
    for r in rows:
        print(
            f"{r['model']:13s} {r['kind']:10s} {r['prompt']:12s} {r['method']:10s} "
            f"{r['generation_tokens']:6d} {r['generation_tps']:6.2f} {r['speedup']:6.2f}x "
            f"{fmt(r['acceptance'], '6.0%')} {fmt(r['accepted_per_step'], '8.2f')} "
            f"{fmt(r['estimated_speedup'], '5.2f')} {fmt(r['same_tokens'], '')}"
        )
    summary = {}
    for r in rows:
        summary.setdefault(f"{r['model']} {r['kind']} {r['method']}", []).append(r["speedup"])
    print("\ngeometric mean speedup over plain decoding:")
    for key, speedups in summary.items():
        mean = math.exp(statistics.fmean(math.log(s) for s in speedups))
        print(f"  {key:45s} {mean:.2f}x")
    payload = {"env": env, "results": rows}
    print(json.dumps(payload))
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
