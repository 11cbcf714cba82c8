"""The OpenAI response shapes: a whole answer or stream chunks, for chat completions and for
(legacy) text completions, whose logprobs differ: chat lists one entry per token with its top
alternatives; completions give parallel lists (tokens, token_logprobs, top_logprobs as dicts,
text_offset)."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from ..engine.scheduler import Event, Usage
from ..tokenizer import Tokenizer

Kind = Literal["chat", "completion"]
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenText:
    """Token id -> its text and bytes, as logprobs show them (cached: the vocabulary is small).
    A token holding part of a UTF-8 character decodes to U+FFFD; its bytes are still exact:
    a SentencePiece byte-fallback token names its byte (`<0xE2>`), a byte-level BPE token
    spells its bytes in GPT-2's byte alphabet."""

    def __init__(self, tokenizer: Tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        self._byte_of = {c: b for b, c in bytes_to_unicode().items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            text = self.tokenizer.decode([token])
            self._cache[token] = (text, self._bytes(token, text))
        return self._cache[token]

    def _bytes(self, token: int, text: str) -> list[int]:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str) and (m := _BYTE_TOKEN.fullmatch(piece)):
            return [int(m.group(1), 16)]
        if isinstance(piece, str) and piece and all(c in self._byte_of for c in piece):
            raw = bytes(self._byte_of[c] for c in piece)
            if raw.decode("utf-8", "replace") == text:  # it is a byte-level token
                return list(raw)
        return list(text.encode("utf-8"))


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class Shape:
    """Builds the JSON of one request's answer: `whole(...)` or `chunk(...)`s."""

    def __init__(self, kind: Kind, model_id: str, token_text: TokenText, include_usage: bool):
        self.kind, self.model_id, self.token_text = kind, model_id, token_text
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._offset = 0  # completions' text_offset of the next token

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model_id}

    # ------------------------------------------------------------------ logprobs

    def _chat_entry(self, token: int, logprob: float) -> dict[str, Any]:
        text, raw = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": raw}

    def logprobs(self, events: Sequence[Event]) -> dict[str, Any] | None:
        """The logprobs object of these tokens (None when the request asked for none)."""
        events = [e for e in events if e.logprob is not None]
        if not events:
            return None
        if self.kind == "chat":
            content = []
            for e in events:
                entry = self._chat_entry(e.token, e.logprob)
                entry["top_logprobs"] = [self._chat_entry(t, lp) for t, lp in e.top_logprobs]
                content.append(entry)
            return {"content": content}
        tokens, offsets = [], []
        for e in events:
            text = self.token_text(e.token)[0]
            tokens.append(text)
            offsets.append(self._offset)
            self._offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [
                {self.token_text(t)[0]: lp for t, lp in e.top_logprobs} for e in events
            ],
            "text_offset": offsets,
        }

    # ------------------------------------------------------------------ whole answers

    def whole(self, events: Sequence[Event]) -> dict[str, Any]:
        last = events[-1]
        text = "".join(e.text for e in events)
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = self.logprobs(events)
        choice["finish_reason"] = last.finish_reason
        body = self._head("chat.completion" if self.kind == "chat" else "text_completion")
        body["choices"] = [choice]
        body["usage"] = usage_json(last.usage)
        return body

    # ------------------------------------------------------------------ stream chunks

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        body = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        body["choices"] = [] if choice is None else [choice]
        if self.include_usage:
            body["usage"] = None
        return body

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role."""
        if self.kind != "chat":
            return None
        delta = {"role": "assistant", "content": ""}
        return self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None})

    def chunks(self, event: Event) -> list[dict[str, Any]]:
        """The chunks of one event: its text (with logprobs) when there is any, then, on the
        last event, the finish reason and (when asked for) the usage."""
        out = []
        logprobs = self.logprobs([event])
        if event.text or logprobs is not None:
            choice: dict[str, Any] = {"index": 0}
            if self.kind == "chat":
                choice["delta"] = {"content": event.text}
            else:
                choice["text"] = event.text
            choice.update(logprobs=logprobs, finish_reason=None)
            out.append(self._chunk(choice))
        if event.finish_reason is not None:
            end: dict[str, Any] = {"index": 0}
            if self.kind == "chat":
                end["delta"] = {}
            else:
                end["text"] = ""
            end.update(logprobs=None, finish_reason=event.finish_reason)
            out.append(self._chunk(end))
            if self.include_usage:
                out.append({**self._chunk(None), "usage": usage_json(event.usage)})
        return out
