"""`elm serve` as clients use it: a real server process on 127.0.0.1 (on a free port it picks
itself, --port 0) talked to with the official `openai` client and with raw httpx.

The model is a tiny random Llama with SmolLM2's layout (ChatML template, byte-level BPE,
`<|im_end|>` as EOS; tests/tiny_models.py); the oracle for every greedy answer is
`elm_mlx.generate` on the same folder in this process. The real SmolLM2 answers "Paris".
Every loop that waits on the server is bounded in count and time; nothing is timed.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import httpx
import mlx.core as mx
import openai
import pytest
from serving import (
    STARTUP,
    TIMEOUT,
    Server,
    smollm2_8bit,
    write_endless_model,
    write_serving_model,
)
from tiny_tokenizers import CHAT_CORPUS

from elm_mlx import generate, load
from elm_mlx.server.options import is_loopback
from elm_mlx.tokenizer import encode_prompt, render_chat

CONTEXT = 8192
KEY = "sesame"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_serving_model(tmp_path_factory.mktemp("serve") / "tiny-chatml", CONTEXT)


@pytest.fixture(scope="module")
def local(model_dir):
    """(model, tokenizer) in this process: the oracle."""
    return load(model_dir)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "serve.txt")
    yield s
    code, out = s.stop(signal.SIGTERM)
    assert code == 0 and "elm serve: stopped" in out, s.log.read_text()


def solo(local, prompt: str | list[int], max_tokens: int) -> str:
    model, tokenizer = local
    return generate(model, tokenizer, prompt, max_tokens=max_tokens)


def chat_prompt(local, messages: list[dict]) -> list[int]:
    model, tokenizer = local
    return encode_prompt(tokenizer, render_chat(tokenizer, messages, model.model_type))


QUESTION = [{"role": "user", "content": "tell me about the weather in paris and rome"}]


# ------------------------------------------------------------------------------ basics


def test_models_and_health(server, model_dir):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [model_dir.name]
    assert client.models.retrieve("default").id == model_dir.name
    stats = server.health()
    assert stats["status"] == "ok" and stats["model"] == model_dir.name
    assert stats["active"] == 0 and stats["queued"] == 0


def test_chat_whole_and_streamed_equal_solo_generation(server, local, model_dir):
    client = server.client()
    expected = solo(local, chat_prompt(local, QUESTION), 12)
    r = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=12)
    assert r.object == "chat.completion" and r.model == model_dir.name
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(chat_prompt(local, QUESTION))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 12 else "stop")

    chunks = list(
        client.chat.completions.create(
            model=model_dir.name,
            messages=QUESTION,
            max_completion_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == r.choices[0].finish_reason and not any(finishes[:-1])
    assert (
        chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    )
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_whole_and_streamed(server, local):
    client = server.client()
    prompt = "the quick brown fox jumps over"
    expected = solo(local, prompt, 10)
    r = client.completions.create(model="default", prompt=prompt, max_tokens=10)
    assert r.object == "text_completion" and r.choices[0].text == expected
    assert r.usage.prompt_tokens == len(encode_prompt(local[1], prompt))
    chunks = list(
        client.completions.create(model="default", prompt=prompt, max_tokens=10, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # a prompt of token ids is taken as it is
    ids = encode_prompt(local[1], "my name is alice")
    r = client.completions.create(model="default", prompt=ids, max_tokens=7)
    assert r.choices[0].text == solo(local, ids, 7) and r.usage.prompt_tokens == len(ids)


def test_max_tokens_and_stop_strings(server, local):
    client = server.client()
    prompt = "hello there, how are you"
    full = solo(local, prompt, 16)
    r = client.completions.create(model="default", prompt=prompt, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    r = client.completions.create(model="default", prompt=prompt, max_tokens=16, stop=[stop, "zzz"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    chunks = list(
        client.completions.create(
            model="default", prompt=prompt, max_tokens=16, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]


def test_logprobs_match_the_model(server, local):
    model, tokenizer = local
    client = server.client()
    prompt = chat_prompt(local, QUESTION)
    logits = model(mx.array(prompt)[None])[0, -1]  # (V,)
    expected = logits - mx.logsumexp(logits)
    best = mx.argsort(-expected)[:3].tolist()

    r = client.chat.completions.create(
        model="default", messages=QUESTION, max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    first = content[0]
    assert first.token == tokenizer.decode([best[0]]) and first.bytes == list(first.token.encode())
    assert first.logprob == pytest.approx(expected[best[0]].item(), abs=1e-4)
    assert [t.token for t in first.top_logprobs] == [tokenizer.decode([t]) for t in best]
    for t, want in zip(first.top_logprobs, best, strict=True):
        assert t.logprob == pytest.approx(expected[want].item(), abs=1e-4)

    r = client.completions.create(model="default", prompt=prompt, max_tokens=4, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.tokens[0] == tokenizer.decode([best[0]])
    assert lp.token_logprobs[0] == pytest.approx(expected[best[0]].item(), abs=1e-4)
    assert list(lp.top_logprobs[0]) == [tokenizer.decode([t]) for t in best[:2]]
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    # the tokens' bytes spell the answer, also where a token holds part of a character
    r = client.chat.completions.create(
        model="default", messages=QUESTION, max_tokens=16, logprobs=True
    )
    assert r.choices[0].finish_reason == "length"  # no EOS token to spell
    spelled = b"".join(bytes(t.bytes) for t in r.choices[0].logprobs.content)
    assert "\ufffd" in r.choices[0].message.content  # this answer splits characters
    assert spelled.decode("utf-8", "replace") == r.choices[0].message.content
    # asked for none: none
    r = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=2)
    assert r.choices[0].logprobs is None


def test_seed_and_prompt_lookup_fields(server, local):
    model, tokenizer = local
    client = server.client()
    prompt = "the quick brown fox jumps over the lazy dog, the quick brown fox"
    sampled = [
        client.completions.create(
            model="default", prompt=prompt, max_tokens=12, temperature=0.9, seed=7
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    want = generate(model, tokenizer, prompt, max_tokens=12, temperature=0.9, seed=7)
    assert sampled == [want, want]
    # prompt lookup (an extra field) speculates and still gives the greedy answer
    r = client.completions.create(
        model="default", prompt=prompt, max_tokens=12, extra_body={"prompt_lookup": 3, "top_k": 5}
    )
    assert r.choices[0].text == solo(local, prompt, 12)


# ------------------------------------------------------------------------------ many requests


def test_sixteen_concurrent_greedy_requests_equal_their_solo_outputs(server, local):

    jobs = [
        (" ".join(CHAT_CORPUS[i % len(CHAT_CORPUS)].split()[: 2 + i % 7]), 4 + (5 * i) % 29)
        for i in range(16)
    ]
    expected = [solo(local, p, n) for p, n in jobs]

    def ask(job: tuple[str, int]) -> str:
        prompt, n = job
        return (
            server.client()
            .completions.create(model="default", prompt=prompt, max_tokens=n)
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == expected
    stats = server.wait_health(lambda s: s["active"] == 0)
    assert stats["active"] == 0 and stats["queued"] == 0


def test_prompt_cache_over_a_five_turn_conversation(server, local):
    client = server.client()
    messages: list[dict] = []
    cached, prompts = [], []
    for question in [
        "hello there",
        "what can I do for you?",
        "my name is alice",
        "remember banana",
        "which word?",
    ]:
        messages.append({"role": "user", "content": question})
        r = client.chat.completions.create(model="default", messages=messages, max_tokens=8)
        answer = r.choices[0].message.content
        assert answer == solo(local, chat_prompt(local, messages), 8)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        prompts.append(r.usage.prompt_tokens)
        messages.append({"role": "assistant", "content": answer})
    assert all(b > a for a, b in itertools.pairwise(cached)), cached
    # each turn reuses at least the whole previous prompt
    assert all(c >= p for c, p in zip(cached[1:], prompts, strict=False)), (cached, prompts)


# ------------------------------------------------------------------------------ errors


def post(
    server: Server, path: str, body: bytes | dict, headers: dict | None = None
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=TIMEOUT)


def ask_chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


LONG_IDS = [5] * (CONTEXT + 1)
BAD = [
    ("/chat/completions", b"{not json", 400, None, "invalid_json"),
    ("/chat/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("/chat/completions", {"max_tokens": 2}, 400, "messages", None),
    ("/chat/completions", {"messages": []}, 400, "messages", None),
    ("/chat/completions", {"messages": "hi"}, 400, "messages", None),
    (
        "/chat/completions",
        {"messages": [{"role": "robot", "content": "hi"}]},
        400,
        "messages[0].role",
        None,
    ),
    (
        "/chat/completions",
        {"messages": [{"role": "user", "content": 3}]},
        400,
        "messages[0].content",
        None,
    ),
    ("/chat/completions", ask_chat(max_tokens="2"), 400, "max_tokens", None),
    ("/chat/completions", ask_chat(max_tokens=0), 400, "max_tokens", None),
    ("/chat/completions", ask_chat(max_completion_tokens=-1), 400, "max_completion_tokens", None),
    ("/chat/completions", ask_chat(temperature=-0.5), 400, "temperature", None),
    ("/chat/completions", ask_chat(top_p=0), 400, "top_p", None),
    ("/chat/completions", ask_chat(stream="yes"), 400, "stream", None),
    ("/chat/completions", ask_chat(stop=[1, 2]), 400, "stop", None),
    ("/chat/completions", ask_chat(n=2), 400, "n", None),
    ("/chat/completions", ask_chat(top_logprobs=2), 400, "top_logprobs", None),
    ("/chat/completions", ask_chat(top_k=-1), 400, "top_k", None),
    ("/chat/completions", ask_chat(prompt_lookup=-1), 400, "prompt_lookup", None),
    ("/chat/completions", ask_chat(model="gpt-4o"), 404, "model", "model_not_found"),
    (
        "/completions",
        {"prompt": LONG_IDS, "max_tokens": 1},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    ("/completions", {"prompt": [1, 10**9]}, 400, "prompt", None),
    ("/completions", {"prompt": ""}, 400, "prompt", None),
    ("/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("/completions", {"prompt": "hi", "echo": True}, 400, "echo", None),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), BAD)
def test_bad_requests_get_openai_errors(server, path, body, status, param, code):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code and error["message"]
    assert "Traceback" not in r.text


def test_official_client_raises_its_own_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="default", messages=QUESTION, n=3)


def test_oversized_body_unknown_route_and_method(server):
    r = post(server, "/completions", json.dumps({"prompt": "x" * (5 * 2**20)}).encode())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(f"{server.url}/nowhere", timeout=TIMEOUT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server.url}/chat/completions", timeout=TIMEOUT)
    assert r.status_code == 405 and "error" in r.json()
    # after all of that the worker still answers
    assert server.client().completions.create(model="default", prompt="hi", max_tokens=2).choices


# ------------------------------------------------------------------------------ guarded server


@pytest.fixture(scope="module")
def endless_dir(model_dir, tmp_path_factory) -> Path:
    """The tiny model with its EOS id outside its vocabulary: a request runs to max_tokens
    (thousands of tokens), so it is still running whenever a test acts on it."""
    return write_endless_model(model_dir, tmp_path_factory.mktemp("endless") / "tiny-endless")


@pytest.fixture(scope="module")
def guarded(endless_dir, tmp_path_factory):
    """An API key (from ELM_API_KEY) and room for one request running and one waiting."""
    log = tmp_path_factory.mktemp("log") / "guarded.txt"
    s = Server(endless_dir, log, "--max-batch", "1", "--max-queue", "1", env={"ELM_API_KEY": KEY})
    yield s
    s.stop(signal.SIGTERM)


AUTH = {"Authorization": f"Bearer {KEY}"}
ENDLESS = {"prompt": "hello there", "max_tokens": CONTEXT - 100, "stream": True}


def test_api_key_is_required(guarded):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = post(guarded, "/chat/completions", ask_chat(), headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{guarded.url}/models", timeout=TIMEOUT).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        guarded.client("wrong").models.list()
    r = guarded.client(KEY).chat.completions.create(
        model="default", messages=QUESTION, max_tokens=2
    )
    assert r.choices[0].message.content is not None
    assert guarded.health()["status"] == "ok"  # health needs no key
    # Anthropic's header is accepted like the bearer key, and refusals are in its shape there
    assert post(guarded, "/chat/completions", ask_chat(), {"x-api-key": KEY}).status_code == 200
    hi = {"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    r = post(guarded, "/messages", hi, {"x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    claude = anthropic.Anthropic(base_url=guarded.root, api_key=KEY, max_retries=0)
    assert claude.messages.create(model="default", **hi).usage.output_tokens == 2
    assert httpx.get(f"{guarded.root}/metrics", timeout=TIMEOUT).status_code == 401


def test_client_leaving_mid_stream_frees_its_slot(guarded):
    before = guarded.health()["cancelled"]
    with (
        httpx.Client(timeout=TIMEOUT, headers=AUTH) as http,
        http.stream("POST", f"{guarded.url}/completions", json=ENDLESS) as r,
    ):
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break
    stats = guarded.wait_health(lambda s: s["active"] == 0)
    assert stats["active"] == 0 and stats["cancelled"] == before + 1
    # the one slot is free: the next request runs
    r = guarded.client(KEY).completions.create(model="default", prompt="hi", max_tokens=5)
    assert r.choices[0].finish_reason == "length"


def test_client_leaving_a_whole_answer_frees_its_slot(guarded):
    before = guarded.health()["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{guarded.url}/completions",
            json={**ENDLESS, "stream": False},
            headers=AUTH,
            timeout=httpx.Timeout(TIMEOUT, read=0.5),
        )
    stats = guarded.wait_health(lambda s: s["active"] == 0 and s["cancelled"] > before)
    assert stats["active"] == 0 and stats["cancelled"] == before + 1


def test_full_queue_is_refused_with_429(guarded):
    url = f"{guarded.url}/completions"
    with (
        httpx.Client(timeout=TIMEOUT, headers=AUTH) as http,
        http.stream("POST", url, json=ENDLESS) as running,
    ):
        lines = running.iter_lines()  # kept: dropping the iterator closes the response
        next(lines)  # it runs
        with http.stream("POST", url, json=ENDLESS) as waiting:
            assert waiting.status_code == 200  # a stream starts before its request runs
            stats = guarded.wait_health(lambda s: s["queued"] == 1)
            assert stats["active"] == 1 and stats["queued"] == 1
            r = post(guarded, "/completions", {"prompt": "hi", "max_tokens": 2}, AUTH)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert r.headers["Retry-After"]
    stats = guarded.wait_health(lambda s: s["active"] == 0 and s["queued"] == 0)
    assert stats["active"] == 0 and stats["queued"] == 0
    r = post(guarded, "/completions", {"prompt": "hi", "max_tokens": 2}, AUTH)
    assert r.status_code == 200


# ------------------------------------------------------------------------------ process


def test_draft_model_then_ctrl_c_stops_cleanly(model_dir, local, tmp_path):
    # the model as its own draft: every proposal is accepted, the answer is the greedy one
    s = Server(model_dir, tmp_path / "serve.txt", "--draft-model", str(model_dir))
    r = s.client().completions.create(model="default", prompt="hello there", max_tokens=9)
    assert r.choices[0].text == solo(local, "hello there", 9)
    code, out = s.stop(signal.SIGINT)
    assert code == 0 and out.strip() == "elm serve: stopped", s.log.read_text()
    assert "Traceback" not in s.log.read_text()


def test_prompt_cache_dir_outlives_a_restart(model_dir, local, tmp_path):
    """--prompt-cache-dir: a conversation's KV written by one server is reused by the next (its
    prompt counted as cached), with the same answer."""
    folder = tmp_path / "prompts"
    first = Server(model_dir, tmp_path / "a.txt", "--prompt-cache-dir", str(folder))
    r = first.client().chat.completions.create(model="default", messages=QUESTION, max_tokens=8)
    answer = r.choices[0].message.content
    assert first.stop(signal.SIGINT)[0] == 0
    assert len(list(folder.glob("*.safetensors"))) == 1
    second = Server(model_dir, tmp_path / "b.txt", "--prompt-cache-dir", str(folder))
    assert f"prompt cache: 1 entries from {folder}" in (tmp_path / "b.txt").read_text()
    turn = [*QUESTION, {"role": "assistant", "content": answer}, {"role": "user", "content": "hi"}]
    r = second.client().chat.completions.create(model="default", messages=turn, max_tokens=8)
    assert r.choices[0].message.content == solo(local, chat_prompt(local, turn), 8)
    assert r.usage.prompt_tokens_details.cached_tokens >= len(chat_prompt(local, QUESTION))
    assert second.stop(signal.SIGINT)[0] == 0


def test_taken_port_is_an_error(server, model_dir):
    port = server.url.rsplit(":", 1)[1].split("/")[0]
    r = subprocess.run(
        [sys.executable, "-m", "elm_mlx.cli.main", "serve", "-m", str(model_dir), "--port", port],
        capture_output=True,
        text=True,
        timeout=STARTUP,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 1 and f"error: cannot listen on 127.0.0.1:{port}" in r.stderr


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "127.3.4.5", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.10", "example.org"]))


# ------------------------------------------------------------------------------ real model


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return smollm2_8bit()


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2, tmp_path):
    s = Server(smollm2, tmp_path / "serve.txt")
    try:
        client = s.client()
        question = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="default", messages=question, max_tokens=20)
        assert "Paris" in r.choices[0].message.content
        stream = client.chat.completions.create(
            model="default", messages=question, max_tokens=20, stream=True
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in stream)
            == r.choices[0].message.content
        )
        r = client.completions.create(
            model="default", prompt="The capital of France is", max_tokens=4
        )
        assert "Paris" in r.choices[0].text
    finally:
        assert s.stop()[0] == 0


@pytest.mark.slow
def test_smollm2_with_an_8_bit_kv_cache_answers_as_the_full_cache(smollm2, tmp_path):
    """`elm serve --kv-bits 8`: greedy answers to short prompts (completions and chat, the
    prompt cache on) are those of the same server with the full-precision cache."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    question = [{"role": "user", "content": "Name three colours."}]

    def answers(*options: str) -> list[str]:
        s = Server(smollm2, tmp_path / f"serve{len(options)}.txt", *options)
        try:
            client = s.client()
            got = [
                client.completions.create(model="default", prompt=p, max_tokens=8).choices[0].text
                for p in prompts
            ]
            for _ in range(2):  # the second time from the prompt cache
                r = client.chat.completions.create(model="default", messages=question, max_tokens=8)
                got.append(r.choices[0].message.content)
        finally:
            assert s.stop()[0] == 0
        return got

    full = answers()
    assert "Paris" in full[0] and full[3] == full[4]
    assert answers("--kv-bits", "8") == full


