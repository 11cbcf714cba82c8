"""Request bodies of /v1/chat/completions and /v1/completions: parsed with strict types
(pydantic), checked against the served model, and turned into a `Job` for the engine. Every
problem is an `APIError` that names the JSON field, as the OpenAI API does."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from itertools import repeat
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine.config import GenerationConfig
from ..errors import ElmError, OptionError
from ..tokenizer import Tokenizer, encode_prompt, render_chat
from .tools import (
    MODELS,
    ResponseFormat,
    ToolCall,
    ToolChoice,
    ToolDef,
    ToolPlan,
    plan_chat,
    response_constraint,
)

MAX_TOP_LOGPROBS = 20
MAX_JSON_DEPTH = 64  # nesting of arrays and objects in a body (JSON schemas need ~10)
PROBE_CHARS_PER_TOKEN = 8  # a longer prompt's start is tokenized first (English: ~4.5)
DEFAULT_MODEL = "default"  # the name that always means the served model


class APIError(ElmError):
    """An error the client gets as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind,
        )  # fmt: skip

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.kind, "param": self.param}
        return {"error": {**error, "code": self.code}}


# ------------------------------------------------------------------------------ bodies


class _Strict(BaseModel):
    # strict: "10" is not an int and 1 is not a bool; unknown fields are ignored, as vendors'
    # extra fields are by most OpenAI-compatible servers
    model_config = ConfigDict(strict=True, extra="ignore")
    # what a field of a union type must be, for this body's fields that EXPECTED says otherwise
    expected: ClassVar[dict[str, str]] = {}


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool's result: the call it answers
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # elm's own options, as extra fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    prompt_lookup: int | None = None


