"""The one engine's overhead: `stream_generate` (a batch of one on the scheduler) against the
reference loop `generate_step` (mlx-lm's shape: one forward pass per token, the next step
queued while Python handles the last token), on a random Llama sized so that one decode step
takes 3-5 ms on this CPU, which is OpenELM-270M's step on an M2: there Python's overhead per
step is what matters.

    python benchmarks/bench_engine.py --hidden 128 --layers 4 --repeats 5   # a ~5 ms step
    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_engine.py --hidden 64 --layers 8 --repeats 7
    # (the host on a core of its own, as beside a GPU; the step spread over 8 layers)
    python benchmarks/bench_engine.py --chunk 256                           # whole runs in turn

Greedy, the same prompt, 256 new tokens, EOS ignored. The paths alternate: all of them run at
once, each advanced `--chunk` tokens in turn (the order turning every chunk), and a path's
tokens/s is its tokens over the time of its own chunks, so that all see the same machine load
even when it drifts within a run (on a shared 2-core VM single runs swing +-15%, and whole runs
in turn, `--chunk 256`, leave ratios about that noisy). A second reference path is the control:
its ratio to the first shows what the method cannot resolve. Per path the median over
`--repeats`. The prompt-lookup row measures speculation's cost where it does not pay (a random
model's text rarely repeats): the adaptive proposal length should keep it near the plain
engine. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
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


def paths(model: Model, tokenizer, prompt: list[int], n: int) -> dict[str, Callable[[], Iterator]]:
    """Each path as a function giving a fresh generator of n tokens after a first one."""

    def reference() -> Iterator:
        return generate_step(mx.array(prompt, mx.uint32), model, max_tokens=n + 1)

    def engine(lookup: int | None) -> Iterator:
        config = GenerationConfig(max_tokens=n + 1, prompt_lookup=lookup)
        return stream_generate(model, tokenizer, prompt, config)

    return {
        "generate_step": reference,
        "generate_step (control)": reference,
        "engine": lambda: engine(None),
        "engine + lookup": lambda: engine(10),
    }


def interleaved(makers: dict[str, Callable[[], Iterator]], n: int, chunk: int) -> dict[str, float]:
    """Tokens/s of each path over n tokens, all advanced `chunk` tokens in turn (the order
    turning every chunk), each timed over its own chunks."""
    gens = {name: make() for name, make in makers.items()}
    for gen in gens.values():
        next(gen)  # the prompt's pass and the first token are not decode steps
    seconds = dict.fromkeys(gens, 0.0)
    names = list(gens)
    for c in range(-(-n // chunk)):
        take = min(chunk, n - c * chunk)
        for name in names[c % len(names) :] + names[: c % len(names)]:
            tic = time.perf_counter()
            for _ in range(take):
                next(gens[name])
            seconds[name] += time.perf_counter() - tic
    return {name: n / s for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=16, help="tokens a path runs per turn")
    args = parser.parse_args()

    tokenizer = load_tokenizer(smollm2.build_hf_folder(smollm2.default_cache_dir()))
    tokenizer.eos_token_ids = set()  # a random model: run the full length
    model = random_llama(args.hidden, args.layers, tokenizer.vocab_size)
    prompt = tokenizer.encode("Summarise the following text in one sentence: " * 4)
    n = args.max_tokens
    makers = paths(model, tokenizer, prompt, n)
    interleaved(makers, 32, args.chunk)  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(args.repeats):
        for name, tps in interleaved(makers, n, args.chunk).items():
            runs[name].append(tps)
    median = {k: statistics.median(v) for k, v in runs.items()}
    base = median["generate_step"]
    # per repeat, each path against the reference beside it
    paired = {
        k: statistics.median(a / b for a, b in zip(v, runs["generate_step"], strict=True))
        for k, v in runs.items()
    }
    print(f"random Llama hidden {args.hidden}, {args.layers} layers, vocab {tokenizer.vocab_size}")
    print(f"step time of the reference: {1000 / base:.2f} ms; {n} tokens in turns of "
          f"{args.chunk}, median of {args.repeats} repeats")  # fmt: skip
    print(f"{'path':<25}{'tok/s':>8}{'vs generate_step':>18}{'paired':>9}")
    for name, tps in median.items():
        print(f"{name:<25}{tps:>8.1f}{tps / base:>17.3f}x{paired[name]:>8.3f}x")
    print(
        json.dumps(
            {
                "bench": "engine",
                "machine": platform.machine(),
                "blas": _blas.describe(),
                "hidden": args.hidden,
                "layers": args.layers,
                "max_tokens": n,
                "chunk": args.chunk,
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
