"""Constrained decoding: output that matches a JSON schema, any JSON object, a regular expression
or a Lark grammar, by construction.

A `ConstraintSpec` is what a request asks for (hashable, checked before decoding); `build` gives
each row its own `Constraint`, a matcher from llguidance (Microsoft's Earley parser over token
tries: ~20-50 us per token mask, the widest JSON-schema coverage). Each step the row masks its
logits with `mask()` (tokens allowed next; EOS exactly when the output may end), then
`advance`s with the chosen token; speculation checks proposals with `valid_prefix` / `masks`
and undoes rejected tokens with `rollback`. `done` means nothing may follow: the row stops.

The llguidance view of a tokenizer (each token's bytes, SentencePiece byte fallback and
byte-level BPE alike, read from the Hugging Face tokenizer) takes ~0.5 s for a 50k vocabulary:
it is built once per tokenizer and cached, as are compiled grammars.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer

from ..errors import OptionError
from ..tokenizer import Tokenizer

Kind = Literal["json_schema", "json_object", "regex", "grammar"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "grammar")

# Whitespace between JSON tokens: llama.cpp's rule for schema grammars (none, a space, or one or
# two newlines and an indent of up to 20), so that a small model cannot loop on blank lines, yet
# may pretty-print. A schema may override it with llguidance's own "x-guidance" keyword.
JSON_OPTIONS = {"whitespace_pattern": r"(?: |\n{1,2}[ \t]{0,20})?"}
ANY_OBJECT = '{"type": "object"}'


def _grammar(kind: str, source: str) -> str:
    """The llguidance grammar (a JSON string) of a spec; ValueError with the reason."""
    if kind == "json_object":
        source = ANY_OBJECT
    if kind in ("json_schema", "json_object"):
        try:
            schema = json.loads(source)
        except json.JSONDecodeError as e:
            raise ValueError(f"is not valid JSON: {e}") from e
        if not isinstance(schema, dict | bool):
            raise ValueError("must be a JSON object (a JSON schema)")
        return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(source)
    return LLMatcher.grammar_from_lark(source)


def _first_error(grammar: str, lltok: LLTokenizer | None) -> str | None:
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, lltok)
    return messages[0].strip() if is_error else None


@dataclass(frozen=True)
class ConstraintSpec:
    """A constraint on the output. `source`: the JSON schema (JSON text), the regular expression
    (Rust `regex` syntax, matched in full) or the grammar (Lark syntax as llguidance reads it;
    ignored for "json_object"). `field`: the request field or option named in errors
    (`response_format.json_schema.schema`, `regex`, ...)."""

    kind: Kind
    source: str = ""
    field: str = ""

    def __post_init__(self) -> None:
        if not self.field:
            object.__setattr__(self, "field", self.kind)
        if self.kind not in KINDS:
            raise OptionError(self.field, f"has unknown constraint kind {self.kind!r}")

    @classmethod
    def json_schema(
        cls, schema: dict[str, Any] | bool, field: str = "json_schema"
    ) -> ConstraintSpec:
        return cls("json_schema", json.dumps(schema), field)

    def validate(self) -> None:
        """Refuse a source that cannot compile (syntax, unsupported features), with no
        tokenizer: cheap, so options can be checked before a model is loaded."""
        _validated(self)

    def check(self, tokenizer: Tokenizer) -> None:
        """Refuse a source that cannot compile against this tokenizer (`OptionError`)."""
        bridge(tokenizer).prototype(self)

    def build(self, tokenizer: Tokenizer, vocab_size: int) -> Constraint:
        """A fresh matcher for one row; `vocab_size`: the model's logits width."""
        b = bridge(tokenizer)
        return Constraint(b.prototype(self).deep_copy(), b, vocab_size)


_VALIDATED: OrderedDict[ConstraintSpec, None] = OrderedDict()


def _validated(spec: ConstraintSpec) -> str:
    """The grammar of a spec that compiles without a tokenizer (a small LRU of those seen)."""
    try:
        grammar = _grammar(spec.kind, spec.source)
    except ValueError as e:
        raise OptionError(spec.field, str(e)) from e
    if spec not in _VALIDATED:
        error = _first_error(grammar, None)
        if error is not None:
            raise OptionError(spec.field, f"is not usable for constrained decoding: {error}")
        _VALIDATED[spec] = None
        while len(_VALIDATED) > 256:
            _VALIDATED.popitem(last=False)
    return grammar


