"""Structured output and tool calls for chat completions, as the OpenAI API defines them.

- `response_format` `json_object` / `json_schema` becomes a constraint on the answer.
- `tools` are shown to the model through its chat template when the template takes `tools`
  (Llama 3.x, Qwen-style templates), and otherwise through `DEFAULT_TOOL_PROMPT`, a system
  message in the Hermes convention (SmolLM2's ChatML, OpenELM's Zephyr, plain turns). Assistant
  turns that only called tools and `role: "tool"` results are rendered in the same convention.
- A call is `PREFIX {"name": "NAME", "KEY": ARGUMENTS} SUFFIX` (`ToolFormat`: Hermes
  `<tool_call>` tags with "arguments", or Llama 3's bare JSON with "parameters"). With
  `tool_choice` "required" or a named function the answer is grammar-constrained to one call
  (or several, one per line, with `parallel_tool_calls`): a choice of the offered names and
  arguments valid against that function's schema. With "auto" the grammar is "text that does
  not start as every call starts (`<tool_call>\n{"name": "`) | calls", so a call, once begun,
  is constrained too.
- tool_calls.py turns the answer into `message.tool_calls` (finish_reason "tool_calls"), whole
  or streamed as OpenAI streams them (a delta with index, id and name, then argument pieces).

Bad input raises `OptionError(field, problem)`; protocol.py turns it into a 400 naming the
field (`tools[2].function.parameters`, `tool_choice`, `response_format.json_schema.schema`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine.constraint import JSON_OPTIONS, ConstraintSpec
from ..errors import OptionError
from ..tokenizer import Tokenizer, default_chat_template, render_chat


class _Body(BaseModel):
    # as protocol.py's bodies: strict types, unknown fields ignored
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # ignored: the schema is always enforced (README)


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class CalledFunction(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(_Body):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # ignored: the schema is always enforced (README)


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


Render = Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], str]
MODELS = (FunctionDef, ToolDef, CalledFunction, ToolCall, NamedToolChoice, JsonSchemaFormat)
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


# ------------------------------------------------------------------------------ formats


@dataclass(frozen=True)
class ToolFormat:
    """How a call is written: PREFIX {"name": "NAME", "KEY": ARGUMENTS} SUFFIX, calls one a
    line."""

    prefix: str
    suffix: str
    key: str

    @property
    def opening(self) -> str:
        """What every call begins with."""
        return f'{self.prefix}{{"name": "'

    def head(self, name: str) -> str:
        return f'{self.opening}{name}", "{self.key}": '

    def write(self, name: str, arguments: Any) -> str:
        return f"{self.head(name)}{json.dumps(arguments, ensure_ascii=False)}}}{self.suffix}"


HERMES = ToolFormat("<tool_call>\n", "\n</tool_call>", "arguments")
LLAMA3 = ToolFormat("", "", "parameters")  # the JSON Llama 3.x templates ask for

DEFAULT_TOOL_PROMPT = """You may call one or more functions to answer the user. The functions \
are described by JSON schemas within <tools></tools>:
<tools>
{tools}
</tools>
To call a function, answer with a JSON object of its name and arguments within \
<tool_call></tool_call> tags, one call per tag:
<tool_call>
{{"name": "function_name", "arguments": {{"argument": "value"}}}}
</tool_call>
The results come back within <tool_response></tool_response> tags."""


def template_source(tokenizer: Tokenizer, model_type: str, template: str | None) -> str:
    return (
        template
        or getattr(tokenizer, "chat_template", None)
        or (default_chat_template(tokenizer, model_type) or "")
    )


def tool_format(source: str) -> ToolFormat | None:
    """The call format of a template that takes `tools`; None: it does not (default prompt)."""
    if "tools" not in source:
        return None
    return HERMES if "<tool_call>" in source else LLAMA3


# ------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class ToolPlan:
    """What the answer of a request with tools may hold, for ToolShape."""

    format: ToolFormat
    names: tuple[str, ...]
    required: bool  # the answer is calls only


@dataclass(frozen=True)
class ChatPlan:
    prompt: str
    constraint: ConstraintSpec | None = None
    tools: ToolPlan | None = field(default=None)


def _text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(part["text"] for part in content)


def _arguments(call: dict[str, Any], field: str) -> Any:
    try:
        return json.loads(call["function"]["arguments"])
    except json.JSONDecodeError as e:
        raise OptionError(f"{field}.function.arguments", f"is not valid JSON: {e}") from e


def _messages(messages: list[dict[str, Any]], fmt: ToolFormat | None) -> list[dict[str, Any]]:
    """OpenAI messages -> template messages. `fmt` None: the default prompt's convention
    (calls written into the assistant's text, results as user turns); otherwise the
    Hugging Face convention that templates with `tools` read."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id -> function name
    for i, m in enumerate(messages):
        role = "system" if m["role"] == "developer" else m["role"]
        content = _text(m.get("content"))
        if role == "tool":
            if not m.get("tool_call_id"):
                raise OptionError(f"messages[{i}].tool_call_id", "is required for role 'tool'")
            if fmt is None:
                result = f"<tool_response>\n{content}\n</tool_response>"
                if out and out[-1].get("tool_results"):
                    out[-1]["content"] += "\n" + result
                else:
                    out.append({"role": "user", "content": result, "tool_results": True})
            else:
                name = names.get(m["tool_call_id"], "")
                out.append(
                    {
                        "role": "tool",
                        "content": content,
                        "tool_call_id": m["tool_call_id"],
                        "name": name,
                    }
                )
            continue
        calls = m.get("tool_calls") or []
        if role != "assistant" or not calls:
            out.append({"role": role, "content": content})
            continue
        parsed = []
        for j, call in enumerate(calls):
            names[call["id"]] = call["function"]["name"]
            args = _arguments(call, f"messages[{i}].tool_calls[{j}]")
            parsed.append((call, args))
        if fmt is None:
            written = "\n".join(HERMES.write(c["function"]["name"], a) for c, a in parsed)
            out.append(
                {"role": "assistant", "content": (content + "\n" if content else "") + written}
            )
        else:
            tool_calls = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["function"]["name"], "arguments": a},
                }
                for c, a in parsed
            ]
            out.append({"role": "assistant", "content": content, "tool_calls": tool_calls})
    for m in out:
        m.pop("tool_results", None)
    return out


