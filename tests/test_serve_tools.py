"""`elm serve` with structured output and tool calls, through the official `openai` client
against a real server process (port 0), as OpenAI defines them: `response_format` json_object /
json_schema, `tools` with `tool_choice` auto / required / a named function, streamed calls, tool
results fed back; bad schemas and choices are 400s naming the field. `jsonschema` is the oracle
of every constrained answer. The tiny model is random (SmolLM2's layout: ChatML, byte-level
BPE); the real SmolLM2 answers schemas and calls a tool.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import pytest
from serving import TIMEOUT, Server, write_serving_model
from tiny_models import load_smollm2_example

from elm_mlx import load
from elm_mlx.engine.constraint import ConstraintSpec
from elm_mlx.server.tools import HERMES, LLAMA3, ToolDef, plan_chat
from elm_mlx.tokenizer import encode_prompt

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 999},
                "b": {"type": "integer", "minimum": 0, "maximum": 999},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "rain": {"type": "boolean"},
        "days": {
            "type": "array",
            "items": {"enum": ["mon", "tue", "wed"]},
            "minItems": 1,
            "maxItems": 3,
        },
        "temp": {"type": "integer", "minimum": -30, "maximum": 45},
    },
    "required": ["city", "rain", "days", "temp"],
    "additionalProperties": False,
}
QUESTION = [{"role": "user", "content": "tell me about the weather in paris and rome"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # a long context: the tool prompt is long in a tiny vocabulary
    return write_serving_model(tmp_path_factory.mktemp("tools") / "tiny-chatml", 8192)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "serve.txt")
    yield s
    assert s.stop()[0] == 0, s.log.read_text()


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def arguments_valid(call, tools=TOOLS) -> None:
    (tool,) = [t for t in tools if t["function"]["name"] == call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


# ------------------------------------------------------------------------------ response_format


def test_response_format_schema_object_and_completions(server):
    client = server.client()
    for temperature in (0.0, 1.0):
        r = client.chat.completions.create(
            model="default",
            messages=QUESTION,
            max_tokens=300,
            seed=3,
            temperature=temperature,
            response_format=schema_format(SCHEMA),
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = client.chat.completions.create(
        model="default",
        messages=QUESTION,
        max_tokens=300,
        temperature=1.0,
        seed=1,
        response_format={"type": "json_object"},
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # a random model may write one long string: what there is starts an object
        assert r.choices[0].message.content.startswith("{")
    r = client.completions.create(
        model="default",
        prompt="the weather in paris",
        max_tokens=300,
        extra_body={"response_format": schema_format(SCHEMA)},
    )
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_eight_schema_requests_at_once_with_prompt_lookup(server):
    """Constrained and unconstrained requests batch together; each greedy constrained answer
    equals the same request sent alone."""
    client = server.client()

    def ask(i: int):
        fields = {"response_format": schema_format(SCHEMA)} if i % 4 != 3 else {}
        return (
            client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": f"weather report number {i}"}],
                max_tokens=300,
                temperature=0.0 if i % 2 else 0.9,
                seed=i,
                extra_body={"prompt_lookup": 4},
                **fields,
            )
            .choices[0]
            .message.content
        )

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for i, answer in enumerate(answers):
        if i % 4 != 3:
            jsonschema.validate(json.loads(answer), SCHEMA)
    assert answers[1] == ask(1) and answers[5] == ask(5)


# ------------------------------------------------------------------------------ tools


def test_required_and_named_calls_whole_and_streamed(server):
    client = server.client()
    common = {"model": "default", "messages": QUESTION, "tools": TOOLS, "max_tokens": 300}
    r = client.chat.completions.create(**common, tool_choice="required", parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (whole,) = choice.message.tool_calls
    assert whole.type == "function" and whole.id.startswith("call_")
    arguments_valid(whole)
    # streamed: the id, type and name first, then the arguments in pieces; the same call
    stream = client.chat.completions.create(
        **common, tool_choice="required", parallel_tool_calls=False, stream=True
    )
    deltas, reasons = [], []
    for chunk in stream:
        for c in chunk.choices:
            deltas.extend(c.delta.tool_calls or [])
            reasons.append(c.finish_reason)
    first, *rest = deltas
    assert first.id.startswith("call_") and first.type == "function"
    assert first.function.name == whole.function.name and first.function.arguments == ""
    assert len(rest) > 1 and all(d.index == 0 and d.id is None for d in rest)
    assert "".join(d.function.arguments for d in rest) == whole.function.arguments
    assert reasons[-1] == "tool_calls"
    # a named function, sampled
    named = {"type": "function", "function": {"name": "add"}}
    for seed in range(3):
        r = client.chat.completions.create(**common, tool_choice=named, temperature=1.0, seed=seed)
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "add" and r.choices[0].finish_reason == "tool_calls"
        arguments_valid(call)


def test_auto_answers_text_or_a_valid_call(server):
    client = server.client()
    for seed in range(4):
        r = client.chat.completions.create(
            model="default",
            messages=QUESTION,
            tools=TOOLS,
            max_tokens=60,
            temperature=1.0,
            seed=seed,
            parallel_tool_calls=False,
        )
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            arguments_valid(choice.message.tool_calls[0])
        else:
            text = choice.message.content
            assert text and not text.startswith(HERMES.prefix) and not text[0].isspace()


def test_auto_text_may_begin_with_anything_but_a_call(model_dir):
    """With "auto", text may begin with the call's first character (`<b>`, `{`) but not with
    what every call begins with: from there on it is a call, constrained to the schemas."""
    model, tokenizer = load(model_dir)
    tools = [ToolDef.model_validate(t) for t in TOOLS]
    plan = plan_chat(QUESTION, tools, "auto", False, None, tokenizer, "llama", None)
    assert plan.tools is not None and plan.tools.format == HERMES

    def accepted(text: str) -> tuple[bool, bool]:
        """(the constraint takes all of text, the answer may end there)"""
        c = plan.constraint.build(tokenizer, model.args.vocab_size)
        tokens = tokenizer.encode(text, add_special_tokens=False)
        if c.valid_prefix(tokens) < len(tokens):
            return False, False
        for token in tokens:
            c.advance(token)
        return True, c.accepting

    assert accepted("<b>Paris</b> is sunny.") == (True, True)
    assert accepted('{"city": "paris"}') == (True, True)
    assert accepted("<tool") == (True, True)
    assert accepted(" leading space")[0] is False
    assert accepted('<tool_call>\n{"name": "sub"')[0] is False  # not an offered function
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert accepted(call) == (True, True)
    assert accepted(call[:-3]) == (True, False)  # a call begun must be finished


def test_tool_results_are_rendered_and_answered(server, model_dir):
    """A conversation with an assistant turn that only called a tool and the tool's result:
    the server renders it as `plan_chat` does here (the usage counts its tokens) and answers
    in text."""
    messages = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "paris", "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 degrees"},
    ]
    r = server.client().chat.completions.create(
        model="default", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    model, tokenizer = load(model_dir)
    tools = [ToolDef.model_validate(t) for t in TOOLS]
    plan = plan_chat(messages, tools, "none", None, None, tokenizer, model.model_type, None)
    assert plan.constraint is None and plan.tools is None
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"' in plan.prompt
    assert "<tool_response>\nsunny, 24 degrees\n</tool_response>" in plan.prompt
    assert '"name": "add"' in plan.prompt  # the tools, in the default tool prompt
    assert r.usage.prompt_tokens == len(encode_prompt(tokenizer, plan.prompt))


BAD_SCHEMA = {"type": "object", "properties": {"a": {"type": "bogus"}}}
BAD = [
    ({"response_format": schema_format(BAD_SCHEMA)}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    (
        {
            "tools": [
                WEATHER,
                ADD,
                {"type": "function", "function": {"name": "f", "parameters": BAD_SCHEMA}},
            ]
        },
        "tools[2].function.parameters",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
        "tools[0].function.name",
    ),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [*QUESTION, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
]


@pytest.mark.parametrize(("fields", "param"), BAD)
def test_bad_schemas_and_choices_are_400s_naming_the_field(server, fields, param):
    before = server.health()
    body = {"model": "default", "messages": QUESTION, "max_tokens": 2, **fields}
    r = httpx.post(server.url + "/chat/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and "Traceback" not in r.text
    after = server.health()
    assert {k: after[k] for k in ("completed", "failed", "active", "queued")} == {
        k: before[k] for k in ("completed", "failed", "active", "queued")
    }


# ------------------------------------------------------------------------------ templates


LLAMA3_LIKE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}\n"
    "{% if tools and loop.first %}Tools: {{ tools | tojson }}\n"
    'Answer a call as {"name": ..., "parameters": ...}\n{% endif %}'
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}'
    "{% endfor %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


def test_a_template_that_takes_tools(model_dir):
    """Tools go through a template that takes them, in its call format (here Llama 3's bare
    JSON with "parameters"); the grammar accepts such a call and nothing else."""
    model, tokenizer = load(model_dir)
    tools = [ToolDef.model_validate(t) for t in TOOLS]
    messages = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]
    plan = plan_chat(messages, tools, "required", False, None, tokenizer, "llama", LLAMA3_LIKE)
    assert (
        plan.tools is not None and plan.tools.format == LLAMA3 and HERMES.prefix not in plan.prompt
    )
    assert (
        '"get_weather"' in plan.prompt
        and '{"name": "add", "parameters": {"a": 1, "b": 2}}' in plan.prompt
    )
    good = '{"name": "add", "parameters": {"a": 4, "b": 5}}'
    c = plan.constraint.build(tokenizer, model.args.vocab_size)
    for token in tokenizer.encode(good, add_special_tokens=False):
        c.advance(token)
    assert c.done
    c = plan.constraint.build(tokenizer, model.args.vocab_size)
    bad = tokenizer.encode('{"name": "sub"', add_special_tokens=False)
    assert c.valid_prefix(bad) < len(bad)
    assert isinstance(plan.constraint, ConstraintSpec) and plan.constraint.field == "tools"


# ------------------------------------------------------------------------------ real model


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory):
    example = load_smollm2_example()
    s = Server(
        example.build_hf_folder(example.default_cache_dir()), tmp_path_factory.mktemp("s") / "log"
    )
    yield s
    assert s.stop()[0] == 0, s.log.read_text()


@pytest.mark.slow
def test_smollm2_schemas_and_a_tool_call(smollm2_server):
    client = smollm2_server.client()
    question = [{"role": "user", "content": "Give a weather report for Paris as JSON."}]

    def ask(i: int) -> str:
        return (
            client.chat.completions.create(
                model="default",
                messages=question,
                max_tokens=120,
                response_format=schema_format(SCHEMA),
                temperature=0.0 if i == 0 else 0.8,
                seed=i,
                extra_body={"prompt_lookup": 4},
            )
            .choices[0]
            .message.content
        )

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for answer in answers:
        jsonschema.validate(json.loads(answer), SCHEMA)
    assert answers[0] == ask(0)  # greedy: the same alone as in the batch of eight
    ask_weather = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    r = client.chat.completions.create(
        model="default",
        messages=ask_weather,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,  # this small model repeats its call otherwise
        max_tokens=80,
    )
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    arguments_valid(call)
    assert "paris" in json.loads(call.function.arguments)["city"].lower()
    follow = [
        *ask_weather,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 24}'},
    ]
    r = client.chat.completions.create(
        model="default", messages=follow, tools=TOOLS, tool_choice="none", max_tokens=60
    )
    text = r.choices[0].message.content
    assert r.choices[0].message.tool_calls is None and text, r
    assert "sunny" in text.lower() or "24" in text, text  # it read the result
