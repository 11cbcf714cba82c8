"""When a generation stops and what text it shows (pure Python): stop strings in streamed text
(text that may be the beginning of a stop string is held back until the next piece shows
whether it is), EOS and the token limit."""

from __future__ import annotations

from collections.abc import Collection, Sequence


class StopMatcher:
    """Finds stop strings in streamed text, holding back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.longest = max(map(len, self.stops), default=0)
        # every proper beginning of a stop string: text ending in one is held back
        self.prefixes = {s[:k] for s in self.stops for k in range(1, len(s))}
        self.text = ""  # the text not emitted yet, after the part a new hit may begin in
        self.emitted = 0  # characters of `text` already emitted

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add a piece; return (text safe to emit now, whether a stop string was hit). After a
        hit, the text before the earliest stop string has been emitted and nothing after it.
        A piece costs O(len(piece) + longest stop) work, however long the text is."""
        if not self.stops:
            return piece, False
        start = max(0, len(self.text) - self.longest + 1)  # a new hit ends in this piece
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            out = self.text[self.emitted : min(hits)]
            self.text, self.emitted = "", 0
            return out, True
        hold = next(
            (
                k
                for k in range(min(self.longest - 1, len(self.text)), 0, -1)
                if self.text[-k:] in self.prefixes
            ),
            0,
        )
        end = max(self.emitted, len(self.text) - hold)
        out = self.text[self.emitted : end]
        # keep what is held back and the last `longest - 1` characters a hit may begin in
        drop = min(end, max(0, len(self.text) - self.longest + 1))
        self.text, self.emitted = self.text[drop:], end - drop
        return out, False

    def flush(self) -> str:
        """The text held back (the stream ended without completing a stop string)."""
        out = self.text[self.emitted :]
        self.text, self.emitted = "", 0
        return out


class TextStream:
    """One generation's tokens -> text pieces and its finish reason: the streaming detokenizer
    (mlx-lm's interface: `add_token`, `finalize`, `last_segment`), stop strings held back and
    cut, EOS tokens (never shown) and the token limit. `stream_generate` and the batch engine
    both use it, so a request gives the same text alone or in a batch."""

    def __init__(self, detokenizer, stops: Sequence[str], eos: Collection[int], max_tokens: int):
        self.detokenizer = detokenizer  # a fresh one (`tokenizer.detokenizer` gives one)
        self.stops = StopMatcher(stops)
        self.eos = eos
        self.max_tokens = max_tokens
        self.count = 0

    def add(self, token: int) -> tuple[str, str | None]:
        """The text this token releases and the finish reason it causes: "stop" (EOS or a stop
        string), "length" (the limit reached) or None."""
        self.count += 1
        if token in self.eos:
            self.detokenizer.finalize()
            piece, _ = self.stops.feed(self.detokenizer.last_segment)
            return piece + self.stops.flush(), "stop"
        self.detokenizer.add_token(token)
        piece, hit = self.stops.feed(self.detokenizer.last_segment)
        if hit:
            return piece, "stop"
        if self.count >= self.max_tokens:
            return piece + self.end(), "length"
        return piece, None

    def end(self) -> str:
        """The text still held back when the generation ends for another reason (its constraint
        is complete): the detokenizer's tail, cut at a stop string if it completes one."""
        self.detokenizer.finalize()
        more, hit = self.stops.feed(self.detokenizer.last_segment)
        return more + ("" if hit else self.stops.flush())