def _with_tool_prompt(messages: list[dict[str, Any]], tools: list[dict]) -> list[dict[str, Any]]:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    prompt = DEFAULT_TOOL_PROMPT.format(tools=listing)
    if messages and messages[0]["role"] == "system":
        return [
            {"role": "system", "content": messages[0]["content"] + "\n\n" + prompt},
            *messages[1:],
        ]
    return [{"role": "system", "content": prompt}, *messages]


def _schema_for_grammar(schema: dict[str, Any]) -> dict[str, Any]:
    """A schema to embed with %json: llguidance's whitespace rule made explicit (the JSON
    compile defaults do not reach schemas inside a Lark grammar)."""
    return {"x-guidance": JSON_OPTIONS, **schema}


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def call_grammar(
    tools: list[FunctionDef],
    fmt: ToolFormat,
    parallel: bool,
    required: bool,
    text_schema: dict[str, Any] | None,
) -> str:
    """A Lark grammar (llguidance's dialect, `%json` for schemas) for the calls, or for text |
    calls. Text may not begin with what every call begins with (so a call, once begun, is
    constrained; `<b>` or `{` may begin text); with a response format it is that JSON instead."""
    lines = ["calls: call" + (' ("\\n" call)*' if parallel else "")]
    lines.append("call: " + " | ".join(f"call_{i}" for i in range(len(tools))))
    for i, tool in enumerate(tools):
        params = dict(tool.parameters or {"type": "object", "properties": {}})
        params.setdefault("type", "object")
        lines.append(
            f"call_{i}: {_lark_string(fmt.head(tool.name))} args_{i} "
            f"{_lark_string('}' + fmt.suffix)}"
        )
        lines.append(f"args_{i}: %json {json.dumps(_schema_for_grammar(params))}")
    if required:
        return "start: calls\n" + "\n".join(lines)
    if text_schema is not None:
        text_rule = f"text: %json {json.dumps(_schema_for_grammar(text_schema))}"
    else:  # any text that does not start as every call does (nor with whitespace)
        opening = _lark_string(fmt.opening)
        text_rule = f"text: TEXT\nTEXT: /[^\\s](?s:.*)/ & ~({opening} /(?s:.*)/)"
    return "start: text | calls\n" + text_rule + "\n" + "\n".join(lines)


