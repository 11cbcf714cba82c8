"""Stop strings in streamed text (pure Python): text that may be the beginning of a stop string
is held back until the next piece shows whether it is."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Finds stop strings in streamed text, holding back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add a piece; return (text safe to emit now, whether a stop string was hit). After a
        hit, the text before the earliest stop string has been emitted and nothing after it."""
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.text[self.emitted : min(hits)]
            self.emitted = len(self.text)
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted : end], end
        return out, False

    def flush(self) -> str:
        """The text held back (the stream ended without completing a stop string)."""
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out
