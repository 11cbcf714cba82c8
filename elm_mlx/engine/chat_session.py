"""A conversation with a model whose KV cache is kept between turns.

Each turn renders the whole conversation with the chat template, tokenizes it and generates on
the scheduler (a batch of one) with the session's own prompt cache, as `elm serve` keeps a
conversation: the turn reuses the longest prefix the cache shares with it and feeds only the
rest, so a turn's prompt cost is its new tokens, not the history. The common prefix also covers
every other change (an edited system prompt, turns dropped when the context is full, a loaded
conversation, an answer whose text re-tokenizes differently).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx

from ..errors import ChatError, OutputError
from ..models import CausalLM, context_length
from ..tokenizer import Tokenizer, common_prefix, encode_prompt, render_chat
from .config import GenerationConfig
from .generation import GenerationResponse, stream_generate
from .prompt_cache import PromptCache

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


def read_messages(path: str | Path) -> list[Message]:
    """The messages of a conversation file: `{"messages": [...]}` (what /save writes) or a list."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ChatError(f"cannot read {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatError(f"{path} is not valid JSON ({e}); give a file written by /save") from e
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list):
        raise ChatError(f'{path}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
    for i, m in enumerate(messages):
        if not (
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
        ):
            raise ChatError(
                f"{path}: message {i} must be {{'role': one of {', '.join(ROLES)}, "
                f"'content': text}}, got {str(m)[:80]}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load_template(path: str | Path) -> str:
    """A Jinja chat template from a file: the template itself, or a JSON file (such as
    tokenizer_config.json) holding it under "chat_template"."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatError(f"cannot read the chat template {path}: {e}") from e
    if path.suffix == ".json":
        try:
            text = json.loads(text)["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ChatError(f"{path} holds no 'chat_template' string") from e
    if not isinstance(text, str) or not text.strip():
        raise ChatError(f"the chat template {path} is empty")
    return text


@dataclass
class TurnStats:
    prompt_tokens: int  # fed to the model this turn
    reused_tokens: int  # whose keys and values came from the cache
    prompt_seconds: float  # until the first new token
    generation_tokens: int
    generation_seconds: float
    peak_memory: float  # GB
    finish_reason: str  # "stop" | "length" | "interrupted"

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        # the first token belongs to the prompt time
        n, t = self.generation_tokens - 1, self.generation_seconds
        return n / t if n > 0 and t > 0 else 0.0


@dataclass
class ChatStats:
    turns: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_tokens: int = 0
    generation_seconds: float = 0.0
    last: TurnStats | None = None

    def add(self, turn: TurnStats) -> None:
        self.turns += 1
        self.prompt_tokens += turn.prompt_tokens
        self.reused_tokens += turn.reused_tokens
        self.prompt_seconds += turn.prompt_seconds
        self.generation_tokens += turn.generation_tokens
        self.generation_seconds += turn.generation_seconds
        self.last = turn


class ChatSession:
    """Messages, a chat template, generation options and the KV cache that goes with them.

    `send(text)` streams the answer as `GenerationResponse`s; stopping the iteration early
    (Ctrl-C) keeps the partial answer in the conversation and the cache consistent.
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        *,
        system: str | None = None,
        template: str | None = None,
        config: GenerationConfig | None = None,
        max_context: int | None = None,
    ):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.config = config or GenerationConfig()
        self.config.validate()
        limit = context_length(model)
        self.context_length = min(max_context, limit) if max_context else limit
        self.messages: list[Message] = []
        self.set_system(system)
        self.cache = PromptCache(max_entries=1)  # the conversation so far
        self.stats = ChatStats()
        self.dropped = 0  # messages the current (or last) turn dropped to fit the context

    # ------------------------------------------------------------------ conversation

    @property
    def system(self) -> str | None:
        if self.messages and self.messages[0]["role"] == "system":
            return self.messages[0]["content"]
        return None

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt (None or "" removes it); the conversation is kept."""
        if self.system is not None:
            self.messages.pop(0)
        if text:
            self.messages.insert(0, {"role": "system", "content": text})

    def reset(self) -> None:
        """Forget the conversation, keeping the system prompt (and its cached tokens)."""
        system = self.system
        self.messages = []
        self.set_system(system)

    def save(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        text = json.dumps({"messages": self.messages}, indent=2, ensure_ascii=False) + "\n"
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
        return path

    def load(self, path: str | Path) -> None:
        """Replace the conversation with a saved one; the next turn reuses the common prefix."""
        self.messages = read_messages(path)

    def start_from(
        self, tokens: list[int], layers: list[tuple[mx.array, mx.array]], start: int = 0
    ) -> int:
        """Put a prompt computed before (a prompt cache file made under this session's KV
        settings: per layer keys, values (1, H, len(tokens), D), serving prefixes from `start`
        on) in the cache, so that turns reuse whatever prefix of it their prompt shares
        (answers are unchanged). Returns how many of its tokens start the conversation as it
        is now rendered."""
        self.cache.insert(tokens, layers, self.config.kv_config(), start)
        try:
            return common_prefix(tokens, self.tokens())
        except ChatError:  # a template that wants a user message: nothing to compare yet
            return len(tokens)

    # ------------------------------------------------------------------ prompt

    def render(self, add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        try:
            return render_chat(
                self.tokenizer, self.messages, self.model.model_type, self.template,
                add_generation_prompt,
            )  # fmt: skip
        except TemplateError as e:
            raise ChatError(f"the chat template failed on this conversation: {e}") from e

    def tokens(self) -> list[int]:
        """The whole conversation, rendered for the next answer, as token ids."""
        return encode_prompt(self.tokenizer, self.render())

    def fit(self) -> int:
        """Drop the oldest turns (never the system prompt or the last message) until the prompt
        plus `max_tokens` fits the context; return how many messages were dropped."""
        start = 1 if self.system is not None else 0
        dropped = 0
        while len(self.tokens()) + self.config.max_tokens > self.context_length:
            end = start + 1  # the oldest turn: a message and the answers after it
            while end < len(self.messages) and self.messages[end]["role"] != "user":
                end += 1
            if end >= len(self.messages):
                break
            del self.messages[start:end]
            dropped += end - start
        return dropped

    # ------------------------------------------------------------------ generation

    def send(self, text: str) -> Iterator[GenerationResponse]:
        """Add a user message and stream the answer (see `stream`)."""
        self.messages.append({"role": "user", "content": text})
        return self.stream()

    def stream(self) -> Iterator[GenerationResponse]:
        """Answer the last (user) message. The answer joins the conversation, also when the
        caller stops early; when nothing was generated the question is withdrawn instead.
        Before the prompt is processed, `dropped` tells how many old messages made room."""
        if not self.messages or self.messages[-1]["role"] != "user":
            raise ChatError("there is no user message to answer")
        pieces: list[str] = []
        last = None
        tokens: list[int] = []
        stream = None
        tic = first = time.perf_counter()
        try:
            self.dropped = self.fit()
            tokens = self.tokens()
            room = self.context_length - len(tokens)
            if room < 1:
                raise ChatError(
                    f"the conversation is {len(tokens)} tokens and the context holds "
                    f"{self.context_length}: send a shorter message"
                )
            config = replace(self.config, max_tokens=min(self.config.max_tokens, room))
            mx.reset_peak_memory()
            tic = time.perf_counter()
            stream = stream_generate(
                self.model, self.tokenizer, tokens, config, prompt_cache=self.cache
            )
            for last in stream:
                if not pieces:
                    first = time.perf_counter()
                pieces.append(last.text)
                yield last
        finally:
            if stream is not None:
                stream.close()  # now: its KV entries go to the cache
            if last is not None:
                self.messages.append({"role": "assistant", "content": "".join(pieces)})
                self.stats.add(
                    TurnStats(
                        prompt_tokens=len(tokens) - last.cached_tokens,
                        reused_tokens=last.cached_tokens,
                        prompt_seconds=first - tic,
                        generation_tokens=last.generation_tokens,
                        generation_seconds=time.perf_counter() - first,
                        peak_memory=mx.get_peak_memory() / 1e9,
                        finish_reason=last.finish_reason or "interrupted",
                    )
                )
            else:
                self.messages.pop()

    # ------------------------------------------------------------------ numbers

    @property
    def cache_tokens(self) -> list[int]:
        """The tokens whose keys and values the cache holds."""
        return self.cache.tokens()

    @property
    def cache_nbytes(self) -> int:
        return self.cache.nbytes
