"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens): the body is checked
with strict types, then becomes an OpenAI chat body (system turn, tool_use blocks as
tool_calls, tool_result blocks as tool messages, tools as functions) and the chat route's job;
the answer is written back in Anthropic's shape, whole or as its event stream (message_start,
content_block_start/delta/stop, message_delta, message_stop). Errors are
`{"type": "error", "error": {"type", "message"}}`."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from ..engine.scheduler import Event
from ..tokenizer import Tokenizer
from .protocol import APIError, ChatBody, Job, Served, _Strict, chat_job_of, read_body
from .tool_calls import PartialCall, read_calls

PATH = "/v1/messages"

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(e: APIError) -> dict[str, Any]:
    kind = ERROR_TYPES.get(e.status, "api_error" if e.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


# ------------------------------------------------------------------------------ bodies


class TextBlock(_Strict):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class AnthropicMessage(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class AnthropicTool(_Strict):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class CountBody(_Strict):
    expected: ClassVar[dict[str, str]] = {
        "content": "a string or a list of text, tool_use and tool_result blocks",
        "system": "a string or a list of text blocks",
    }
    model: str | None = None
    messages: list[AnthropicMessage]
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None


class MessagesBody(CountBody):
    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


def _texts(blocks: Sequence[TextBlock]) -> str:
    return "\n".join(b.text for b in blocks)


def _chat_messages(body: CountBody) -> list[dict[str, Any]]:
    """Anthropic's turns as OpenAI chat messages."""
    out: list[dict[str, Any]] = []
    if body.system:
        system = body.system if isinstance(body.system, str) else _texts(body.system)
        out.append({"role": "system", "content": system})
    for m in body.messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts = [b for b in m.content if isinstance(b, TextBlock)]
        calls = [b for b in m.content if isinstance(b, ToolUseBlock)]
        for r in (b for b in m.content if isinstance(b, ToolResultBlock)):
            content = r.content if isinstance(r.content, str) else _texts(r.content or [])
            if r.is_error:
                content = f"Error: {content}"
            out.append({"role": "tool", "tool_call_id": r.tool_use_id, "content": content})
        if texts or (not calls and m.role == "assistant"):
            out.append({"role": m.role, "content": _texts(texts)})
        if calls:
            tool_calls = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": json.dumps(c.input)}}
                for c in calls
            ]  # fmt: skip
            if out and out[-1]["role"] == "assistant" and "tool_calls" not in out[-1]:
                out[-1]["tool_calls"] = tool_calls
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": tool_calls})
    return out


def _tool_fields(body: CountBody) -> dict[str, Any]:
    if not body.tools:
        return {}
    tools = [
        {"type": "function",
         "function": {"name": t.name, "description": t.description, "parameters": t.input_schema}}
        for t in body.tools
    ]  # fmt: skip
    fields: dict[str, Any] = {"tools": tools}
    choice = body.tool_choice
    if choice is not None and choice.disable_parallel_tool_use is not None:
        fields["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise APIError(400, "tool_choice of type tool needs a name", "tool_choice.name")
            fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    return fields


def _chat_body(body: CountBody, **sampling: Any) -> ChatBody:
    if not body.messages:
        raise APIError(400, "messages must hold at least one message", "messages")
    fields = {
        "model": body.model,
        "messages": _chat_messages(body),
        **_tool_fields(body),
        **{k: v for k, v in sampling.items() if v is not None},
    }
    return ChatBody.model_validate(fields)


def messages_job(data: dict[str, Any], served: Served) -> Job:
    body = read_body(data, MessagesBody)
    if body.max_tokens < 1:
        raise APIError(400, "max_tokens must be at least 1", "max_tokens")
    if any(s == "" for s in body.stop_sequences or ()):
        raise APIError(400, "stop_sequences must not hold empty strings", "stop_sequences")
    chat = _chat_body(
        body,
        max_tokens=body.max_tokens,
        stop=body.stop_sequences,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stream=body.stream,
    )
    return chat_job_of(chat, served)


def count_tokens(data: dict[str, Any], served: Served) -> dict[str, int]:
    chat = _chat_body(read_body(data, CountBody))
    return {"input_tokens": len(chat_job_of(chat, served).prompt)}


# ------------------------------------------------------------------------------ answers


def tool_calls(job: Job, text: str, finish_reason: str | None) -> list[PartialCall] | None:
    """The tool calls an answer holds (None: it is text), read as the chat route reads them."""
    if job.tools is None or finish_reason != "stop":
        return None
    calls = read_calls(text, job.tools)
    return calls if calls and all(c.complete for c in calls) else None


class MessageShape:
    """One request's answer as Anthropic writes it: `whole(events)` or the stream's events. A
    request with tools is streamed whole at its end (its text cannot be shown before it is
    known to be text rather than a call)."""

    def __init__(self, model_id: str, job: Job, tokenizer: Tokenizer):
        self.model_id, self.job, self.tokenizer = model_id, job, tokenizer
        self.id = "msg_" + uuid.uuid4().hex
        self.tokens: list[int] = []
        self.text = ""

    def _stop(self, event: Event, calls: list[PartialCall] | None) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence) of the last event."""
        if calls:
            return "tool_use", None
        if event.finish_reason == "length":
            return "max_tokens", None
        text = self.tokenizer.decode(self.tokens)  # the answer with the stop string it hit
        hits = [(text.find(s), s) for s in self.job.config.stop if s in text]
        return ("stop_sequence", min(hits)[1]) if hits else ("end_turn", None)

    def _message(self, content: list[dict[str, Any]], stop: tuple[str | None, str | None],
                 output_tokens: int) -> dict[str, Any]:  # fmt: skip
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model_id,
            "content": content,
            "stop_reason": stop[0],
            "stop_sequence": stop[1],
            "usage": {"input_tokens": len(self.job.prompt), "output_tokens": output_tokens},
        }

    @staticmethod
    def _tool_use(call: PartialCall) -> dict[str, Any]:
        return {"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": call.name,
                "input": json.loads(call.arguments)}  # fmt: skip

    def whole(self, events: Sequence[Event]) -> dict[str, Any]:
        self.tokens = [e.token for e in events]
        text = "".join(e.text for e in events)
        last = events[-1]
        calls = tool_calls(self.job, text, last.finish_reason)
        content = [self._tool_use(c) for c in calls] if calls else [{"type": "text", "text": text}]
        return self._message(content, self._stop(last, calls), last.usage.completion_tokens)

    # ------------------------------------------------------------------ stream

    @staticmethod
    def sse(data: dict[str, Any]) -> str:
        return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def _block(self, index: int, block: dict[str, Any], delta: dict[str, Any] | None) -> list[str]:
        """A content block's start, its delta (if any) and its stop."""
        out = [self.sse({"type": "content_block_start", "index": index, "content_block": block})]
        if delta is not None:
            out.append(self.sse({"type": "content_block_delta", "index": index, "delta": delta}))
        return [*out, self.sse({"type": "content_block_stop", "index": index})]

    def opening(self) -> list[str]:
        start = {"type": "message_start", "message": self._message([], (None, None), 0)}
        out = [self.sse(start)]
        if self.job.tools is None:  # text as it comes
            block = {"type": "content_block_start", "index": 0,
                     "content_block": {"type": "text", "text": ""}}  # fmt: skip
            out.append(self.sse(block))
        return [*out, self.sse({"type": "ping"})]

    def chunks(self, event: Event) -> list[str]:
        self.tokens.append(event.token)
        self.text += event.text
        out = []
        if event.text and self.job.tools is None:
            delta = {"type": "text_delta", "text": event.text}
            out.append(self.sse({"type": "content_block_delta", "index": 0, "delta": delta}))
        if event.finish_reason is None:
            return out
        calls = tool_calls(self.job, self.text, event.finish_reason)
        if self.job.tools is None:
            out.append(self.sse({"type": "content_block_stop", "index": 0}))
        elif calls:
            for i, call in enumerate(calls):
                block = {**self._tool_use(call), "input": {}}
                delta = {"type": "input_json_delta", "partial_json": call.arguments}
                out += self._block(i, block, delta)
        else:
            delta = {"type": "text_delta", "text": self.text} if self.text else None
            out += self._block(0, {"type": "text", "text": ""}, delta)
        reason, sequence = self._stop(event, calls)
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        usage = {"output_tokens": event.usage.completion_tokens}
        out.append(self.sse({"type": "message_delta", "delta": delta, "usage": usage}))
        out.append(self.sse({"type": "message_stop"}))
        return out

    def failure(self, error: APIError) -> str:
        return self.sse(error_body(error))
