"""`elm serve`'s routes for today's clients: GET /metrics (parsed with prometheus_client's own
parser) and POST /v1/embeddings. A real server process on a free port, the tiny random ChatML
model; the oracle for embeddings is the model's body run in this process, one text at a time.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import anthropic
import httpx
import jsonschema
import mlx.core as mx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import TIMEOUT, Server, smollm2_8bit, write_serving_model

from elm_mlx import generate, load
from elm_mlx.engine.embeddings import embed
from elm_mlx.tokenizer import encode_prompt, render_chat

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


# ------------------------------------------------------------------------------ /v1/messages


def anthropic_client(server: Server, api_key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=server.root, api_key=api_key, max_retries=0, timeout=TIMEOUT
    )


def solo_chat(local, messages: list[dict], max_tokens: int) -> str:
    """The library's greedy answer to these chat messages: the oracle."""
    model, tokenizer = local
    prompt = encode_prompt(tokenizer, render_chat(tokenizer, messages, model.model_type))
    return generate(model, tokenizer, prompt, max_tokens=max_tokens)


SYSTEM = "You answer briefly."
ASK = "tell me about the weather in paris and rome"


def test_messages_whole_and_streamed_equal_solo_generation(server, local):
    client = anthropic_client(server)
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}]
    expected = solo_chat(local, turns, 12)
    prompt_tokens = len(encode_prompt(local[1], render_chat(local[1], turns, local[0].model_type)))
    m = client.messages.create(
        model="default", max_tokens=12, system=SYSTEM, messages=[{"role": "user", "content": ASK}]
    )
    assert m.type == "message" and m.role == "assistant"
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == expected
    assert m.usage.input_tokens == prompt_tokens
    assert m.stop_reason == ("max_tokens" if m.usage.output_tokens == 12 else "end_turn")

    # the system prompt as blocks, the user turn as blocks: the same prompt
    with client.messages.stream(
        model="default",
        max_tokens=12,
        system=[{"type": "text", "text": SYSTEM}],
        messages=[{"role": "user", "content": [{"type": "text", "text": ASK}]}],
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.content[0].text == expected and final.stop_reason == m.stop_reason
    assert final.usage.output_tokens == m.usage.output_tokens
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]

    count = client.messages.count_tokens(
        model="default", system=SYSTEM, messages=[{"role": "user", "content": ASK}]
    )
    assert count.input_tokens == prompt_tokens


def test_messages_stop_sequences_and_sampling_fields(server, local):
    client = anthropic_client(server)
    turns = [{"role": "user", "content": ASK}]
    full = solo_chat(local, turns, 12)
    stop = full[3:5]  # a stop sequence the greedy answer is known to contain
    m = client.messages.create(
        model="default", max_tokens=12, messages=turns, stop_sequences=[stop, "never seen"]
    )
    assert m.content[0].text == full[: full.index(stop)]
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    # top_k 1 is greedy, whatever the temperature (this client sends the sampling fields,
    # which newer Claude models dropped, as extra fields)
    m = client.messages.create(
        model="default",
        max_tokens=12,
        messages=turns,
        extra_body={"temperature": 1.0, "top_p": 0.9, "top_k": 1},
    )
    assert m.content[0].text == full


