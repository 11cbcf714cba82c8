"""Terminal handling for `elm chat`: styles, the streaming printer with its live tokens/s,
Ctrl-C during an answer, multi-line paste, and readline (history, completion)."""

from __future__ import annotations

import contextlib
import select
import shutil
import signal
import sys
import unicodedata
from collections.abc import Sequence
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


class StopOnInterrupt:
    """Ctrl-C asks the answer to stop at the next token; a second Ctrl-C interrupts at once."""

    def __enter__(self) -> StopOnInterrupt:
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self.previous)


def pending_input(fd: int) -> bool:
    """Whether more typed or pasted bytes are waiting (a paste without bracketed-paste mode
    arrives as several lines at once). Checked in non-canonical mode so that a last pasted
    line without its newline counts too."""
    try:
        import termios
    except ImportError:  # no termios (Windows): no paste detection
        return False
    old = termios.tcgetattr(fd)
    raw = list(old)
    raw[3] &= ~termios.ICANON
    termios.tcsetattr(fd, termios.TCSANOW, raw)
    try:
        return bool(select.select([fd], [], [], 0.03)[0])
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, old)


def read_message(prompt: str) -> str:
    lines = [input(prompt)]
    if lines[0].strip() == '"""':
        lines = []
        while (line := input("... ")).strip() != '"""':
            lines.append(line)
    while pending_input(sys.stdin.fileno()):
        lines.append(input(""))
    return "\n".join(lines)


def setup_readline(history: Path, commands: Sequence[str]) -> object | None:
    try:
        import readline
    except ImportError:  # no readline (Windows): plain input() still works
        return None
    with contextlib.suppress(OSError):  # no history yet
        readline.read_history_file(history)
    readline.set_history_length(1000)
    readline.set_completer(
        lambda text, i: ([c for c in commands if c.startswith(text)] + [None])[i]
    )
    readline.set_completer_delims(" ")
    libedit = "libedit" in (readline.__doc__ or "")
    readline.parse_and_bind("bind ^I rl_complete" if libedit else "tab: complete")
    return readline