class TokenizerBridge:
    """One tokenizer as llguidance sees it, and the compiled matchers of the specs seen
    (deep-copied per row: a copy costs microseconds, compiling a schema milliseconds)."""

    max_prototypes = 64

    def __init__(self, tokenizer: Tokenizer):
        from llguidance.hf import from_tokenizer  # imports transformers: only when needed

        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        if not hasattr(hf, "backend_tokenizer"):
            raise OptionError(
                "constraint",
                f"needs a tokenizer backed by the `tokenizers` library; {type(hf).__name__} is not",
            )
        eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
        self.lltok: LLTokenizer = from_tokenizer(hf, eos_token=eos)
        self.eos = frozenset(eos)
        self.vocab_size: int = self.lltok.vocab_size
        self._prototypes: OrderedDict[ConstraintSpec, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def prototype(self, spec: ConstraintSpec) -> LLMatcher:
        with self._lock:
            if spec in self._prototypes:
                self._prototypes.move_to_end(spec)
                return self._prototypes[spec]
        grammar = _validated(spec)
        matcher = LLMatcher(self.lltok, grammar, log_level=0)
        if matcher.is_error():
            raise OptionError(
                spec.field, f"is not usable for constrained decoding: {matcher.get_error()}"
            )
        with self._lock:
            self._prototypes[spec] = matcher
            while len(self._prototypes) > self.max_prototypes:
                self._prototypes.popitem(last=False)
        return matcher


_BRIDGES: weakref.WeakKeyDictionary[Any, TokenizerBridge] = weakref.WeakKeyDictionary()
_BRIDGES_LOCK = threading.Lock()


def bridge(tokenizer: Tokenizer) -> TokenizerBridge:
    """The cached `TokenizerBridge` of a tokenizer (built on first use)."""
    with _BRIDGES_LOCK:
        found = _BRIDGES.get(tokenizer)
        if found is None:
            found = _BRIDGES[tokenizer] = TokenizerBridge(tokenizer)
        return found


_POOL: ThreadPoolExecutor | None = None
# (256, 8) bool: the bits of each byte value, lowest first (token i is bit i % 8 of byte i // 8)
_UNPACK = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") > 0


def _pool() -> ThreadPoolExecutor:
    """The threads that compute masks ahead (llguidance releases the GIL while it works)."""
    global _POOL
    with _BRIDGES_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="elm-constraint")
        return _POOL


