"""`elm serve`'s routes for today's clients: GET /metrics (parsed with prometheus_client's own
parser) and POST /v1/embeddings. A real server process on a free port, the tiny random ChatML
model; the oracle for embeddings is the model's body run in this process, one text at a time.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import TIMEOUT, Server, write_serving_model

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
