"""Terminal handling for `elm chat`: styles, the streaming printer with its live tokens/s,
Ctrl-C (one handler for the whole session), and the prompt (prompt_toolkit: line editing,
history, completion, multi-line paste)."""

from __future__ import annotations

import inspect
import shutil
import signal
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO


class Style:
    def __init__(self, enabled: bool):
        self.dim, self.bold, self.off = ("\x1b[2m", "\x1b[1m", "\x1b[0m") if enabled else ("",) * 3


class Printer:
    """Streams an answer; on a terminal the running tokens/s trail the text, dimmed, and are
    erased before the next piece (saved and restored cursor, so only on the current line)."""

    def __init__(self, out: TextIO, style: Style, live: bool):
        self.out, self.style, self.live = out, style, live
        self.width = shutil.get_terminal_size().columns
        self.column = 0  # display cells since the last newline
        self.shown = False

    def write(self, text: str, rate: float = 0.0) -> None:
        if self.shown:
            self.out.write("\x1b[K")
            self.shown = False
        self.out.write(text)
        for ch in text:
            if ch == "\n":
                self.column = 0
            elif not unicodedata.combining(ch):
                self.column += 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        at = self.column % self.width
        label = f"  {rate:.1f} tok/s"
        if self.live and rate > 0 and (at or not self.column) and at + len(label) < self.width:
            self.out.write(f"\x1b7{self.style.dim}{label}{self.style.off}\x1b8")
            self.shown = True
        self.out.flush()


class Interrupts:
    """The one SIGINT handler of an interactive chat, installed for the whole session.

    At the prompt the terminal is in raw mode (`LineReader`): a Ctrl-C there is a key, read in
    order with the keys around it, never a signal. Anywhere else it is a SIGINT, and what it
    does depends only on this object's state, which the main thread changes by plain
    assignments (a Python signal handler runs in the main thread between two bytecodes, so it
    never meets a half-changed state), and there is no moment without this handler:

    - while an answer streams (`arm` .. `disarm`): the first Ctrl-C asks it to stop at the next
      token; a further one raises KeyboardInterrupt at once, and only once: the handler disarms
      itself before raising, so the answer's clean-up (the session keeps the partial answer
      and a cache that matches it) and what follows it run to the end;
    - at any other moment (the answer stopping, its numbers printed, a /command, the prompt
      being set up or taken down): it is kept in `pending`. The prompt clears it when it is
      drawn (a prompt is what that Ctrl-C asked for); an answer about to start is not started.
    """

    def __init__(self) -> None:
        self.installed = False
        self.answering = False
        self.stop = False
        self.pending = False
        self.stream: Iterator[object] | None = None

    def __enter__(self) -> Interrupts:
        self.previous = signal.signal(signal.SIGINT, self._handle)
        self.installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self.previous)
        self.installed = False

    def _handle(self, signum: int, frame: object) -> None:
        if not self.answering:
            self.pending = True
        elif not self.stop or not started(self.stream):
            self.stop = True
        else:
            self.answering = False
            raise KeyboardInterrupt

    def arm(self, stream: Iterator[object]) -> None:
        """An answer starts streaming from `stream`."""
        self.stream, self.stop = stream, False
        self.answering = True

    def disarm(self) -> None:
        self.answering = False
        self.stream = None

    def prompt_drawn(self) -> None:
        self.pending = False


def started(stream: Iterator[object] | None) -> bool:
    """Whether a generator runs or waits at a yield. One interrupted before its first step
    could not clean up (its `finally` never runs), so a Ctrl-C then only asks it to stop."""
    return not inspect.isgenerator(stream) or (
        inspect.getgeneratorstate(stream) != inspect.GEN_CREATED
    )


class LineReader:
    """The prompt: prompt_toolkit's line editing, history in a file, Tab completes commands.

    While a line is edited the terminal is in raw mode, so Ctrl-C arrives as a key, in order
    with the keys typed before and after it: it clears the line (KeyboardInterrupt), and Ctrl-D
    on an empty line leaves (EOFError). (Python's readline gets Ctrl-C as a SIGINT and waits in
    a select() that such a signal interrupts only if it comes once that wait has begun; one
    that came while the prompt was drawn waited for the next key.)
    A paste of several lines is one message: with bracketed paste (most terminals) it is
    inserted as it is; without, an Enter with more keys already read inserts a newline. A line
    holding only three double quotes starts a message of several lines, up to the next one.
    """

    def __init__(
        self, history: Path, commands: Sequence[str], bold: bool, on_draw: Callable[[], None]
    ):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.completion import WordCompleter
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.shortcuts import CompleteStyle

        try:  # history is a convenience, never an error
            history.parent.mkdir(parents=True, exist_ok=True)
            history.touch()
            kept = FileHistory(str(history))
        except OSError:
            kept = InMemoryHistory()
        keys = KeyBindings()

        @keys.add("enter")
        def _enter(event) -> None:
            if event.app.key_processor.input_queue:  # a paste without bracketed-paste mode
                event.current_buffer.newline(copy_margin=False)
            else:
                event.current_buffer.validate_and_handle()

        self.session = PromptSession(
            history=kept,
            completer=WordCompleter(list(commands), sentence=True),
            complete_while_typing=False,
            complete_style=CompleteStyle.READLINE_LIKE,
            key_bindings=keys,
            enable_suspend=True,
        )
        self.session.app.before_render += lambda _app: on_draw()
        self.bold = bold

    def prompt(self, text: str) -> str:
        # handle_sigint=False: the session's one SIGINT handler stays (see `Interrupts`)
        return self.session.prompt([("bold", text)] if self.bold else text, handle_sigint=False)

    def read(self) -> str:
        """One message; KeyboardInterrupt on Ctrl-C, EOFError on Ctrl-D."""
        first = self.prompt(">>> ")
        if first.strip() != '"""':
            return first
        lines = []
        while (line := self.prompt("... ")).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