class ChatBody(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class CompletionBody(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    response_format: ResponseFormat | None = None


# what a field of a union type must be, said once instead of once per member
EXPECTED = {
    "stop": "a string or a list of strings",
    "prompt": "a string, a list of token ids, or a list holding one of these",
    "content": "a string or a list of text parts",
    "tool_choice": "'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
    "input": "a string, a list of strings, a list of token ids, or a list of token-id lists",
}


_FIELDS = {
    info.alias or name
    for body in (
        ChatBody,
        CompletionBody,
        Message,
        TextPart,
        StreamOptions,
        ResponseFormat,
        *MODELS,
    )
    for name, info in body.model_fields.items()
}


def _field_names(schema: type[BaseModel]) -> set[str]:
    """The field names of a body and of the bodies nested in it (their parts, messages...)."""
    names, todo, seen = set(), [schema], set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            names.add(info.alias or name)
            args = [info.annotation]
            while args:
                arg = args.pop()
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    todo.append(arg)
                args.extend(get_args(arg))
    return names


def _validation_error(e: ValidationError, schema: type[_Strict]) -> APIError:
    error = e.errors()[0]
    # the path to the field, without pydantic's names of union members ("str", "list[int]")
    fields = _field_names(schema) | _FIELDS
    loc = [p for p in error["loc"] if isinstance(p, int) or p in fields]
    expected = {**EXPECTED, **schema.expected}
    union = next((i for i, p in enumerate(loc) if p in expected), None)
    if union is not None and error["type"] != "missing":
        loc = loc[: union + 1]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if error["type"] == "missing":
        return APIError(400, f"{param} is required", param)
    if union is not None:
        return APIError(400, f"{param} must be {expected[loc[-1]]}", param)
    return APIError(400, f"{param}: {error['msg']}", param)


def _nested_deeper(data: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` deep (level by level: no recursion)."""
    container = (dict, list)  # a tuple: isinstance is faster with one than with a union
    level = [data] if isinstance(data, container) else []
    for _ in range(limit):
        if not level:
            return False
        below = []
        for x in level:
            values = x.values() if isinstance(x, dict) else x
            # a flat list (100,000 stop strings) is looked at in C, not item by item in Python
            if any(map(isinstance, values, repeat(container))):
                below += [v for v in values if isinstance(v, container)]
        level = below
    return bool(level)


def parse_json(raw: bytes) -> dict[str, Any]:
    """A body as the JSON object it must be, nesting at most MAX_JSON_DEPTH deep."""
    deep = f"the request body nests arrays and objects over {MAX_JSON_DEPTH} deep"
    too_deep = APIError(400, deep, code="invalid_json")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
    except RecursionError as e:
        raise too_deep from e
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if _nested_deeper(data, MAX_JSON_DEPTH):
        raise too_deep
    return data


def read_body(data: dict[str, Any], schema: type[_Strict]) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e, schema) from e


# ------------------------------------------------------------------------------ jobs


@dataclass(frozen=True)
class Served:
    """What requests are checked against: the served model and the server's defaults."""

    model_id: str
    tokenizer: Tokenizer
    model_type: str
    context_length: int
    vocab_size: int
    defaults: GenerationConfig
    template: str | None = None
    # the longest token's text: a prompt of more than context_length x this many characters
    # cannot fit, and is refused before it is tokenized
    max_token_chars: int = 64
    pooling: str = "mean"  # how /v1/embeddings pools a text's hidden states: "mean" or "last"


@dataclass(frozen=True)
class Job:
    """A checked request: the prompt's token ids and everything about the answer."""

    prompt: list[int]
    config: GenerationConfig
    logprobs: int | None  # None: none; k: the chosen token's and the k most likely
    stream: bool
    include_usage: bool
    tools: ToolPlan | None = None  # the answer may hold tool calls


def _refuse_unsupported(body: _Sampling) -> None:
    if body.n not in (None, 1):
        raise APIError(400, "n must be 1: this server returns one choice per request", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise APIError(
                400, f"{name} is not supported; use repetition_penalty (an extra field)", name
            )
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", "logit_bias")


def _check_model(body: _Sampling, served: Served) -> None:
    if body.model not in (None, DEFAULT_MODEL, served.model_id):
        raise APIError(
            404,
            f"the model {body.model!r} does not exist: this server serves {served.model_id!r} "
            f"(also called {DEFAULT_MODEL!r})",
            "model",
            "model_not_found",
        )


def _config(
    body: _Sampling, served: Served, max_tokens_field: str, max_tokens: int | None
) -> GenerationConfig:
    """The server's defaults with the request's fields on top, validated."""
    given = {
        name: getattr(body, name)
        for name in ("temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty")
        if getattr(body, name) is not None
    }
    if isinstance(body.stop, str):
        given["stop"] = (body.stop,)
    elif body.stop is not None:
        given["stop"] = tuple(body.stop)
    if any(s == "" for s in given.get("stop", ())):
        raise APIError(400, "stop strings must not be empty", "stop")
    if max_tokens is not None:
        if max_tokens < 1:
            raise APIError(400, f"{max_tokens_field} must be at least 1", max_tokens_field)
        given["max_tokens"] = max_tokens
    if body.prompt_lookup is not None:  # 0: no speculation; K: prompt lookup instead of a draft
        given.update(prompt_lookup=body.prompt_lookup, draft_model=None)
    config = replace(served.defaults, **given)
    try:
        config.validate()
    except OptionError as e:
        param = max_tokens_field if e.option == "max_tokens" else e.option
        raise APIError(400, f"{param} {e.problem}", param) from e
    return config


def _fit(
    prompt: list[int], config: GenerationConfig, served: Served, field: str
) -> GenerationConfig:
    """Refuse a prompt the context cannot hold; cut max_tokens to the room that is left."""
    if not prompt:
        raise APIError(400, f"{field} is empty", field)
    room = served.context_length - len(prompt)
    if room < 1:
        raise APIError(
            400,
            f"the prompt is {len(prompt)} tokens and the context holds {served.context_length}: "
            "send a shorter prompt",
            field,
            "context_length_exceeded",
        )
    return replace(config, max_tokens=min(config.max_tokens, room))


def longest_token_chars(tokenizer: Tokenizer) -> int:
    """The most characters one token stands for (vocabulary pieces spell a byte-level token's
    bytes and a SentencePiece token's characters, added tokens their text)."""
    return max(map(len, tokenizer.get_vocab()), default=1)


def _text(content: str | list[TextPart] | None, param: str) -> str:
    """A message's or prompt's text; refused when it cannot be UTF-8 (a lone surrogate, which
    JSON's \\ud800 escapes can spell)."""
    if content is None or isinstance(content, str):
        text = content or ""
    else:
        text = "\n".join(part.text for part in content)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(
            400, f"{param} holds a lone surrogate ({text[e.start]!r} at {e.start}): not text", param
        ) from e
    return text


def _check_length(chars: int, served: Served, field: str) -> None:
    """Refuse, before tokenizing it, a prompt too long for the context whatever its tokens."""
    limit = served.context_length * served.max_token_chars
    if chars > limit:
        raise APIError(
            400,
            f"the prompt is {chars} characters, more than the context ({served.context_length} "
            f"tokens of at most {served.max_token_chars} characters) can hold: send a shorter "
            "prompt",
            field,
            "context_length_exceeded",
        )


def _encode(served: Served, text: str, field: str) -> list[int]:
    """The prompt's tokens; a text whose first context x PROBE_CHARS_PER_TOKEN characters
    already make more tokens than the context holds is refused without tokenizing the rest
    (a megabyte takes ~1 s). A cut changes its last token or two, nothing before them."""
    context, probe = served.context_length, served.context_length * PROBE_CHARS_PER_TOKEN
    some = len(encode_prompt(served.tokenizer, text[:probe])) - 2 if len(text) > probe else 0
    if some > context:
        message = f"the prompt is over {some} tokens and the context holds {context}"
        raise APIError(400, message + ": send a shorter prompt", field, "context_length_exceeded")
    return encode_prompt(served.tokenizer, text)


def _chat_messages(body: ChatBody) -> list[dict[str, Any]]:
    """The messages as chat templates take them ("developer" is "system")."""
    messages = []
    for i, m in enumerate(body.messages):
        message = {
            "role": "system" if m.role == "developer" else m.role,
            "content": _text(m.content, f"messages[{i}].content"),
        }
        if m.role == "tool":
            if m.tool_call_id is None:
                raise APIError(
                    400, "a tool message needs tool_call_id", f"messages[{i}].tool_call_id"
                )
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            message["name"] = m.name
        if m.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in m.tool_calls]
        messages.append(message)
    return messages


def _as_user_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool results as user turns, for templates that know no "tool" role."""
    return [
        {"role": "user", "content": f"Result of tool call {m['tool_call_id']}:\n{m['content']}"}
        if m["role"] == "tool"
        else m
        for m in messages
    ]


def _render(
    served: Served, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> str:
    from jinja2 import TemplateError

    try:
        return render_chat(
            served.tokenizer, messages, served.model_type, served.template, tools=tools
        )
    except TemplateError as e:
        if any(m["role"] == "tool" for m in messages):
            return _render(served, _as_user_turns(messages), tools)
        raise APIError(400, f"the chat template failed on these messages: {e}", "messages") from e


def chat_job(data: dict[str, Any], served: Served) -> Job:
    return chat_job_of(read_body(data, ChatBody), served)


def chat_job_of(body: ChatBody, served: Served) -> Job:
    """The job of a checked chat body (also what other APIs' chat bodies become)."""
    _check_model(body, served)
    _refuse_unsupported(body)
    if not body.messages:
        raise APIError(400, "messages must hold at least one message", "messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    config = _config(body, served, field, getattr(body, field))
    messages = _chat_messages(body)
    _check_length(sum(len(m["content"]) for m in messages), served, "messages")
    try:
        plan = plan_chat(
            messages,
            body.tools,
            body.tool_choice,
            body.parallel_tool_calls,
            body.response_format,
            served.tokenizer,
            served.model_type,
            served.template,
            render=lambda turns, tools: _render(served, turns, tools),
        )
    except OptionError as e:
        raise APIError(400, f"{e.option} {e.problem}", e.option) from e
    prompt = _encode(served, plan.prompt, "messages")
    return Job(
        prompt=prompt,
        config=_fit(prompt, replace(config, constraint=plan.constraint), served, "messages"),
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        tools=plan.tools,
    )


def completion_job(data: dict[str, Any], served: Served) -> Job:
    body = read_body(data, CompletionBody)
    _check_model(body, served)
    _refuse_unsupported(body)
    if body.echo:
        raise APIError(400, "echo is not supported", "echo")
    if body.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    if body.best_of not in (None, 1):
        raise APIError(400, "best_of must be 1", "best_of")
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise APIError(400, "prompt must be one prompt: this server answers one", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        _check_length(len(prompt), served, "prompt")
        tokens = _encode(served, _text(prompt, "prompt"), "prompt") if prompt else []
    else:
        if any(not 0 <= t < served.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {served.vocab_size})", "prompt")
        tokens = list(prompt)
    config = _config(body, served, "max_tokens", body.max_tokens)
    try:
        constraint, _ = response_constraint(body.response_format)
        if constraint is not None:
            constraint.check(served.tokenizer)
    except OptionError as e:
        raise APIError(400, f"{e.option} {e.problem}", e.option) from e
    config = replace(config, constraint=constraint)
    return Job(
        prompt=tokens,
        config=_fit(tokens, config, served, "prompt"),
        logprobs=body.logprobs,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )
