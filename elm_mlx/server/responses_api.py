"""OpenAI's Responses API (POST /v1/responses, what Codex-style tools speak): `input` as a string
or items (messages with text parts, function calls and their outputs), `instructions`,
`max_output_tokens`, sampling fields, `text.format`, function `tools` and `tool_choice`. The
body becomes an OpenAI chat body and the chat route's job; the answer is written back as a
response object, whole or as the reference's event stream (response.created, ...,
response.output_text.delta, ..., response.completed). With `store` (the default) a response is
kept in a bounded in-memory store, and `previous_response_id` continues its conversation."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..engine.scheduler import Event
from .protocol import APIError, ChatBody, Job, Served, _Strict, chat_job_of, read_body
from .responses import usage_json
from .tool_calls import new_call_id, read_calls

STORED_RESPONSES = 1024  # the newest responses kept for previous_response_id


# ------------------------------------------------------------------------------ bodies


class InputText(_Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(_Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None


class FunctionCallOutput(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str


class TextOptions(_Strict):
    format: dict[str, Any] | None = None


class ResponsesBody(_Strict):
    expected: ClassVar[dict[str, str]] = {
        "input": "a string or a list of messages, function_call and function_call_output items",
        "content": "a string or a list of input_text parts",
    }
    model: str | None = None
    input: str | list[InputMessage | FunctionCallItem | FunctionCallOutput]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: TextOptions | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None


# ------------------------------------------------------------------------------ the store


class ResponseStore:
    """The newest `size` responses' conversations (chat messages, the answer included), for
    previous_response_id. Read from the tokenizing threads, written on the event loop."""

    def __init__(self, size: int = STORED_RESPONSES):
        self.size = size
        self._items: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, response_id: str) -> list[dict[str, Any]]:
        with self._lock:
            if response_id not in self._items:
                raise APIError(
                    404,
                    f"no stored response has the id {response_id!r} (it was not stored, or is "
                    f"older than the newest {self.size})",
                    "previous_response_id",
                    "response_not_found",
                )
            self._items.move_to_end(response_id)
            return list(self._items[response_id])

    def put(self, response_id: str, messages: list[dict[str, Any]]) -> None:
        with self._lock:
            self._items[response_id] = messages
            while len(self._items) > self.size:
                self._items.popitem(last=False)


# ------------------------------------------------------------------------------ jobs


@dataclass(frozen=True)
class ResponsesJob:
    job: Job
    body: ResponsesBody
    messages: list[dict[str, Any]]  # the conversation without instructions, for the store


def _text_of(content: str | list[InputText]) -> str:
    return content if isinstance(content, str) else "\n".join(p.text for p in content)


def _input_messages(body: ResponsesBody) -> list[dict[str, Any]]:
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    out: list[dict[str, Any]] = []
    for item in body.input:
        if isinstance(item, InputMessage):
            out.append({"role": item.role, "content": _text_of(item.content)})
        elif isinstance(item, FunctionCallOutput):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        else:
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}  # fmt: skip
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
    return out


def _chat_fields(body: ResponsesBody) -> dict[str, Any]:
    """tools, tool_choice, parallel_tool_calls and text.format as the chat body has them."""
    fields: dict[str, Any] = {}
    if body.tools:
        fields["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in body.tools
        ]
    if isinstance(body.tool_choice, NamedFunction):
        fields["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    elif body.tool_choice is not None:
        fields["tool_choice"] = body.tool_choice
    if body.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = body.parallel_tool_calls
    fmt = body.text.format if body.text else None
    if fmt and fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "description", "strict") if k in fmt}
        fields["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt:
        fields["response_format"] = fmt
    return fields


def responses_job(data: dict[str, Any], served: Served, store: ResponseStore) -> ResponsesJob:
    body = read_body(data, ResponsesBody)
    past = store.get(body.previous_response_id) if body.previous_response_id else []
    messages = past + _input_messages(body)
    if not messages:
        raise APIError(400, "input must hold at least one item", "input")
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    chat = {
        "model": body.model,
        "messages": system + messages,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stream": body.stream,
        **_chat_fields(body),
    }
    try:
        job = chat_job_of(ChatBody.model_validate(chat), served)
    except APIError as e:  # name the Responses field, not the chat one
        renamed = {"max_completion_tokens": "max_output_tokens", "messages": "input",
                   "response_format": "text.format"}  # fmt: skip
        param = renamed.get(e.param or "", e.param)
        message = e.message.replace(e.param or "\0", param or "", 1)
        raise APIError(e.status, message, param, e.code, e.kind) from e
    return ResponsesJob(job, body, messages)


# ------------------------------------------------------------------------------ answers


class ResponseShape:
    """One request's answer as a response object, whole or as the stream's events. The output
    is a message, or the function calls the answer holds; a request with tools is streamed at
    its end (its text cannot be shown before it is known to be text rather than calls)."""

    def __init__(self, model_id: str, prepared: ResponsesJob, store: ResponseStore):
        self.model_id, self.prepared, self.store = model_id, prepared, store
        self.id = "resp_" + uuid.uuid4().hex
        self.item_id = "msg_" + uuid.uuid4().hex
        self.created = int(time.time())
        self.text = ""
        self.calls: list[dict[str, Any]] = []  # the function_call items, once known
        self.sequence = 0

    def response(self, status: str, event: Event | None = None) -> dict[str, Any]:
        body = self.prepared.body
        output = []
        if status != "in_progress":
            output = self.calls or [self._item("completed", [self._part()])]
        usage = None
        if event is not None:
            u = usage_json(event.usage)
            usage = {
                "input_tokens": u["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": event.usage.cached_tokens},
                "output_tokens": u["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u["total_tokens"],
            }
        incomplete = status == "incomplete"
        choice = body.tool_choice
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.model_id,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "store": body.store,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "text": {"format": (body.text.format if body.text else None) or {"type": "text"}},
            "tool_choice": choice.model_dump()
            if isinstance(choice, NamedFunction)
            else choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()],
            "usage": usage,
            "metadata": body.metadata or {},
        }

    def _part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": self.text, "annotations": []}

    def _item(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant",
                "content": content}  # fmt: skip

    def _finish(self, event: Event) -> dict[str, Any]:
        job = self.prepared.job
        if job.tools is not None and event.finish_reason == "stop":
            calls = read_calls(self.text, job.tools)
            if calls and all(c.complete for c in calls):
                self.calls = [
                    {"type": "function_call", "id": "fc_" + uuid.uuid4().hex, "call_id":
                     new_call_id(), "name": c.name, "arguments": c.arguments,
                     "status": "completed"}
                    for c in calls
                ]  # fmt: skip
        status = "incomplete" if event.finish_reason == "length" else "completed"
        response = self.response(status, event)
        if self.prepared.body.store:
            self.store.put(self.id, [*self.prepared.messages, self._answer()])
        return response

    def _answer(self) -> dict[str, Any]:
        """The answer as a chat message, for the conversation's next turn."""
        if not self.calls:
            return {"role": "assistant", "content": self.text}
        calls = [
            {"id": c["call_id"], "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in self.calls
        ]  # fmt: skip
        return {"role": "assistant", "content": None, "tool_calls": calls}

    def whole(self, events: Sequence[Event]) -> dict[str, Any]:
        self.text = "".join(e.text for e in events)
        return self._finish(events[-1])

    # ------------------------------------------------------------------ stream

    def sse(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def _message_start(self) -> list[str]:
        empty = {"type": "output_text", "text": "", "annotations": []}
        return [
            self.sse("response.output_item.added", output_index=0,
                     item=self._item("in_progress", [])),
            self.sse("response.content_part.added", **self._where(), part=empty),
        ]  # fmt: skip

    def _delta(self, text: str) -> str:
        return self.sse("response.output_text.delta", **self._where(), delta=text, logprobs=[])

    def opening(self) -> list[str]:
        out = [
            self.sse("response.created", response=self.response("in_progress")),
            self.sse("response.in_progress", response=self.response("in_progress")),
        ]
        return out + (self._message_start() if self.prepared.job.tools is None else [])

    def chunks(self, event: Event) -> list[str]:
        tools = self.prepared.job.tools is not None
        out = []
        if event.text:
            self.text += event.text
            if not tools:
                out.append(self._delta(event.text))
        if event.finish_reason is None:
            return out
        response = self._finish(event)
        for i, call in enumerate(self.calls):
            added = {**call, "arguments": "", "status": "in_progress"}
            where = {"item_id": call["id"], "output_index": i}
            out += [
                self.sse("response.output_item.added", output_index=i, item=added),
                self.sse("response.function_call_arguments.delta", **where,
                         delta=call["arguments"]),
                self.sse("response.function_call_arguments.done", **where,
                         arguments=call["arguments"]),
                self.sse("response.output_item.done", output_index=i, item=call),
            ]  # fmt: skip
        if not self.calls:
            if tools:  # text after all, held back until now
                out += self._message_start() + ([self._delta(self.text)] if self.text else [])
            part = self._part()
            out += [
                self.sse("response.output_text.done", **self._where(), text=self.text,
                         logprobs=[]),
                self.sse("response.content_part.done", **self._where(), part=part),
                self.sse("response.output_item.done", output_index=0,
                         item=self._item("completed", [part])),
            ]  # fmt: skip
        return [*out, self.sse(f"response.{response['status']}", response=response)]

    def failure(self, error: APIError) -> str:
        error_json = {"code": error.code or error.kind, "message": error.message}
        return self.sse("response.failed", response={**self.response("failed"),
                                                     "error": error_json})  # fmt: skip