def response_constraint(fmt: ResponseFormat | None) -> tuple[ConstraintSpec | None, dict | None]:
    """`response_format` -> (its constraint, the JSON schema it stands for)."""
    if fmt is None or fmt.type == "text":
        return None, None
    if fmt.type == "json_object":
        return ConstraintSpec("json_object", field="response_format"), {"type": "object"}
    if fmt.json_schema is None:
        raise OptionError("response_format.json_schema", "is required for type 'json_schema'")
    schema = fmt.json_schema.schema_ or {}
    field = "response_format.json_schema.schema"
    return ConstraintSpec("json_schema", json.dumps(schema), field), schema


def check_tools(tools: list[ToolDef], tokenizer: Tokenizer) -> None:
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if not NAME.fullmatch(name):
            raise OptionError(
                f"tools[{i}].function.name", f"must be 1-64 letters, digits, _ or -, got {name!r}"
            )
        if name in seen:
            raise OptionError(f"tools[{i}].function.name", f"repeats the name {name!r}")
        seen.add(name)
        params = tool.function.parameters
        if params is not None:
            if params.get("type", "object") != "object":
                raise OptionError(
                    f"tools[{i}].function.parameters", "must be a JSON schema of type 'object'"
                )
            ConstraintSpec.json_schema(params, f"tools[{i}].function.parameters").check(tokenizer)


def plan_chat(
    messages: list[dict[str, Any]],
    tools: list[ToolDef] | None,
    tool_choice: ToolChoice | None,
    parallel_tool_calls: bool | None,
    response_format: ResponseFormat | None,
    tokenizer: Tokenizer,
    model_type: str,
    template: str | None,
    render: Render | None = None,
) -> ChatPlan:
    """The prompt text, the constraint and the tool plan of a chat request (OptionError on
    bad input). `render(messages, tools)` renders the template (default: `render_chat` with
    `template`); messages as protocol.py gives them, with "tool_calls" on assistant turns."""
    if render is None:

        def render(turns: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
            return render_chat(tokenizer, turns, model_type, template, tools=tools)

    constraint, text_schema = response_constraint(response_format)
    if constraint is not None:
        constraint.check(tokenizer)
    if tool_choice is not None and not tools:
        raise OptionError("tool_choice", "is only allowed when tools are given")
    if not tools:  # the template renders the turns as they are (calls, if any, dropped)
        turns = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        return ChatPlan(render(turns, None), constraint)
    check_tools(tools, tokenizer)
    choice = tool_choice or "auto"
    offered = [t.function for t in tools]
    if isinstance(choice, NamedToolChoice):
        offered = [f for f in offered if f.name == choice.function.name]
        if not offered:
            raise OptionError(
                "tool_choice", f"names the function {choice.function.name!r}, which is not in tools"
            )
    source = template_source(tokenizer, model_type, template)
    fmt = tool_format(source)
    tool_list = [t.model_dump(exclude_none=True, by_alias=True) for t in tools]
    if fmt is None:
        text = render(_with_tool_prompt(_messages(messages, None), tool_list), None)
        fmt = HERMES
    else:
        text = render(_messages(messages, fmt), tool_list)
    if choice == "none":
        return ChatPlan(text, constraint)
    required = choice != "auto"
    parallel = parallel_tool_calls is not False and not isinstance(choice, NamedToolChoice)
    grammar = call_grammar(offered, fmt, parallel, required, text_schema)
    spec = ConstraintSpec("grammar", grammar, "tools")
    spec.check(tokenizer)
    plan = ToolPlan(fmt, tuple(f.name for f in offered), required)
    return ChatPlan(text, spec, plan)