class Constraint:
    """One row's matcher: `mask()` -> allowed next tokens, `advance(token)`, `rollback(n)`,
    `done`. Tokens past the tokenizer's vocabulary (padding rows of the model's head) are
    never allowed.

    The next mask is computed ahead, on a worker thread, as soon as a token is advanced (and
    at creation): it overlaps the forward pass that produces the logits it will mask. Computed
    right after a forward pass instead, it takes ~1.5 ms rather than ~50 us on the CPU backend
    (bench_constrain.py). Every method that uses the
    matcher first waits for that computation (one thread at a time); `done` and `accepting`
    are read when the state changes.
    """

    def __init__(self, matcher: LLMatcher, bridge: TokenizerBridge, vocab_size: int):
        self._matcher = matcher
        self._bridge = bridge
        self.vocab_size = vocab_size
        words = (bridge.vocab_size + 31) // 32
        self._bits = np.zeros(words, dtype=np.int32)  # llguidance's bitmask, 1 bit per token
        # Buffers allocated once: right after a forward pass on the CPU backend, the first numpy
        # allocation of some 50 kB costs ~1.5 ms (the allocator tidies what MLX freed).
        n_bytes = (min(vocab_size, bridge.vocab_size) + 7) // 8
        self._byte_ids = np.zeros(n_bytes, dtype=np.intp)
        self._buffer = np.zeros(max(vocab_size, 8 * n_bytes), dtype=np.bool_)
        self._allowed = self._buffer[:vocab_size]  # padding rows of the head stay False
        # per advance: did the matcher take a step? (EOS after a finished output is a no-op)
        self._steps: list[bool] = []
        self._ahead: Future[None] | None = None  # computing _bits for the current state
        self._fresh = False  # _bits holds the mask of the current state
        self._note_state()
        self._prefetch()

    def _note_state(self) -> None:
        """Read what `done` and `accepting` answer while the matcher is not busy."""
        self._stopped = self._matcher.is_stopped()
        self._accepting = self._matcher.is_accepting()

    def _fill(self) -> None:
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)

    def _prefetch(self) -> None:
        self._fresh = False
        if not self._stopped:
            self._ahead = _pool().submit(self._fill)

    def _settle(self) -> None:
        """Wait for the mask computed ahead (it is for the current state)."""
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            ahead.result()
            self._fresh = True

    def mask_np(self) -> np.ndarray:
        """(vocab_size,) bool, on the CPU; a buffer the next call overwrites."""
        self._settle()
        if not self._fresh:
            self._fill()
            self._fresh = True
        n_bytes = len(self._byte_ids)
        np.copyto(self._byte_ids, self._bits.view(np.uint8)[:n_bytes], casting="unsafe")
        unpacked = self._buffer[: 8 * n_bytes].reshape(n_bytes, 8)
        np.take(_UNPACK, self._byte_ids, axis=0, out=unpacked, mode="clip")  # no temporaries
        return self._allowed

    def mask(self) -> mx.array:
        """(vocab_size,) bool: the tokens allowed next."""
        return mx.array(self.mask_np())

    def advance(self, token: int, prefetch: bool = True) -> None:
        """Consume a chosen token; one the mask did not allow raises `ValueError`."""
        self._settle()
        self._fresh = False
        if token in self._bridge.eos and self._stopped:
            self._steps.append(False)
            return
        if not (0 <= token < self._bridge.vocab_size) or not self._matcher.consume_token(token):
            error = self._matcher.get_error() or "not allowed here"
            raise ValueError(f"token {token} breaks the constraint: {error}")
        self._steps.append(True)
        self._note_state()
        if prefetch:
            self._prefetch()

    def rollback(self, n: int) -> None:
        """Undo the last `n` advances."""
        if n <= 0:
            return
        self._settle()
        if n > len(self._steps):
            raise ValueError(f"cannot roll back {n} tokens, only {len(self._steps)} advanced")
        steps = sum(self._steps[-n:])
        del self._steps[-n:]
        self._fresh = False
        if steps and not self._matcher.rollback(steps):
            raise ValueError(f"llguidance could not roll back: {self._matcher.get_error()}")
        self._note_state()

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens` (a proposal) the constraint accepts in a row, from here."""
        self._settle()
        n = 0
        while n < len(tokens) and 0 <= tokens[n] < self._bridge.vocab_size:
            n += 1
        if self._stopped:
            return 1 if n and tokens[0] in self._bridge.eos else 0
        return self._matcher.validate_tokens(list(tokens[:n])) if n else 0

    def masks(self, tokens: list[int]) -> mx.array:
        """(len(tokens) + 1, vocab_size) bool: the mask here and after each token of a
        proposal that `valid_prefix` accepted; the state is left as it was."""
        rows = [self.mask_np().copy()]
        for token in tokens:
            self.advance(token, prefetch=False)
            rows.append(self.mask_np().copy())
        self.rollback(len(tokens))
        return mx.array(np.stack(rows))

    @property
    def done(self) -> bool:
        """Nothing may follow the output (EOS aside): the row stops with "stop"."""
        return self._stopped

    @property
    def accepting(self) -> bool:
        """The output so far is complete (it may end here)."""
        return self._accepting


def apply_mask(logits: mx.array, mask: mx.array) -> mx.array:
    """Logits (..., V) with the disallowed tokens at -inf; mask (..., V) bool."""
    return mx.where(mask, logits, mx.array(-mx.inf, dtype=logits.dtype))


__all__ = [
    "KINDS",
    "Constraint",
    "ConstraintSpec",
    "TokenizerBridge",
    "apply_mask",
    "bridge",
]
