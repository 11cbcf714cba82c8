"""The one engine's overhead: `stream_generate` (a batch of one on the scheduler) against the
reference loop `generate_step` (mlx-lm's shape: one forward pass per token, the next step
queued while Python handles the last token), on a random Llama sized so that one decode step
takes 3-5 ms on this CPU, which is OpenELM-270M's step on an M2: there Python's overhead per
step is what matters.

    python benchmarks/bench_engine.py                     # hidden 256, 6 layers, 256 tokens
    python benchmarks/bench_engine.py --hidden 384 --layers 8 --repeats 5

Greedy, the same prompt, 256 new tokens, EOS ignored; runs alternate (reference, engine,
engine with prompt lookup) so that all see the same machine load; per setting the median
tokens/s of `--repeats` runs. The prompt-lookup row measures speculation's cost where it does
not pay (a random model's text rarely repeats): the adaptive proposal length should keep it
near the plain engine. Prints a table and a JSON line.
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

from elm_mlx import _blas
from elm_mlx.engine.config import GenerationConfig
from elm_mlx.engine.generation import stream_generate
from elm_mlx.engine.reference import generate_step
from elm_mlx.models.llama import Model, ModelArgs
from elm_mlx.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import smollm2


def random_llama(hidden: int, layers: int, vocab: int) -> Model:
    args = ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=4 * hidden,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 192),
        vocab_size=vocab,
        tie_word_embeddings=True,
    )
    mx.random.seed(0)
    model = Model(args)
    mx.eval(model.parameters())
    return model


def reference(model: Model, prompt: list[int], n: int) -> float:
    """Tokens/s of the reference loop (after its first token)."""
    steps = generate_step(mx.array(prompt, mx.uint32), model, max_tokens=n)
    next(steps)
    tic = time.perf_counter()
    count = sum(1 for _ in steps)
    return count / (time.perf_counter() - tic)


def engine(model: Model, tokenizer, prompt: list[int], n: int, lookup: int | None) -> float:
    """Tokens/s of `stream_generate` (after its first token), EOS ignored."""
    config = GenerationConfig(max_tokens=n, prompt_lookup=lookup)
    responses = stream_generate(model, tokenizer, prompt, config)
    next(responses)
    tic = time.perf_counter()
    count = sum(1 for _ in responses)
    return count / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    tokenizer = load_tokenizer(smollm2.build_hf_folder(smollm2.default_cache_dir()))
    tokenizer.eos_token_ids = set()  # a random model: run the full length
    model = random_llama(args.hidden, args.layers, tokenizer.vocab_size)
    prompt = tokenizer.encode("Summarise the following text in one sentence: " * 4)
    n = args.max_tokens
    reference(model, prompt, 16)  # warm-up
    engine(model, tokenizer, prompt, 16, None)
    runs: dict[str, list[float]] = {"generate_step": [], "engine": [], "engine + lookup": []}
    paths = {
        "generate_step": lambda: reference(model, prompt, n),
        "engine": lambda: engine(model, tokenizer, prompt, n, None),
        "engine + lookup": lambda: engine(model, tokenizer, prompt, n, 10),
    }
    for i in range(args.repeats):
        # the order turns each repeat, so that a drift of the machine's speed does not favour
        # whichever path runs first
        names = list(paths)
        for name in names[i % len(names) :] + names[: i % len(names)]:
            runs[name].append(paths[name]())
    median = {k: statistics.median(v) for k, v in runs.items()}
    base = median["generate_step"]
    # per repeat, each path against the reference run beside it: less noisy than the medians'
    # ratio when the machine's speed drifts between repeats
    paired = {
        k: statistics.median(a / b for a, b in zip(v, runs["generate_step"], strict=True))
        for k, v in runs.items()
    }
    print(f"random Llama hidden {args.hidden}, {args.layers} layers, vocab {tokenizer.vocab_size}")
    print(f"step time of the reference: {1000 / base:.2f} ms; {n} tokens, median of "
          f"{args.repeats} runs in turn")  # fmt: skip
    print(f"{'path':<18}{'tok/s':>8}{'vs generate_step':>18}{'paired':>9}")
    for name, tps in median.items():
        print(f"{name:<18}{tps:>8.1f}{tps / base:>17.3f}x{paired[name]:>8.3f}x")
    print(
        json.dumps(
            {
                "bench": "engine",
                "machine": platform.machine(),
                "blas": _blas.describe(),
                "hidden": args.hidden,
                "layers": args.layers,
                "max_tokens": n,
                "repeats": args.repeats,
                "step_ms": 1000 / base,
                "tok_s": median,
                "paired_ratio": paired,
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
