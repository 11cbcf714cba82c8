"""Continuous batching: elm's BatchGenerator vs mlx-lm's BatchGenerator, and a bare batched
forward pass, at 1, 4, 8 and 16 requests decoded together.

    python benchmarks/bench_batch.py                                  # SmolLM2-135M fp32
    python benchmarks/bench_batch.py --model /tmp/smollm2-fp32 --batches 1,8 --max-tokens 64

All in one process, on the same folder (`elm convert`; mlx-lm loads it with its own model
code), greedy, B different chat prompts per batch size. First each engine prefills its B
prompts until every request has its first token (timed apart: time to first tokens). Then the
decode steps run in turns, blocks of a few elm steps, mlx-lm steps and bare steps, so that all
three see the same machine load; decode tokens/s = B / the median step time of the blocks
while all B requests run.
`bare` is one batched forward pass + argmax over B aligned rows of a plain KV cache, no
engine: the ceiling. Aggregate tokens/s = the tokens generated up to the last full block /
(prefill + those blocks' time). Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import elm_mlx  # noqa: F401  (selects OpenBLAS before mlx loads)

# isort: split
import mlx.core as mx
from elm_mlx.convert import ConvertOptions, convert

from elm_mlx import _blas
from elm_mlx.engine.config import GenerationConfig
from elm_mlx.engine.reference import generation_stream
from elm_mlx.engine.scheduler import BatchGenerator, Request
from elm_mlx.loader import load
from elm_mlx.models import make_cache
from elm_mlx.tokenizer import render_chat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import smollm2

QUESTIONS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain in detail how a steam engine works.",
    "Describe the city of Paris for a first-time visitor.",
    "Tell me about the history of the Roman Empire.",
    "Write a recipe for sourdough bread, step by step.",
    "Explain how computers store numbers.",
    "Write a poem about the sea at night.",
    "Describe the life cycle of a butterfly.",
    "Give advice to someone learning to play the piano.",
    "Explain why the sky is blue.",
    "Write a letter to a friend about a trip to the mountains.",
    "Describe how bees make honey.",
    "Explain the rules of chess to a beginner.",
    "Write a short biography of a fictional inventor.",
    "Describe a walk through a forest in autumn.",
    "Explain how a bicycle stays upright.",
]


class Bare:
    """A bare batched decode step over B aligned rows at `context` positions."""

    def __init__(self, model, prompts: list[list[int]], context: int):
        self.model, self.cache = model, make_cache(model)
        mx.eval(model(mx.zeros((len(prompts), context), mx.uint32), cache=self.cache))
        self.y = mx.zeros((len(prompts), 1), mx.uint32)

    def step(self) -> int:
        self.y = mx.argmax(self.model(self.y, cache=self.cache)[:, -1, :], axis=-1)[:, None]
        mx.eval(self.y)
        return self.y.shape[0]


class Elm:
    def __init__(self, model, tokenizer, prompts: list[list[int]], max_tokens: int):
        self.gen = BatchGenerator(model, tokenizer, max_batch=len(prompts))
        config = GenerationConfig(max_tokens=max_tokens)
        self.ids = [self.gen.add(Request(p, config)) for p in prompts]

    def first_tokens(self) -> int:
        """Step until every request has a token; returns the tokens generated."""
        seen: set[int] = set()
        tokens = 0
        while len(seen) < len(self.ids):
            events = self.gen.step()
            seen |= {e.request_id for e in events}
            tokens += len(events)
        return tokens

    def step(self) -> int:
        return len(self.gen.step())


class MlxLm:
    def __init__(self, model, tokenizer, prompts: list[list[int]], max_tokens: int):
        from mlx_lm.generate import BatchGenerator as MlxLmBatchGenerator

        self.gen = MlxLmBatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids])
        self.ids = self.gen.insert(prompts, [max_tokens] * len(prompts))

    def first_tokens(self) -> int:
        seen: set[int] = set()
        tokens = 0
        while len(seen) < len(self.ids):
            responses = self.gen.next_generated()
            seen |= {r.uid for r in responses}
            tokens += len(responses)
        return tokens

    def step(self) -> int:
        return len(self.gen.next_generated())


def sync() -> None:
    """Wait for everything queued: elm's, mlx-lm's and the default stream."""
    from mlx_lm.generate import generation_stream as mlx_lm_stream

    for stream in (generation_stream(), mlx_lm_stream, mx.default_stream(mx.default_device())):
        mx.synchronize(stream)


def bench(engines: dict, batch: int, block: int) -> dict:
    """Prefill each engine, then time blocks of `block` steps of each in turn while all B
    requests run. A block starts and ends synchronised, so that no engine's work overlaps
    another's; within it, an engine that computes one step while preparing the next gains
    what it gains in use."""
    out: dict = {}
    for name, engine in engines.items():
        if name != "bare":
            sync()
            tic = time.perf_counter()
            out[f"{name}_tokens"] = engine.first_tokens()
            sync()
            out[f"{name}_first_tokens_s"] = time.perf_counter() - tic
    times: dict[str, list[float]] = {name: [] for name in engines}
    running = set(engines)
    while running - {"bare"}:
        for name in sorted(running):
            sync()
            tic = time.perf_counter()
            counts = [engines[name].step() for _ in range(block)]
            sync()
            seconds = time.perf_counter() - tic
            if name != "bare":
                if min(counts) < batch:  # a request has finished: no longer a full batch
                    running.discard(name)
                    continue
                out[f"{name}_tokens"] += sum(counts)
            times[name].append(seconds / block)
    for name, ts in times.items():
        out[f"{name}_decode_tps"] = batch / statistics.median(ts)
    for name in engines:
        if name != "bare":
            total = out[f"{name}_first_tokens_s"] + sum(times[name]) * block
            out[f"{name}_aggregate_tps"] = out[f"{name}_tokens"] / total
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, help="an elm-converted folder (default: SmolLM2 fp32)"
    )
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block", type=int, default=4, help="steps per timed block")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            src = smollm2.build_hf_folder(smollm2.default_cache_dir())
            options = ConvertOptions(dtype="float32")
            folder = convert(src, Path(tmp) / "smollm2-fp32", options, progress=False)
        model, tokenizer = load(folder)
        from mlx_lm import load as mlx_lm_load

        lm_model, lm_tokenizer = mlx_lm_load(str(folder))
        chats = [
            tokenizer.encode(render_chat(tokenizer, [{"role": "user", "content": q}], "llama"))
            for q in QUESTIONS
        ]
        rows = []
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = [chats[i % len(chats)] for i in range(batch)]
            context = sum(map(len, prompts)) // batch + args.max_tokens // 2
            engines = {
                "bare": Bare(model, prompts, context),
                "elm": Elm(model, tokenizer, prompts, args.max_tokens),
                "mlx_lm": MlxLm(lm_model, lm_tokenizer, prompts, args.max_tokens),
            }
            rows.append({"batch": batch, **bench(engines, batch, args.block)})
            print(rows[-1], file=sys.stderr)

    env = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.system()}, {mx.default_device()}",
        "blas": _blas.describe(),
        "mlx": mx.__version__,
        "max_tokens": args.max_tokens,
    }
    first = rows[0]
    print(f"# {env}")
    print(
        f"{'batch':>5s} | {'bare dec':>8s} {'x1':>5s} | {'elm dec':>8s} {'x1':>5s} {'of bare':>7s}"
        f" {'agg':>6s} {'ttft s':>6s} | {'mlx-lm dec':>10s} {'x1':>5s} {'agg':>6s} {'ttft s':>6s}"
    )
    for r in rows:
        print(
            f"{r['batch']:5d} | {r['bare_decode_tps']:8.1f} "
            f"{r['bare_decode_tps'] / first['bare_decode_tps']:5.2f} | "
            f"{r['elm_decode_tps']:8.1f} {r['elm_decode_tps'] / first['elm_decode_tps']:5.2f} "
            f"{r['elm_decode_tps'] / r['bare_decode_tps']:7.0%} {r['elm_aggregate_tps']:6.1f} "
            f"{r['elm_first_tokens_s']:6.1f} | {r['mlx_lm_decode_tps']:10.1f} "
            f"{r['mlx_lm_decode_tps'] / first['mlx_lm_decode_tps']:5.2f} "
            f"{r['mlx_lm_aggregate_tps']:6.1f} {r['mlx_lm_first_tokens_s']:6.1f}"
        )
    print(json.dumps({"env": env, "results": rows}))


if __name__ == "__main__":
    main()
