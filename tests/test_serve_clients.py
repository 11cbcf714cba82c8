"""`elm serve`'s routes for today's clients: GET /metrics (parsed with prometheus_client's own
parser) and POST /v1/embeddings. A real server process on a free port, the tiny random ChatML
model; the oracle for embeddings is the model's body run in this process, one text at a time.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import TIMEOUT, Server, write_serving_model

from elm_mlx import load
from elm_mlx.engine.embeddings import embed
from elm_mlx.tokenizer import encode_prompt

CONTEXT = 2048


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_serving_model(tmp_path_factory.mktemp("clients") / "tiny-chatml", CONTEXT)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "clients.txt")
    yield s
    code, out = s.stop(signal.SIGTERM)
    assert code == 0 and "elm serve: stopped" in out, s.log.read_text()


def post(server: Server, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(
        f"{server.url}{path}", content=json.dumps(body), headers=headers, timeout=TIMEOUT
    )


# ------------------------------------------------------------------------------ /metrics


def scrape(server: Server) -> dict[tuple[str, tuple], float]:
    """Every sample of GET /metrics as {(name, sorted labels): value}."""
    r = httpx.get(f"{server.root}/metrics", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_move_with_requests(server):
    before = scrape(server)
    chat = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}
    answers = [post(server, "/chat/completions", chat) for _ in range(2)]
    assert all(a.status_code == 200 for a in answers)
    assert post(server, "/nowhere", {}).status_code == 404
    refused = httpx.post(f"{server.url}/chat/completions", content=b"{}", timeout=TIMEOUT)
    assert refused.status_code == 415  # no Content-Type: the guards answer, and are counted
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    chat_route = "/v1/chat/completions"
    assert moved("elm_requests_total", route=chat_route, status="200") == 2
    assert moved("elm_requests_total", route=chat_route, status="415") == 1
    assert moved("elm_requests_total", route="other", status="404") == 1
    usages = [a.json()["usage"] for a in answers]
    assert moved("elm_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages)
    assert moved("elm_generated_tokens_total") == generated
    assert moved("elm_time_to_first_token_seconds_count") == 2
    assert moved("elm_time_per_output_token_seconds_count") == generated - 2
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
    assert cached[1] > 0  # the same prompt again reuses its KV entries
    assert moved("elm_prompt_cache_hits_total") == sum(c > 0 for c in cached)
    assert moved("elm_prompt_cache_hit_tokens_total") == sum(cached)
    assert after[("elm_prompt_cache_bytes", ())] > 0
    assert moved("elm_batch_size_count") >= generated / 2  # one step per token or fewer
    assert after[("elm_models_loaded", ())] == 1
    assert after[("elm_requests_running", ())] == 0
    assert after[("elm_requests_waiting", ())] == 0
    assert ("elm_speculative_accepted_tokens_total", ()) in after


# ------------------------------------------------------------------------------ /v1/embeddings

TEXTS = ["the weather in paris", "hi", "tell me a long story about rome and its seven hills"]


@pytest.fixture(scope="module")
def local(model_dir):
    return load(model_dir)


def oracle(local, text: str | list[int], pooling: str = "mean") -> np.ndarray:
    """The model's body over one text alone, pooled in numpy and normalised."""
    model, tokenizer = local
    tokens = encode_prompt(tokenizer, text) if isinstance(text, str) else text
    hidden = np.array(model.model(mx.array([tokens]), None).astype(mx.float32))[0]  # (L, D)
    pooled = hidden.mean(axis=0) if pooling == "mean" else hidden[-1]
    return pooled / np.linalg.norm(pooled)


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    return np.array([d["embedding"] for d in data])


def test_embeddings_are_the_pooled_body_alone_or_in_a_batch(server, local):
    batch = post(server, "/embeddings", {"input": TEXTS})
    together = vectors(batch)
    assert together.shape == (3, local[0].args.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)
    for text, vector in zip(TEXTS, together, strict=True):
        alone = vectors(post(server, "/embeddings", {"input": text}))[0]
        np.testing.assert_allclose(vector, alone, atol=1e-5)
        np.testing.assert_allclose(vector, oracle(local, text), atol=1e-4)
    tokens = [len(encode_prompt(local[1], t)) for t in TEXTS]
    assert batch.json()["usage"] == {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}


def test_embeddings_of_token_ids_and_base64_with_the_openai_client(server, local):
    ids = encode_prompt(local[1], TEXTS[0])
    client = server.client()
    by_ids = client.embeddings.create(model="default", input=[ids, ids[:3]])
    np.testing.assert_allclose(by_ids.data[0].embedding, oracle(local, ids), atol=1e-4)
    np.testing.assert_allclose(by_ids.data[1].embedding, oracle(local, ids[:3]), atol=1e-4)
    # the client asks for base64 unless told otherwise, and decodes it itself
    b64 = client.embeddings.create(model="default", input=TEXTS[0])
    floats = client.embeddings.create(model="default", input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(b64.data[0].embedding, floats.data[0].embedding, atol=1e-7)
    assert b64.usage.prompt_tokens == len(ids)


def test_last_token_pooling(local):
    texts = [encode_prompt(local[1], t) for t in TEXTS]
    got = np.array(embed(local[0], texts, "last"))
    for tokens, vector in zip(texts, got, strict=True):
        np.testing.assert_allclose(vector, oracle(local, tokens, "last"), atol=1e-4)


BAD_EMBEDDINGS = [
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": ""}, "input"),
    ({"input": ["a", ""]}, "input[1]"),
    ({"input": [[1, 2], [10**9]]}, "input[1]"),
    ({"input": 3}, "input"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "dimensions": 8}, "dimensions"),
    ({"input": "a", "model": "nope"}, "model"),
]


@pytest.mark.parametrize(("body", "param"), BAD_EMBEDDINGS)
def test_bad_embedding_requests_get_openai_errors(server, body, param):
    r = post(server, "/embeddings", body)
    assert r.status_code == (404 if param == "model" else 400), r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