def test_messages_errors_in_anthropic_shape(server):
    client = anthropic_client(server)
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(
            model="default", max_tokens=0, messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.body["type"] == "error" and "max_tokens" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(
            model="nope", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.body["error"]["type"] == "not_found_error"
    hi = {"role": "user", "content": "hi"}
    bad = [
        ({"messages": [hi]}, "max_tokens"),  # required, as Anthropic requires it
        ({"max_tokens": 4, "messages": []}, "messages"),
        ({"max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}, "role"),
        (
            {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
            "content",
        ),
        ({"max_tokens": 4, "messages": [hi], "stop_sequences": [""]}, "stop_sequences"),
        ({"max_tokens": 4, "messages": [hi], "temperature": "hot"}, "temperature"),
    ]
    for body, field in bad:
        r = post(server, "/messages", body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["type"] == "error", r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and field in error["message"], r.text
    # the guards answer in the route's shape too
    r = httpx.post(f"{server.url}/messages", content=b"{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{server.url}/messages", json=hi, headers={"Host": "evil.example"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


# ------------------------------------------------------------------------------ /v1/responses


def test_responses_whole_streamed_and_continued(server, local):
    client = server.client()
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}]
    expected = solo_chat(local, turns, 12)
    r = client.responses.create(
        model="default", instructions=SYSTEM, input=ASK, max_output_tokens=12
    )
    assert r.object == "response" and r.output_text == expected
    assert r.status == ("incomplete" if r.usage.output_tokens == 12 else "completed")
    prompt = encode_prompt(local[1], render_chat(local[1], turns, local[0].model_type))
    assert r.usage.input_tokens == len(prompt)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens

    events = list(
        client.responses.create(
            model="default",
            instructions=SYSTEM,
            input=[{"role": "user", "content": [{"type": "input_text", "text": ASK}]}],
            max_output_tokens=12,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added",
    ]  # fmt: skip
    assert kinds[-4:] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        f"response.{r.status}",
    ]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == expected and events[-1].response.output_text == expected

    # the conversation goes on from a stored response (its instructions are not carried over)
    follow = "and what about rome?"
    r2 = client.responses.create(
        model="default", previous_response_id=r.id, input=follow, max_output_tokens=8
    )
    history = [
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": follow},
    ]
    assert r2.output_text == solo_chat(local, history, 8)
    assert r2.previous_response_id == r.id
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="default", previous_response_id="resp_nope", input="hi")
    unstored = client.responses.create(
        model="default", input="hi", max_output_tokens=2, store=False
    )
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="default", previous_response_id=unstored.id, input="hi")


BAD_RESPONSES = [
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "temperature": "warm"}, "temperature"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input"),
    ({"input": "hi", "model": "nope"}, "model"),
]


@pytest.mark.parametrize(("body", "param"), BAD_RESPONSES)
def test_bad_responses_requests_get_openai_errors(server, body, param):
    r = post(server, "/responses", body)
    assert r.status_code == (404 if param == "model" else 400), r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, r.text
    assert error["param"].startswith(param), r.text


# ------------------------------------------------------------------------------ README


def test_readme_client_snippets_run_against_elm_serve(server, tmp_path):
    """The README's "Clients of elm serve" blocks, pasted into one Python, against the server."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("### Clients of elm serve", 1)[1].split("\n## ", 1)[0]
    section = section.split("\n### ", 1)[0]
    code = "\n".join(re.findall(r"^```python\n(.*?)^```", section, flags=re.M | re.S))
    assert "responses.create" in code and "messages.stream" in code and "embeddings" in code
    code = code.replace("http://127.0.0.1:8080/v1", server.url)
    code = code.replace("http://127.0.0.1:8080", server.root)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) >= 5


# ------------------------------------------------------------------------------ real model


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory):
    s = Server(smollm2_8bit(), tmp_path_factory.mktemp("log") / "smollm2.txt")
    yield s
    assert s.stop()[0] == 0, s.log.read_text()


FRANCE = "What is the capital of France?"


@pytest.mark.slow
def test_smollm2_answers_anthropic_and_responses_clients(smollm2_server):
    claude = anthropic_client(smollm2_server)
    ask = [{"role": "user", "content": FRANCE}]
    m = claude.messages.create(model="default", max_tokens=20, messages=ask)
    assert "Paris" in m.content[0].text and m.stop_reason in ("end_turn", "max_tokens")
    with claude.messages.stream(model="default", max_tokens=20, messages=ask) as stream:
        streamed = "".join(stream.text_stream)
    assert streamed == m.content[0].text

    client = smollm2_server.client()
    r = client.responses.create(model="default", input=FRANCE, max_output_tokens=20)
    assert "Paris" in r.output_text
    events = list(
        client.responses.create(model="default", input=FRANCE, max_output_tokens=20, stream=True)
    )
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.output_text == r.output_text
    again = client.responses.create(
        model="default",
        previous_response_id=r.id,
        input="Repeat the name of that city once more.",
        max_output_tokens=20,
    )
    assert "Paris" in again.output_text


# ------------------------------------------------------------------------------ tools, formats
# The chat route's tools (tests/test_serve_tools.py) under the Anthropic and Responses APIs:
# a call's arguments follow its schema; a conversation with a call and its result gives the
# same answer as the same conversation sent to the chat route.

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"name": "get_weather", "description": "The weather in a city."}
CHAT_TOOLS = [{"type": "function", "function": {**WEATHER_TOOL, "parameters": WEATHER_PARAMETERS}}]
WEATHER_ASK = "What is the weather like in Paris?"
RESULT = '{"sky": "sunny", "celsius": 24}'


def chat_answer_after_call(server: Server, arguments: str, max_tokens: int) -> str:
    """The chat route's answer to: the question, a call with `arguments`, its RESULT."""
    messages = [
        {"role": "user", "content": WEATHER_ASK},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type":
         "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
    ]  # fmt: skip
    r = server.client().chat.completions.create(
        model="default", messages=messages, tools=CHAT_TOOLS, tool_choice="none",
        max_tokens=max_tokens,
    )  # fmt: skip
    return r.choices[0].message.content


def test_anthropic_tool_use_round_trip(server):
    claude = anthropic_client(server)
    common = {
        "model": "default",
        "max_tokens": 200,
        "tools": [{**WEATHER_TOOL, "input_schema": WEATHER_PARAMETERS}],
        "messages": [{"role": "user", "content": WEATHER_ASK}],
    }
    any_one = {"type": "any", "disable_parallel_tool_use": True}
    m = claude.messages.create(**common, tool_choice=any_one)
    assert m.stop_reason == "tool_use"
    (use,) = m.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER_PARAMETERS)
    with claude.messages.stream(**common, tool_choice=any_one) as stream:
        final = stream.get_final_message()
    assert [(b.type, b.name, b.input) for b in final.content] == [("tool_use", use.name, use.input)]
    assert final.stop_reason == "tool_use"

    turns = [
        *common["messages"],
        {"role": "assistant", "content": [use.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": RESULT}]},
    ]  # fmt: skip
    answer = claude.messages.create(
        **{**common, "messages": turns, "max_tokens": 12}, tool_choice={"type": "none"}
    )
    assert answer.content[0].type == "text"
    assert answer.content[0].text == chat_answer_after_call(server, json.dumps(use.input), 12)


def test_responses_function_call_round_trip_and_json_schema(server):
    client = server.client()
    tools = [{"type": "function", **WEATHER_TOOL, "parameters": WEATHER_PARAMETERS}]
    r = client.responses.create(
        model="default", input=WEATHER_ASK, tools=tools, tool_choice="required",
        parallel_tool_calls=False, max_output_tokens=200,
    )  # fmt: skip
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    events = list(
        client.responses.create(
            model="default", input=WEATHER_ASK, tools=tools, tool_choice="required",
            parallel_tool_calls=False, max_output_tokens=200, stream=True,
        )
    )  # fmt: skip
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [d.arguments for d in done] == [call.arguments]
    assert events[-1].type == "response.completed"
    assert events[-1].response.output[0].name == "get_weather"

    # the call's output, continuing the stored response
    r2 = client.responses.create(
        model="default", previous_response_id=r.id, tools=tools, tool_choice="none",
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": RESULT}],
        max_output_tokens=12,
    )  # fmt: skip
    assert r2.output_text == chat_answer_after_call(server, call.arguments, 12)

    # text.format: the answer follows a JSON schema
    answer_format = {"type": "json_schema", "name": "weather", "schema": WEATHER_PARAMETERS,
                     "strict": True}  # fmt: skip
    r3 = client.responses.create(
        model="default", input=WEATHER_ASK, text={"format": answer_format},
        max_output_tokens=200,
    )  # fmt: skip
    jsonschema.validate(json.loads(r3.output_text), WEATHER_PARAMETERS)


@pytest.mark.slow
def test_smollm2_tools_and_json_schema_through_both_clients(smollm2_server):
    claude = anthropic_client(smollm2_server)
    ask = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    tools = [{**WEATHER_TOOL, "input_schema": WEATHER_PARAMETERS}]
    m = claude.messages.create(
        model="default", max_tokens=80, messages=ask, tools=tools,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )  # fmt: skip
    (use,) = m.content
    assert m.stop_reason == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER_PARAMETERS)
    assert "paris" in use.input["city"].lower()
    result = [{"type": "tool_result", "tool_use_id": use.id, "content": RESULT}]
    turns = [*ask, {"role": "assistant", "content": [use.model_dump()]},
             {"role": "user", "content": result}]  # fmt: skip
    answer = claude.messages.create(
        model="default", max_tokens=60, messages=turns, tools=tools, tool_choice={"type": "none"}
    )
    text = answer.content[0].text
    assert answer.content[0].type == "text" and answer.stop_reason != "tool_use"
    assert "sunny" in text.lower() or "24" in text, text  # it read the result

    client = smollm2_server.client()
    r = client.responses.create(
        model="default", input=ask[0]["content"], max_output_tokens=80,
        tools=[{"type": "function", **WEATHER_TOOL, "parameters": WEATHER_PARAMETERS}],
        tool_choice="required", parallel_tool_calls=False,
    )  # fmt: skip
    (call,) = r.output
    assert call.type == "function_call" and "paris" in json.loads(call.arguments)["city"].lower()
    answer_format = {"type": "json_schema", "name": "weather", "schema": WEATHER_PARAMETERS,
                     "strict": True}  # fmt: skip
    r = client.responses.create(
        model="default", input="Give the weather in Paris as JSON.", max_output_tokens=80,
        text={"format": answer_format},
    )  # fmt: skip
    jsonschema.validate(json.loads(r.output_text), WEATHER_PARAMETERS)
