"""The answer of a request with tools: the calls read from the generated text (the layout
tools.py's grammar fixes) become `message.tool_calls` with finish_reason "tool_calls", whole or
streamed as OpenAI streams them: per call a delta with its index, id, type and name, then its
arguments in pieces as they are generated."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any

from ..engine.scheduler import Event
from .responses import Shape, usage_json
from .tools import ToolPlan


def _json_end(text: str, start: int) -> int | None:
    """The index just past the JSON object or array that begins at `start` (None: not yet)."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


@dataclass
class PartialCall:
    name: str
    arguments: str  # as much as has been generated
    complete: bool


def read_calls(text: str, plan: ToolPlan) -> list[PartialCall] | None:
    """The calls in (a prefix of) an answer; None: the answer is text, not calls. A call
    whose arguments are still open is returned incomplete."""
    fmt, calls, pos = plan.format, [], 0
    while pos < len(text):
        if calls:
            if not text.startswith("\n", pos):
                break
            pos += 1
        name = next((n for n in plan.names if text.startswith(fmt.head(n), pos)), None)
        if name is None:
            started = any(fmt.head(n).startswith(text[pos:]) for n in plan.names)
            if not calls and not started:
                return None
            break
        start = pos + len(fmt.head(name))
        end = _json_end(text, start)
        calls.append(PartialCall(name, text[start:end], end is not None))
        if end is None:
            break
        pos = end + len("}" + fmt.suffix)
    return calls


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolShape(Shape):
    """Shape for a request with tools: calls become `message.tool_calls`."""

    def __init__(self, shape: Shape, plan: ToolPlan):
        self.__dict__.update(shape.__dict__)
        self.plan = plan
        self._text = ""
        self._sent: list[tuple[str, int]] = []  # per call streamed: its id, argument chars sent
        self._content_sent = 0
        self._is_text: bool | None = None

    def whole(self, events: list[Event]) -> dict[str, Any]:
        body = super().whole(events)
        text = "".join(e.text for e in events)
        calls = read_calls(text, self.plan)
        if calls and all(c.complete for c in calls) and events[-1].finish_reason == "stop":
            choice = body["choices"][0]
            choice["message"] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": new_call_id(),
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments},
                    }
                    for c in calls
                ],
            }
            choice["finish_reason"] = "tool_calls"
        return body

    def chunks(self, event: Event) -> list[dict[str, Any]]:
        self._text += event.text
        if self._is_text:
            return super().chunks(event)
        calls = read_calls(self._text, self.plan)
        if calls is None:  # text after all: what was held back goes out with this event
            self._is_text = True
            return super().chunks(replace(event, text=self._text))
        out = []
        for index, call in enumerate(calls):
            delta: dict[str, Any]
            if index == len(self._sent):
                self._sent.append((new_call_id(), 0))
                call_id, _ = self._sent[index]
                delta = {
                    "index": index,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
                out.append(self._tool_delta(delta))
            call_id, sent = self._sent[index]
            if len(call.arguments) > sent:
                piece = call.arguments[sent:]
                self._sent[index] = (call_id, len(call.arguments))
                out.append(self._tool_delta({"index": index, "function": {"arguments": piece}}))
        if event.finish_reason is not None:
            done = calls and all(c.complete for c in calls) and event.finish_reason == "stop"
            reason = "tool_calls" if done else event.finish_reason
            end = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
            out.append(self._chunk(end))
            if self.include_usage:
                out.append({**self._chunk(None), "usage": usage_json(event.usage)})
        return out

    def _tool_delta(self, call: dict[str, Any]) -> dict[str, Any]:
        choice = {
            "index": 0,
            "delta": {"tool_calls": [call]},
            "logprobs": None,
            "finish_reason": None,
        }
        return self._chunk(choice)
