"""`elm chat`: a conversation in the terminal (or one message per line from a pipe)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

from ..convert.hub_cache import DEFAULT_BITS, cache_root, ensure_model
from ..engine.config import GenerationConfig
from ..errors import ChatError, ElmError, OptionError
from .constraint_options import JsonSchema, constraint_spec, schema_spec
from .options import (
    KV_FIELDS,
    Adapter,
    ChatTemplate,
    HfToken,
    HubBits,
    HubQuantize,
    generation_options,
    model_name,
)
from .terminal import Interrupts, LineReader, Printer, Style

if TYPE_CHECKING:
    from ..engine.chat_session import ChatSession
HELP = '''commands:
  /help              this list
  /reset             forget the conversation (the system prompt stays)
  /system [TEXT]     show the system prompt, or replace it
  /save FILE         write the conversation as JSON messages
  /load FILE         continue a conversation written by /save
  /stats             tokens, speed, memory and cache size
  /set NAME VALUE    change temp, top_p, top_k, min_p, max_tokens, repetition_penalty, seed
  /set json_schema FILE|none   answers are JSON valid against the schema in FILE (or free)
  /quit              leave (Ctrl-D too)
Ctrl-C stops an answer. A paste of several lines is one message; so is text between two
lines holding only """.'''
# `/set NAME VALUE`: the GenerationConfig fields a chat may change, and how to read the value.
SETTINGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "temp": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "min_p": ("min_p", float),
    "max_tokens": ("max_tokens", int),
    "repetition_penalty": ("repetition_penalty", float),
    "seed": ("seed", int),
    "json_schema": ("constraint", schema_spec),
}
NULLABLE = {"repetition_penalty", "seed", "json_schema"}  # these also take "none"


def answer(
    session: ChatSession, text: str, printer: Printer, notices: TextIO, interrupts: Interrupts
) -> None:
    """Stream the answer to `text`; afterwards a dim line with the turn's numbers. Ctrl-C stops
    it (see `Interrupts`); one pressed since the message was entered means no answer at all."""
    style = printer.style
    if interrupts.pending:
        notices.write(f"{style.dim}(stopped before the answer began){style.off}\n")
        return
    stream = session.send(text)
    started = False
    try:
        interrupts.arm(stream)
        for r in stream:
            if not started and session.dropped:
                notices.write(
                    f"{style.dim}(context full: dropped the {session.dropped} oldest "
                    f"messages; the system prompt is kept){style.off}\n"
                )
            started = True
            printer.write(r.text, r.generation_tps)
            if interrupts.stop:
                break
        interrupts.disarm()
    except KeyboardInterrupt:
        if not interrupts.installed:  # a script: Ctrl-C ends it (see `command`)
            raise
        # else a second Ctrl-C: the handler disarmed itself before raising it
    finally:
        stream.close()  # the session settles its cache and keeps the partial answer
    printer.write("\n")
    turn = session.stats.last
    if not started:
        notices.write(f"{style.dim}(stopped before the answer began){style.off}\n")
    elif turn is not None:
        end = {"length": " · max_tokens reached", "interrupted": " · interrupted"}
        notices.write(
            f"{style.dim}[{turn.generation_tokens} tokens, {turn.generation_tps:.1f} "
            f"tok/s · prompt {turn.prompt_tokens} new + {turn.reused_tokens} cached tokens, "
            f"{turn.prompt_seconds:.2f} s{end.get(turn.finish_reason, '')}]{style.off}\n"
        )
    notices.flush()


def stats_text(session: ChatSession) -> str:
    import mlx.core as mx

    s, c, last = session.stats, session.config, session.stats.last
    lines = [
        f"conversation: {len(session.messages)} messages; context {len(session.cache_tokens)} "
        f"of {session.context_length} tokens",
        f"cache: {len(session.cache_tokens)} tokens, {session.cache_nbytes / 1e6:.1f} MB",
        f"memory: {mx.get_active_memory() / 1e9:.2f} GB in use, "
        f"{(last.peak_memory if last else 0):.2f} GB peak in the last turn",
        f"settings: temp {c.temperature}, top_p {c.top_p}, top_k {c.top_k}, min_p {c.min_p}, "
        f"max_tokens {c.max_tokens}, repetition_penalty {c.repetition_penalty}, seed {c.seed}",
    ]
    if last:
        lines.append(
            f"last turn: prompt {last.prompt_tokens} new + {last.reused_tokens} cached tokens in "
            f"{last.prompt_seconds:.2f} s ({last.prompt_tps:.1f} tok/s); "
            f"{last.generation_tokens} tokens at {last.generation_tps:.1f} tok/s"
        )
        rate = s.generation_tokens / s.generation_seconds if s.generation_seconds else 0.0
        lines.append(
            f"session: {s.turns} turns; {s.prompt_tokens} prompt tokens processed, "
            f"{s.reused_tokens} reused from the cache; {s.generation_tokens} tokens generated "
            f"({rate:.1f} tok/s overall)"
        )
    return "\n".join(lines)


def set_option(session: ChatSession, name: str, value: str) -> None:
    """`/set NAME VALUE`: the session's generation options, changed only if the value is valid."""
    if name not in SETTINGS:
        raise ChatError(f"/set knows {', '.join(SETTINGS)}, not {name!r}")
    field, kind = SETTINGS[name]
    try:
        parsed = None if name in NULLABLE and value.lower() == "none" else kind(value)
    except ValueError as e:
        raise ChatError(f"/set {name}: {value!r} is not a {kind.__name__}") from e
    except OptionError as e:  # a schema file that cannot be read or used
        raise ChatError(f"/set {name} {value}: {e.problem}") from e
    config = replace(session.config, **{field: parsed})
    try:
        config.validate()
    except OptionError as e:
        raise ChatError(f"/set {name} {e.problem}") from e
    if config.max_tokens < 1:
        raise ChatError("/set max_tokens must be at least 1")
    session.config = config


def show_help(session: ChatSession, arg: str, out: TextIO) -> None:
    out.write(HELP + "\n")


def reset_conversation(session: ChatSession, arg: str, out: TextIO) -> None:
    session.reset()
    out.write("(conversation cleared)\n")


def show_or_set_system(session: ChatSession, arg: str, out: TextIO) -> None:
    if arg:
        session.set_system(arg)
        out.write("(system prompt set)\n")
    else:
        out.write(f"{session.system or '(no system prompt)'}\n")


def save_conversation(session: ChatSession, arg: str, out: TextIO) -> None:
    if not arg:
        out.write("usage: /save FILE\n")
        return
    out.write(f"(saved {len(session.messages)} messages to {session.save(arg)})\n")


def load_conversation(session: ChatSession, arg: str, out: TextIO) -> None:
    if not arg:
        out.write("usage: /load FILE\n")
        return
    session.load(arg)
    out.write(f"(loaded {len(session.messages)} messages from {arg})\n")


def show_stats(session: ChatSession, arg: str, out: TextIO) -> None:
    out.write(stats_text(session) + "\n")


def set_command(session: ChatSession, arg: str, out: TextIO) -> None:
    words = arg.split()
    if len(words) != 2:
        out.write("usage: /set temp|top_p|top_k|min_p|max_tokens|... VALUE\n")
        return
    set_option(session, *words)
    out.write(f"({' = '.join(words)})\n")


# What each /command does with the session, the text after it, and where to write.
ACTIONS: dict[str, Callable[[ChatSession, str, TextIO], None]] = {
    "/help": show_help,
    "/reset": reset_conversation,
    "/system": show_or_set_system,
    "/save": save_conversation,
    "/load": load_conversation,
    "/stats": show_stats,
    "/set": set_command,
}
LEAVE = ("/quit", "/exit")
COMMANDS = (*ACTIONS, *LEAVE)  # what Tab completes


def run_command(session: ChatSession, line: str, out: TextIO) -> bool:
    """One /command; False means leave."""
    name, _, arg = line.strip().partition(" ")
    if name in LEAVE:
        return False
    action = ACTIONS.get(name)
    if action is None:
        out.write(f"unknown command {line.strip()!r}; /help lists them\n")
    else:
        action(session, arg.strip(), out)
    return True


def interactive(session: ChatSession, title: str, history: Path) -> None:
    style = Style(sys.stdout.isatty() and "NO_COLOR" not in os.environ)
    print(f"{title}\n/help lists the commands; Ctrl-C stops an answer, Ctrl-D leaves.")
    with Interrupts() as interrupts:
        reader = LineReader(history, COMMANDS, bool(style.bold), interrupts.prompt_drawn)
        while True:
            try:
                text = reader.read()
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line
                continue
            except EOFError:
                return
            printer = Printer(sys.stdout, style, live=bool(style.dim))
            if not turn(session, text, printer, sys.stdout, interrupts):
                return


def scripted(session: ChatSession, lines: TextIO) -> None:
    """One message per line; answers on stdout, everything else on stderr."""
    interrupts = Interrupts()  # not installed: Ctrl-C ends a script
    for line in lines:
        printer = Printer(sys.stdout, Style(False), False)
        if not turn(session, line.rstrip("\n"), printer, sys.stderr, interrupts):
            return


def turn(
    session: ChatSession, text: str, printer: Printer, notices: TextIO, interrupts: Interrupts
) -> bool:
    """A command or a message; a library error (a bad value, an unreadable file) is reported
    and the chat goes on. False means leave."""
    try:
        if text.startswith("/"):
            return run_command(session, text, notices)
        if text.strip():
            answer(session, text, printer, notices, interrupts)
    except ElmError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
    return True


def start_from_file(session: ChatSession, path: Path, name: str) -> None:
    """Load a prompt cache file into the session (refused if made for another model or other
    KV settings); warn when the conversation does not start with all of its tokens."""
    from ..engine import prompt_file as files

    tokens, layers, start = files.load(path, name, session.model, session.config.kv_config())
    shared = session.start_from(tokens, layers, start)
    if shared < len(tokens):
        print(
            f"warning: only {shared} of the {len(tokens)} tokens of {path} start this chat's "
            "prompt; the rest is not used (make it with elm cache-prompt --chat and the same "
            "--system text)",
            file=sys.stderr,
        )


@generation_options(
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
    "prompt_lookup", "max_ngram",
    *KV_FIELDS,
)  # fmt: skip
def command(
    model: Annotated[
        str, typer.Option("--model", "-m", help="MLX model folder, HF checkpoint or hub id.")
    ],
    adapter: Adapter = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    chat_template: ChatTemplate = None,
    max_context: Annotated[
        int | None,
        typer.Option(help="Context length in tokens (default: the model's); older turns drop."),
    ] = None,
    bits: HubBits = DEFAULT_BITS,
    quantize: HubQuantize = True,
    hf_token: HfToken = None,
    json_schema: JsonSchema = None,
    prompt_cache_file: Annotated[
        Path | None,
        typer.Option(
            help="Start from the prompt in this file (elm cache-prompt --chat with the same "
            "--system): its tokens are not processed again."
        ),
    ] = None,
    *,
    config: GenerationConfig,
) -> None:
    """Chat with a model in the terminal. The conversation's KV cache is kept, so each turn
    processes only its new tokens. A hub id is converted once into ~/.cache/elm-mlx (or
    $ELM_MLX_CACHE). With standard input not a terminal, each line is one message and the
    answers go to stdout. --json-schema FILE makes every answer JSON valid against it."""
    from ..engine.chat_session import ChatSession, load_template
    from ..loader import load

    config = replace(config, constraint=constraint_spec(json_schema))
    template = load_template(chat_template) if chat_template else None
    try:
        path = ensure_model(model, quantize=quantize, bits=bits, token=hf_token)
        lm, tokenizer = load(path, adapter_path=adapter)
        session = ChatSession(
            lm, tokenizer, system=system, template=template, config=config, max_context=max_context
        )
        if prompt_cache_file is not None:
            start_from_file(session, prompt_cache_file, model_name(model, adapter))
        if sys.stdin.isatty():
            title = f"elm chat · {path.name} · context {session.context_length} tokens"
            interactive(session, title, cache_root() / "chat_history")
        else:
            scripted(session, sys.stdin)
    except KeyboardInterrupt:  # while converting or loading, or in a script: just stop
        raise typer.Exit(130) from None
