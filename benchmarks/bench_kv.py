"""Long contexts in bounded memory: elm's quantized and windowed KV caches vs mlx-lm's
(`--kv-bits`: QuantizedKVCache from the first token; `--max-kv-size`: RotatingKVCache keeping 4
sinks), on the real SmolLM2-135M-Instruct (context 8192), the same fp32 weights for both.

For each length (1k, 4k, 8k tokens of held-out text: the end of the standard library's pydoc
topics) and each setting, both engines prefill the text in chunks of --chunk tokens (every chunk
attends to the cache as generation would), then decode --decode tokens greedily. Reported:
prompt tokens/s and peak memory above the weights while prefilling, KV bytes after the prompt,
decode tokens/s and peak above the weights while decoding; then, in a second pass, perplexity
of the text's tokens predicted through that cache (chunks of --chunk; the first chunk's own
predictions included). mlx-lm cannot combine the two (RotatingKVCache.to_quantized raises).

    python benchmarks/bench_kv.py                        # 1k, 4k, 8k
    python benchmarks/bench_kv.py --lengths 1024 --decode 16
    python benchmarks/bench_kv.py --lengths 4096 --settings full kv8 --no-ppl
    python benchmarks/bench_kv.py --cache-file 2048     # time to the first token from a file

--cache-file N: the time to the first token of a prompt of N tokens plus a short question,
processed (`stream_generate`, no cache) and continued from a prompt cache file of the N tokens
(`elm cache-prompt`'s file: read from disk, then the question fed; the best of 3, the machine
being shared), for each engine (mlx-lm: `save_prompt_cache` / `load_prompt_cache`); the goal
is under 10% of the processed prompt's.

One run; prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
from elm_mlx.convert import ConvertOptions, convert

from elm_mlx.engine import prompt_file
from elm_mlx.engine.batch_kv import KVConfig, add_rows, make_batch_cache
from elm_mlx.engine.config import GenerationConfig
from elm_mlx.engine.generation import stream_generate
from elm_mlx.engine.prompt_cache import PromptCache
from elm_mlx.loader import load as elm_load
from elm_mlx.models import make_cache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import smollm2

SETTINGS = {  # name: (kv_bits, max_kv_size, recent tokens in full precision: None = default)
    "full": (None, None, None),
    "kv8": (8, None, None),
    "kv8-plain": (8, None, 0),
    "kv4": (4, None, None),
    "kv4-plain": (4, None, 0),
    "window": (None, 1024, None),
    "kv8+window": (8, 1024, None),
}


def model_folder(root: Path) -> Path:
    out = root / "smollm2-135m-instruct-fp32"
    if not (out / "config.json").exists():
        src = smollm2.build_hf_folder(smollm2.default_cache_dir())
        convert(src, out, ConvertOptions(dtype="float32"), progress=False)
    return out


def held_out_tokens(tokenizer, n: int) -> list[int]:
    from elm_mlx.quantize import default_text

    text = default_text()
    ids = tokenizer.encode(text[-len(text) // 3 :])
    if len(ids) < n:
        raise SystemExit(f"the held-out text has {len(ids)} tokens, fewer than {n}")
    return ids[-n:]


def elm_cache(model, bits, size, group, recent):
    kv = KVConfig(bits=bits, group_size=group, max_size=size, recent_tokens=recent)
    cache = make_batch_cache(model, kv)
    add_rows(cache, [make_cache(model)])
    return cache, lambda: None


def mlx_lm_cache(model, bits, size, group, recent, start=0):
    from mlx_lm.generate import maybe_quantize_kv_cache
    from mlx_lm.models.cache import make_prompt_cache

    if (bits is not None and size is not None) or recent == 0:
        return None, None  # not supported by mlx-lm (it has no full-precision window)
    cache = make_prompt_cache(model, max_kv_size=size)
    # as generate_step does after each chunk: quantized once past `start` positions (its
    # --quantized-kv-start; 0: from the first chunk)
    return cache, lambda: maybe_quantize_kv_cache(cache, start, group, bits)


def _nbytes(cache) -> int:
    return sum(c.nbytes for c in cache)


def _recent(setting, args) -> int:
    recent = setting[2]
    return args.kv_recent_tokens if recent is None else recent


def run(model, make: Callable, ids: list[int], setting, args) -> dict | None:
    bits, size, _ = setting
    cache, after_chunk = make(model, bits, size, args.group_size, _recent(setting, args))
    if cache is None:
        return None
    weights = mx.get_active_memory()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for start in range(0, len(ids), args.chunk):
        model(mx.array(ids[start : start + args.chunk], mx.uint32)[None], cache=cache)
        mx.eval([c.state for c in cache])
        after_chunk()
    prompt_s = time.perf_counter() - tic
    prompt_peak = mx.get_peak_memory() - weights
    kv_bytes = _nbytes(cache)
    mx.reset_peak_memory()
    token = mx.array([[ids[-1]]], mx.uint32)
    tic = time.perf_counter()
    for _ in range(args.decode):
        token = mx.argmax(model(token, cache=cache)[:, -1:], axis=-1).astype(mx.uint32)
        mx.eval(token)
        after_chunk()
    decode_s = time.perf_counter() - tic
    decode_peak = mx.get_peak_memory() - weights
    del cache
    mx.clear_cache()
    return {
        "prompt_tps": len(ids) / prompt_s,
        "prompt_peak_mb": prompt_peak / 2**20,
        "kv_mb": kv_bytes / 2**20,
        "decode_tps": args.decode / decode_s,
        "decode_peak_mb": decode_peak / 2**20,
        "ppl": perplexity(model, make, ids, setting, args) if args.ppl else float("nan"),
    }


def perplexity(model, make: Callable, ids: list[int], setting, args) -> float:
    bits, size, _ = setting
    cache, after_chunk = make(model, bits, size, args.group_size, _recent(setting, args))
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, args.chunk):
        chunk = ids[start : start + args.chunk]
        targets = mx.array(ids[start + 1 : start + 1 + len(chunk)])
        logits = model(mx.array(chunk, mx.uint32)[None], cache=cache)[0, : len(targets)]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll += -mx.take_along_axis(logprobs, targets[:, None], axis=-1).sum().item()
        count += len(targets)
        after_chunk()
    mx.clear_cache()
    return math.exp(nll / count)


REPEATS = 3  # loads from the file (cheap), the best kept


def _first(stream) -> tuple[float, int]:
    """(seconds to the first response of `stream`, its token); the stream is closed."""
    tic = time.perf_counter()
    first = next(iter(stream))
    seconds = time.perf_counter() - tic
    stream.close()
    return seconds, int(first.token)


def cache_file_ttft(model, tokenizer, theirs, ids: list[int], folder: Path, args) -> list[dict]:
    """Time to the first token: the prompt processed vs continued from a prompt cache file."""
    import tempfile

    question = tokenizer.encode(" What is this about?", add_special_tokens=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompt.safetensors"
        if "elm" in args.engines:
            config = GenerationConfig(max_tokens=1, prefill_step_size=args.chunk)
            _first(stream_generate(model, tokenizer, ids[: args.chunk], config))  # warm up
            full_s, token = _first(stream_generate(model, tokenizer, ids + question, config))
            tic = time.perf_counter()
            layers, _ = prompt_file.prefill(model, ids, chunk=args.chunk)
            prompt_file.save(path, ids, layers, folder.name, model)
            make_s = time.perf_counter() - tic
            del layers
            mx.clear_cache()
            file_s, same = math.inf, True
            for _ in range(REPEATS):
                tic = time.perf_counter()
                tokens, layers, _ = prompt_file.load(path, folder.name, model)
                cache = PromptCache()
                cache.insert(tokens, layers)
                prompt = tokens + question
                _, again = _first(stream_generate(model, tokenizer, prompt, config, cache))
                file_s, same = min(file_s, time.perf_counter() - tic), same and token == again
            rows.append(("elm", full_s, make_s, file_s, same))
        if "mlx-lm" in args.engines:
            import mlx_lm
            from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

            def first_token(prompt, cache=None):
                return mlx_lm.stream_generate(
                    theirs, tokenizer._tokenizer, prompt, max_tokens=1,
                    prompt_cache=cache, prefill_step_size=args.chunk,
                )  # fmt: skip

            _first(first_token(ids[: args.chunk]))  # warm up
            full_s, token = _first(first_token(ids + question))
            tic = time.perf_counter()
            cache = make_prompt_cache(theirs)
            for start in range(0, len(ids), args.chunk):
                theirs(mx.array(ids[start : start + args.chunk])[None], cache=cache)
                mx.eval([c.state for c in cache])
            save_prompt_cache(str(path), cache)
            make_s = time.perf_counter() - tic
            del cache
            mx.clear_cache()
            file_s, same = math.inf, True
            for _ in range(REPEATS):
                tic = time.perf_counter()
                cache = load_prompt_cache(str(path))
                _, again = _first(first_token(question, cache))
                file_s, same = min(file_s, time.perf_counter() - tic), same and token == again
            rows.append(("mlx-lm", full_s, make_s, file_s, same))
    out = []
    print(f"{'tokens':>6} {'engine':<7} {'processed s':>11} {'file made s':>11} "
          f"{'from file s':>11} {'ratio':>6} {'same token':>10}")  # fmt: skip
    for engine, full_s, make_s, file_s, same in rows:
        print(f"{len(ids):>6} {engine:<7} {full_s:>11.2f} {make_s:>11.2f} {file_s:>11.3f} "
              f"{file_s / full_s:>6.3f} {same!s:>10}")  # fmt: skip
        out.append({"tokens": len(ids), "engine": engine, "processed_s": full_s,
                    "file_made_s": make_s, "from_file_s": file_s, "ratio": file_s / full_s,
                    "same_first_token": same})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument(
        "--kv-recent-tokens",
        type=int,
        default=KVConfig.recent_tokens,
        help="elm: positions before each query read in full precision (the -plain settings: 0)",
    )
    parser.add_argument(
        "--mlx-lm-decode-only",
        action="store_true",
        help="mlx-lm: quantize the cache after the prompt (its --quantized-kv-start at the "
        "prompt's length), so its quantized decoding is timed without its slow quantized "
        "prompt (its prompt figures, memory and perplexity are then full-precision ones)",
    )
    parser.add_argument("--no-ppl", dest="ppl", action="store_false", help="skip perplexity")
    parser.add_argument(
        "--engines", nargs="+", default=["elm", "mlx-lm"], choices=["elm", "mlx-lm"]
    )
    parser.add_argument("--root", type=Path, default=smollm2.default_cache_dir().parent)
    parser.add_argument(
        "--cache-file", type=int, metavar="N", help="only time a prompt of N tokens from a file"
    )
    args = parser.parse_args(argv)

    import mlx_lm

    folder = model_folder(args.root)
    model, tokenizer = elm_load(folder)
    theirs = mlx_lm.load(str(folder))[0] if "mlx-lm" in args.engines else None
    info = {
        "machine": platform.machine(),
        "backend": "cpu" if not mx.metal.is_available() else "metal",
    }
    if args.cache_file:
        ids = held_out_tokens(tokenizer, args.cache_file)
        results = cache_file_ttft(model, tokenizer, theirs, ids, folder, args)
        print(json.dumps({"bench": "kv-cache-file", **info, "args": {k: str(v) for k, v in
                          vars(args).items()}, "results": results}))  # fmt: skip
        return 0
    results = []
    print(f"{'tokens':>6} {'setting':<11} {'engine':<7} {'prompt t/s':>10} {'prompt MB':>9} "
          f"{'KV MB':>7} {'decode t/s':>10} {'decode MB':>9} {'ppl':>8}")  # fmt: skip
    for n in args.lengths:
        ids = held_out_tokens(tokenizer, n)
        theirs_cache = mlx_lm_cache
        if args.mlx_lm_decode_only:
            theirs_cache = functools.partial(mlx_lm_cache, start=n - 1)
        for name in args.settings:
            for engine, m, make in (("elm", model, elm_cache), ("mlx-lm", theirs, theirs_cache)):
                if engine not in args.engines:
                    continue
                r = run(m, make, ids, SETTINGS[name], args)
                if r is None:
                    if not name.endswith("-plain"):  # (mlx-lm's kv8/kv4 rows are its plain ones)
                        print(f"{n:>6} {name:<11} {engine:<7} {'(not supported)':>10}")
                    continue
                results.append({"tokens": n, "setting": name, "engine": engine, **r})
                print(
                    f"{n:>6} {name:<11} {engine:<7} {r['prompt_tps']:>10.0f} "
                    f"{r['prompt_peak_mb']:>9.1f} {r['kv_mb']:>7.1f} {r['decode_tps']:>10.1f} "
                    f"{r['decode_peak_mb']:>9.1f} {r['ppl']:>8.3f}",
                    flush=True,
                )
    print(json.dumps({"bench": "kv", **info, "args": {k: str(v) for k, v in vars(args).items()},
                      "results": results}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