def test_seeded_sampling_equals_the_library_alone_and_in_a_crowd(server, local):
    """One seeding rule: a seeded sampled request gives the library's tokens (completions and
    chat), whether it runs alone or beside seven others, and whether it speculates or not."""
    model, tokenizer = local
    sampling = {"temperature": 0.9, "top_p": 0.95, "seed": 4242}
    prompt = " ".join(CHAT_CORPUS[:3])
    expected = generate(model, tokenizer, prompt, max_tokens=14, **sampling)
    expected_chat = generate(
        model, tokenizer, chat_prompt(local, QUESTION), max_tokens=14, **sampling
    )
    client = server.client()

    def completion(extra: dict) -> str:
        r = client.completions.create(
            model="default", prompt=prompt, max_tokens=14, extra_body=extra, **sampling
        )
        return r.choices[0].text

    def chat(_: int) -> str:
        r = client.chat.completions.create(
            model="default", messages=QUESTION, max_tokens=14, **sampling
        )
        return r.choices[0].message.content

    assert completion({}) == expected
    assert completion({"prompt_lookup": 4}) == expected
    crowd = [f"{CHAT_CORPUS[i]} and so on" for i in range(6)]
    with ThreadPoolExecutor(8) as pool:
        others = [
            pool.submit(
                lambda p: client.completions.create(
                    model="default", prompt=p, max_tokens=20, temperature=1.0
                ),
                p,
            )
            for p in crowd
        ]
        mine = pool.submit(completion, {"prompt_lookup": 4})
        mine_chat = pool.submit(chat, 0)
        assert mine.result() == expected
        assert mine_chat.result() == expected_chat
        for f in others:
            f.result()
