"""`elm serve` against one abusive client: requests whose cost is bounded at the check, long
prompts tokenized off the event loop, slow senders (a bounded local slowloris), malformed HTTP,
bursts, shutdown, and the guards of a server on the user's own machine (Host, Content-Type,
CORS). A real server process on 127.0.0.1 (a free port), raw sockets and httpx; every loop
that waits is bounded in count and time; nothing is timed.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serving import TIMEOUT, Server, write_endless_model, write_serving_model

from elm_mlx import generate, load
from elm_mlx.engine.config import MAX_STOPS, GenerationConfig
from elm_mlx.server.client_rate import MAX_CLIENTS, MAX_DELAY, ClientRate
from elm_mlx.server.protocol import (
    MAX_JSON_DEPTH,
    PROBE_CHARS_PER_TOKEN,
    APIError,
    Served,
    chat_job,
    completion_job,
    longest_token_chars,
)
from elm_mlx.tokenizer import encode_prompt, render_chat

CONTEXT = 8192
ORIGIN = "http://app.example"
LIMITS = [
    "--max-batch", "8", "--max-queue", "8", "--header-timeout", "2", "--body-timeout", "2",
    "--max-connections", "128", "--prompt-cache-bytes", "0", "--allowed-hosts", "elm.test",
    "--allowed-origins", ORIGIN,
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_serving_model(tmp_path_factory.mktemp("guards") / "tiny-chatml", CONTEXT)


@pytest.fixture(scope="module")
def endless_dir(model_dir, tmp_path_factory) -> Path:
    return write_endless_model(model_dir, tmp_path_factory.mktemp("endless") / "tiny-endless")


@pytest.fixture(scope="module")
def server(endless_dir, tmp_path_factory):
    s = Server(endless_dir, tmp_path_factory.mktemp("log") / "guards.txt", *LIMITS)
    yield s
    code, out = s.stop(signal.SIGTERM)
    assert code == 0 and "elm serve: stopped" in out, s.log.read_text()


def post(server: Server, path: str, body: bytes | dict, headers: dict | None = None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=TIMEOUT)


def hi(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


def error_of(r: httpx.Response) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def raw_exchange(server: Server, data: bytes, timeout: float = 60) -> bytes:
    """Send raw bytes on a fresh connection; everything the server answers until it closes."""
    host, port = server.root.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    for _ in range(1000):
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def parse(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), response
    return int(head.split()[1]), json.loads(body)


# ------------------------------------------------------------------------------ bounded work

DEEP = b'{"messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
CHAT, TEXT = "/chat/completions", "/completions"
ABUSIVE = [
    (CHAT, hi(prompt_lookup=1_000_000_000), 400, "prompt_lookup"),
    (TEXT, {"prompt": "hi", "prompt_lookup": 65}, 400, "prompt_lookup"),
    (CHAT, hi(stop=[f"s{i}" for i in range(MAX_STOPS + 1)]), 400, "stop"),
    (CHAT, hi(stop=["x" * 10_000]), 400, "stop"),
    # a lone surrogate, which JSON can spell but no tokenizer takes
    (
        CHAT,
        b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
        400,
        "messages[0].content",
    ),
    (TEXT, b'{"prompt": "hi \\udfff there"}', 400, "prompt"),
    (CHAT, DEEP, 400, None),
    (CHAT, hi(response_format={"deep": json.loads("[" * 70 + "]" * 70)}), 400, None),
    (CHAT, hi(messages=[{"role": "tool", "content": "42"}]), 400, "messages[0].tool_call_id"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), ABUSIVE)
def test_abusive_requests_are_refused_at_the_check(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = error_of(r)
    assert error["param"] == param
    if param is None:
        assert error["code"] == "invalid_json" and str(MAX_JSON_DEPTH) in error["message"]
    assert "Traceback" not in r.text


def test_a_long_prompt_is_tokenized_off_the_event_loop(server, endless_dir):
    """While a long prompt is being checked and tokenized, /health answers (and says so); a
    prompt longer than the context can hold in any tokenization is refused before it."""
    tokenizer = load(endless_dir)[1]
    bound = CONTEXT * longest_token_chars(tokenizer)
    words = "the quick brown fox jumps over the lazy dog "
    long = (words * (bound // len(words)))[: bound - 10]  # over the context once tokenized
    seen_preparing = False
    with ThreadPoolExecutor(1) as pool:
        for _ in range(10):  # tries: the window is a tokenization's length
            answer = pool.submit(post, server, "/completions", {"prompt": long, "max_tokens": 1})
            for _ in range(2000):
                if server.health()["preparing"] > 0:
                    seen_preparing = True
                if seen_preparing or answer.done():
                    break
            r = answer.result(TIMEOUT)
            assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
            assert "characters" not in error_of(r)["message"]  # refused once tokenized
            if seen_preparing:
                break
    assert seen_preparing
    r = post(server, "/completions", {"prompt": "x" * (bound + 1)})
    error = error_of(r)
    assert r.status_code == 400 and error["code"] == "context_length_exceeded"
    assert "characters" in error["message"] and error["param"] == "prompt"


# ------------------------------------------------------------------------------ slow clients


def test_slow_senders_cannot_hold_the_server(server):
    """A bounded slowloris: 150 connections (the cap is 128) that send part of their headers
    and stall. The oldest give way to new connections, a normal client is answered, and those
    still open get a 408 in the error shape when their header deadline passes."""
    host, port = server.root.removeprefix("http://").split(":")
    slow = []
    for i in range(150):
        sock = socket.create_connection((host, int(port)), timeout=60)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow-" + str(i).encode()
        )
        slow.append(sock)
    r = post(server, "/completions", {"prompt": "hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"]
    answers = [read_all(sock) for sock in slow]  # each ends: closed for room, or timed out
    for sock in slow:
        sock.close()
    timed_out = [parse(a) for a in answers if a]
    assert len(timed_out) > 0 and len(timed_out) < len(answers)  # some closed to make room
    assert all(status == 408 and e["error"]["code"] == "request_timeout" for status, e in timed_out)
    assert server.health()["status"] == "ok"


def test_a_body_trickled_in_times_out(server):
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    status, body = parse(raw_exchange(server, head + b'{"prompt": "hi'))
    assert status == 408 and body["error"]["code"] == "request_timeout"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /health HTTP/1.1\r\n\r\n",  # no Host
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
        b"GET /he\x00alth HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: x\r\n\r\n",
    ],
)
def test_malformed_http_is_answered_in_the_error_shape(server, request_bytes):
    status, body = parse(raw_exchange(server, request_bytes))
    assert status == 400 and body["error"]["code"] == "invalid_http"


# ------------------------------------------------------------------------------ admission

ENDLESS = {"prompt": "hello there", "max_tokens": CONTEXT - 100, "stream": True}


def test_a_burst_fills_the_free_slots_then_the_queue(server):
    """--max-batch 8 --max-queue 8: of 100 requests at once, 16 are taken, 84 get 429."""
    release = threading.Event()
    statuses: list[int] = []
    lock = threading.Lock()

    def ask(_: int) -> None:
        with (
            httpx.Client(timeout=TIMEOUT) as http,
            http.stream("POST", f"{server.url}/completions", json=ENDLESS) as r,
        ):
            with lock:
                statuses.append(r.status_code)
            if r.status_code == 200:
                release.wait(TIMEOUT)  # hold the slot until every answer is in

    with ThreadPoolExecutor(100) as pool:
        futures = [pool.submit(ask, i) for i in range(100)]
        for _ in range(6000):
            with lock:
                if len(statuses) == 100:
                    break
            threading.Event().wait(0.05)
        release.set()
        for f in futures:
            f.result(TIMEOUT)
    assert sorted(statuses) == [200] * 16 + [429] * 84
    stats = server.wait_health(lambda s: s["active"] == 0 and s["queued"] == 0)
    assert stats["active"] == 0 and stats["queued"] == 0


def head_of(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """Read one response (status line, headers and the body its Content-Length says)."""
    data = b""
    for _ in range(1000):
        if b"\r\n\r\n" in data:
            head, _, body = data.partition(b"\r\n\r\n")
            headers = dict(line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:])
            if len(body) >= int(headers["content-length"]):
                return int(head.split()[1]), headers, json.loads(body)
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    raise AssertionError(data)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_a_body_over_the_limit_is_refused_before_it_is_read(server, path):
    """A body declared over --max-body-bytes (4 MiB) gets 413 in the route's error shape while
    the client has sent 1 KiB of its 1 GB: the server answers from Content-Length."""
    host, port = server.root.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10**9}\r\n\r\n".encode()
            + b'{"messages": "'
            + b"x" * 1024
        )
        status, _, body = head_of(sock)
    assert status == 413
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "request_too_large"
    else:
        assert body["error"]["code"] == "request_too_large"
    assert str(4 * 2**20) in (body["error"]["message"])
    assert server.health()["status"] == "ok"


@pytest.fixture(scope="module")
def limited(model_dir, tmp_path_factory):
    """A server where each client may send one request per 100 s (a burst of one)."""
    log = tmp_path_factory.mktemp("log") / "limited.txt"
    s = Server(model_dir, log, "--client-rate", "0.01", "--max-body-bytes", "65536")
    yield s
    s.stop(signal.SIGTERM)


def test_a_flooding_client_gets_429_while_another_is_served(limited):
    """--client-rate 0.01: of 20 requests at once from 127.0.0.2, one runs and 19 get 429
    with Retry-After in the route's error shape; 127.0.0.1 is still served, /health answers
    both."""
    flooder = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=flooder, timeout=TIMEOUT) as http:

        def ask(_: int) -> httpx.Response:
            return http.post(f"{limited.url}/chat/completions", json=hi())

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(ask, range(20)))
        assert sorted(r.status_code for r in answers) == [200] + [429] * 19
        for r in answers:
            if r.status_code == 429:
                error = error_of(r)
                assert error["code"] == "rate_limit_exceeded" and "127.0.0.2" in error["message"]
                # 100 s for the request that ran, plus its body's bytes (/ 16 KiB x 100 s)
                assert 1 <= int(r.headers["retry-after"]) <= 102
        r = http.post(f"{limited.url}/messages", json={**hi(), "model": "default"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert http.get(f"{limited.root}/health").status_code == 200
    r = post(limited, "/chat/completions", hi())  # another client
    assert r.status_code == 200 and r.json()["choices"]
    assert limited.health()["status"] == "ok"


def test_the_rate_limit_holds_then_refuses_and_charges_bodies():
    """GCRA at 10 a second, bursts of 2 (0.2 s ahead), requests held up to MAX_DELAY: the
    admissions and waits that the cell rate formula gives, on a clock that does not move."""
    now = [0.0]
    rate = ClientRate(10, 2, clock=lambda: now[0])
    assert [rate.admit("a") for _ in range(2)] == [(True, 0.0), (True, 0.0)]
    held = [rate.admit("a") for _ in range(10)]  # due 0.3 ... 1.2: held 0.1 ... 1.0 s
    assert all(ok for ok, _ in held)
    assert [round(wait, 6) for _, wait in held] == [round(0.1 * i, 6) for i in range(1, 11)]
    assert held[-1][1] == pytest.approx(MAX_DELAY)
    ok, wait = rate.admit("a")
    assert not ok and wait == pytest.approx(1.1)
    assert rate.admit("b") == (True, 0.0)  # another client
    now[0] = 1.2  # a owes nothing more than its burst now
    assert rate.admit("a") == (True, 0.0)
    rate.charge("a", 3)  # a body of three units (3 x UNIT_BYTES): 0.3 s more
    ok, wait = rate.admit("a")
    assert ok and wait == pytest.approx(1.2 + 0.1 + 0.3 + 0.1 - 1.2 - 0.2)
    for i in range(MAX_CLIENTS):  # then the clients that owe nothing are forgotten
        rate.admit(f"c{i}")
    now[0] = 100.0
    assert rate.admit("new") == (True, 0.0) and set(rate.due) == {"new"}


def test_tool_messages_and_no_prompt_cache(server, endless_dir):
    model, tokenizer = load(endless_dir)
    messages = [
        {"role": "user", "content": "what is 6 times 7?"},
        {"role": "assistant", "content": "calling the calculator"},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    expected = encode_prompt(tokenizer, render_chat(tokenizer, messages, model.model_type))
    for _ in range(2):
        r = post(server, "/chat/completions", {"messages": messages, "max_tokens": 3})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] == len(expected)
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0  # --prompt-cache-bytes 0
    stats = server.health()
    assert stats["prompt_cache_entries"] == 0 and stats["prompt_cache_bytes"] == 0


def test_tool_results_become_user_turns_for_templates_without_the_role(endless_dir):
    model, tokenizer = load(endless_dir)
    strict = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    )
    served = Served(
        model_id="m",
        tokenizer=tokenizer,
        model_type=model.model_type,
        context_length=CONTEXT,
        vocab_size=300,
        defaults=GenerationConfig(),
        template=strict,
    )
    body = {"messages": [{"role": "tool", "tool_call_id": "call_9", "content": "42"}]}
    job = chat_job(body, served)
    want = "user: Result of tool call call_9:\n42\nassistant:"
    assert job.prompt == encode_prompt(tokenizer, want)


def test_a_prompt_over_the_context_is_refused_from_its_start(endless_dir):
    """A prompt longer than context x PROBE_CHARS_PER_TOKEN characters whose start already
    makes more tokens than the context holds is refused without tokenizing the rest; the
    whole prompt, tokenized, is indeed over the context."""
    model, tokenizer = load(endless_dir)
    context = 64
    served = Served("m", tokenizer, model.model_type, context, 300, GenerationConfig())
    text = "hello there " * (context * PROBE_CHARS_PER_TOKEN // 6)
    assert len(text) > context * PROBE_CHARS_PER_TOKEN
    with pytest.raises(APIError) as e:
        completion_job({"prompt": text}, served)
    error = e.value.body()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    some = int(error["message"].split("over ")[1].split()[0])
    assert context < some <= len(encode_prompt(tokenizer, text))
    short = completion_job({"prompt": "hello there"}, served)  # a short one still runs
    assert short.prompt == encode_prompt(tokenizer, "hello there")


def test_a_long_prompt_beside_a_stream_is_exact_under_a_small_prefill_share(endless_dir, tmp_path):
    """`--prefill-share 0.1`: a prompt of over 1,000 tokens sent while another request
    streams is prefilled in small chunks beside it and answered while that one still streams;
    both answers are those `generate` gives alone. `--prefill-share 0` is refused before
    anything loads."""
    model, tokenizer = load(endless_dir)
    long_text = " ".join(f"w{i % 97}" for i in range(600))
    assert len(encode_prompt(tokenizer, long_text)) > 1000
    s = Server(
        endless_dir, tmp_path / "share.txt", "--prefill-share", "0.1", "--prompt-cache-bytes", "0"
    )
    streamed, events = "", 0
    try:
        with ThreadPoolExecutor(1) as pool:
            body = {"prompt": "hi", "max_tokens": 8000, "stream": True}
            with httpx.stream("POST", f"{s.url}{TEXT}", json=body, timeout=TIMEOUT) as r:
                lines = r.iter_lines()
                long = None
                for line in lines:  # the endless request runs past the long one's answer
                    if not line.startswith("data: {"):
                        continue
                    streamed += json.loads(line.removeprefix("data: "))["choices"][0]["text"]
                    events += 1
                    if long is None:
                        long = pool.submit(post, s, TEXT, {"prompt": long_text, "max_tokens": 5})
                    elif long.done():
                        break
                assert events < 8000  # it did not finish first
            answer = long.result(TIMEOUT)
    finally:
        s.stop(signal.SIGTERM)
    assert answer.status_code == 200, answer.text
    want = generate(model, tokenizer, long_text, GenerationConfig(max_tokens=5))
    assert answer.json()["choices"][0]["text"] == want
    # (a chunk may carry several tokens' text: compare what both have)
    full = generate(model, tokenizer, "hi", GenerationConfig(max_tokens=events))
    assert streamed and full[: len(streamed)] == streamed[: len(full)]
    serve = [sys.executable, "-m", "elm_mlx.cli.main", "serve"]
    bad = subprocess.run(
        [*serve, "-m", str(tmp_path / "none"), "--prefill-share", "0"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert bad.returncode == 1 and "--prefill-share must be > 0" in bad.stderr, bad.stderr


# ------------------------------------------------------------------------------ local guards


def test_foreign_host_is_refused(server):
    port = server.root.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "192.168.1.7"):
        r = httpx.get(f"{server.root}/health", headers={"Host": host}, timeout=TIMEOUT)
        assert r.status_code == 403 and error_of(r)["code"] == "host_not_allowed"
        r = post(server, "/completions", {"prompt": "hi"}, {"Host": host})
        assert r.status_code == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", f"elm.test:{port}"):
        r = httpx.get(f"{server.root}/health", headers={"Host": host}, timeout=TIMEOUT)
        assert r.status_code == 200, (host, r.text)


def test_bodies_must_be_json(server):
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": kind} if kind else {}
        r = httpx.post(
            f"{server.url}/completions",
            content=json.dumps({"prompt": "hi", "max_tokens": 1}).encode(),
            headers=headers,
            timeout=TIMEOUT,
        )
        assert r.status_code == 415 and error_of(r)["code"] == "unsupported_media_type"
    r = post(server, "/completions", {"prompt": "hi", "max_tokens": 1},
             {"Content-Type": "application/json; charset=utf-8"})  # fmt: skip
    assert r.status_code == 200


def test_cors_only_for_allowed_origins(server):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}  # fmt: skip
    r = httpx.options(f"{server.url}/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.options(
        f"{server.url}/chat/completions", headers={"Origin": "http://evil.example", **preflight}
    )
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = post(server, "/completions", {"prompt": "hi", "max_tokens": 1}, {"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN


def test_no_cors_by_default(model_dir, tmp_path):
    s = Server(model_dir, tmp_path / "serve.txt", "--graceful-seconds", "600")
    try:
        preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
        r = httpx.options(f"{s.url}/chat/completions", headers=preflight, timeout=TIMEOUT)
        assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
        r = post(s, "/completions", {"prompt": "hi", "max_tokens": 1}, {"Origin": ORIGIN})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        # an idle keep-alive connection does not hold the stop: with nothing in flight the
        # server exits long before its 600 s grace
        with httpx.Client(timeout=TIMEOUT) as http:
            assert http.get(f"{s.root}/health").status_code == 200
            s.proc.send_signal(signal.SIGTERM)
            out, _ = s.proc.communicate(timeout=120)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
    assert s.proc.returncode == 0 and "elm serve: stopped" in out, s.log.read_text()


# ------------------------------------------------------------------------------ shutdown


def test_stop_drains_then_exits(endless_dir, tmp_path):
    """SIGTERM with a request in flight: new requests get 503 (not a refused connection) and
    /health says draining; once the running request ends, the process exits (its 600 s grace
    unused)."""
    s = Server(endless_dir, tmp_path / "serve.txt", "--graceful-seconds", "600")
    try:
        with (
            httpx.Client(timeout=TIMEOUT) as http,
            http.stream("POST", f"{s.url}/completions", json=ENDLESS) as running,
        ):
            lines = running.iter_lines()
            next(lines)  # it runs
            s.proc.send_signal(signal.SIGTERM)
            health = s.wait_health(lambda h: h["status"] == "draining")
            assert health["status"] == "draining" and health["active"] == 1
            r = post(s, "/completions", {"prompt": "hi", "max_tokens": 1})
            assert r.status_code == 503 and error_of(r)["type"] == "server_error"
            assert s.proc.poll() is None  # still serving the running request
        out, _ = s.proc.communicate(timeout=120)  # the client left: nothing runs
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
    assert s.proc.returncode == 0 and "elm serve: stopped" in out, s.log.read_text()


NEW_ROUTES = [
    ("/responses", {"input": "hi", "max_output_tokens": 1}),
    ("/messages", {"max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}),
    ("/messages/count_tokens", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/embeddings", {"input": "hi"}),
]


@pytest.mark.parametrize(("path", "body"), NEW_ROUTES)
def test_every_new_route_is_guarded(server, path, body):
    """Host, Content-Type, CORS and deep JSON on the routes of issue 19, in each API's shape."""
    anthropic_route = path.startswith("/messages")

    def error(r: httpx.Response) -> dict:
        if anthropic_route:
            assert r.json()["type"] == "error", r.text
            return r.json()["error"]
        return error_of(r)

    r = post(server, path, body, {"Host": "evil.example"})
    assert r.status_code == 403, r.text
    assert error(r)["type"] == ("permission_error" if anthropic_route else "invalid_request_error")
    r = httpx.post(f"{server.url}{path}", content=json.dumps(body), timeout=TIMEOUT,
                   headers={"Content-Type": "text/plain"})  # fmt: skip
    assert r.status_code == 415 and error(r)["message"]
    deep = b'{"input": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    r = post(server, path, deep)
    assert r.status_code == 400 and "deep" in error(r)["message"], r.text
    r = post(server, path, b'{"input": "' + b"x" * (5 * 2**20) + b'"}')
    assert r.status_code == 413, r.text
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, x-api-key, anthropic-version"}  # fmt: skip
    r = httpx.options(f"{server.url}{path}", headers=preflight, timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = post(server, path, body, {"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN, r.text
