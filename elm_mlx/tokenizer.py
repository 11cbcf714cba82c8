"""Tokenizers (mlx-lm's wrapper and streaming detokenizers) and prompt formatting."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import TokenizerError
from .models import get_family

# Documented fallback for models without a template (OLMo, base models): plain text turns.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

Tokenizer = Any  # mlx_lm.tokenizer_utils.TokenizerWrapper


class _Pieces:
    """Text committed in pieces; `last_segment` hands out what came since the last call."""

    def _clear(self) -> None:
        self.tokens: list[int] = []
        self._pieces: list[str] = []  # join to decode(tokens) of the tokens committed
        self._handed = 0  # pieces already handed out by `last_segment`
        self._length = 0  # characters in the pieces

    def _append(self, piece: str) -> None:
        self._pieces.append(piece)
        self._length += len(piece)

    @property
    def text(self) -> str:
        """decode(tokens) of the tokens committed so far."""
        return "".join(self._pieces)

    @property
    def last_segment(self) -> str:
        """The text committed since the last call."""
        segment = "".join(self._pieces[self._handed :])
        self._handed = len(self._pieces)
        return segment


# Leading and double spaces, newlines, tabs, what clean-up of spaces would change, then
# characters that some tokenizers split over tokens (where the Python path takes over).
STREAM_PROBE = " a ,b\n\n  two  spaces don't\ttab end . héllo 😀 世界"


class DecodeDetokenizer(_Pieces):
    """Streams text whose pieces join to exactly `tokenizer.decode(tokens)`.

    mlx-lm's streaming detokenizers break that promise on real text: the naive one (used for a
    bare tokenizer.model, i.e. OpenELM and OpenLLaMA) repeats or drops characters around
    byte-fallback runs and after newlines, and the SPM/BPE ones drop the first token's space.
    This one re-decodes only the tokens since a recent start, a few committed tokens in front
    as context (SentencePiece drops a space only at the start of a decode), and holds back
    text a later token may still change: a run of byte-fallback tokens (decoded
    all-or-nothing), an incomplete UTF-8 character, or a space that clean-up may remove. One
    decode per token: the start moves on only every few tokens, so the decode just made is the
    context of the next one. Same interface as mlx-lm's (`reset`, `add_token`, `finalize`,
    `text`, `last_segment`).

    Where it gives the same text (a fast tokenizer without clean-up of spaces, checked on a
    probe), `tokenizers`' own stream (`DecodeStream`, the same idea in Rust) does the work, ~10x
    cheaper a token, as long as every token is text on its own: from the first token that holds
    part of a character or is a byte-fallback token (whose runs may turn out invalid UTF-8, which the stream renders unlike
    `decode`), the Python path takes over for the rest of the text.
    """

    context = 4

    def __init__(self, tokenizer: Any, stream: bool = True):
        self._tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self._byte_ids = {i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x")}
        probe = tokenizer.encode("a ,b", add_special_tokens=False)
        self._clean_spaces = " ," not in tokenizer.decode(probe)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # the backend gives `tokenizer.decode`'s text (transformers' clean-up of spaces comes
        # after it), without transformers' per-call overhead
        exact = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
        if exact:
            self._decode = functools.partial(backend.decode, skip_special_tokens=False)
        else:
            self._decode = tokenizer.decode
        self._backend = backend
        self.streams = False
        if stream and exact:
            ids = list(range(backend.get_vocab_size()))
            pieces = backend.decode_batch([[i] for i in ids], skip_special_tokens=False)
            # byte-fallback tokens too: a run of them decodes all-or-nothing
            partial = {i for i, p in zip(ids, pieces, strict=True) if "\ufffd" in p}
            self._partial = partial | self._byte_ids
            self.streams = True
            self.reset()
            probe = tokenizer.encode(STREAM_PROBE, add_special_tokens=False)
            for t in probe:
                self.add_token(t)
            self.finalize()
            self.streams = self.text == tokenizer.decode(probe)
        self.reset()

    def reset(self) -> None:
        from tokenizers.decoders import DecodeStream

        self._clear()
        self._n = 0  # tokens committed
        self._start = 0  # where the context of the next decode starts
        self._head = ""  # == decode(tokens[self._start : self._n])
        self._stream = DecodeStream(skip_special_tokens=False) if self.streams else None

    def _leave_stream(self) -> None:
        """The Python path from here on: its context from the tokens committed."""
        self._stream = None
        self._start = max(0, self._n - self.context)
        self._head = self._decode(self.tokens[self._start : self._n])

    def _tail(self) -> tuple[str, str | None]:
        """The text of the tokens since the last commit, and the decode it came from (None:
        not from the context)."""
        window = self._decode(self.tokens[self._start :])
        if window.startswith(self._head):
            return window[len(self._head) :], window
        return self._decode(self.tokens)[self._length :], None  # rare: no local decode

    def _commit(self, tail: str, window: str | None) -> None:
        self._append(tail)
        self._n = len(self.tokens)
        if window is None or self._n - self._start > 4 * self.context:
            self._start = max(0, self._n - self.context)
            window = self._decode(self.tokens[self._start :])
        self._head = window

    def add_token(self, token: int) -> None:
        self.tokens.append(token)
        if self._stream is not None:
            if token in self._partial:
                self._leave_stream()
            else:
                piece = self._stream.step(self._backend, token)
                if piece is not None:  # None: an incomplete character so far
                    self._append(piece)
                    self._n = len(self.tokens)
                return
        if token in self._byte_ids:
            return
        tail, window = self._tail()
        if not tail.endswith("\ufffd") and not (self._clean_spaces and tail.endswith(" ")):
            self._commit(tail, window)

    def finalize(self) -> None:
        if self._n < len(self.tokens):
            if self._stream is not None:
                self._leave_stream()
            self._commit(*self._tail())


def load_tokenizer(model_dir: Path, eos_token_ids: list[int] | None = None) -> Tokenizer:
    from mlx_lm.tokenizer_utils import load as load_wrapper
    from transformers.utils import logging as hf_logging

    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise TokenizerError(
            f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model); "
            "re-run `elm convert` with --tokenizer PATH_OR_REPO"
        )
    # transformers reads config.json too and warns on model types it does not know (openelm):
    # noise for our users, whose model type we check ourselves.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        wrapper = load_wrapper(model_dir, eos_token_ids=eos_token_ids)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot load the tokenizer in {model_dir}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    wrapper._detokenizer = DecodeDetokenizer(wrapper._tokenizer)  # copied per `.detokenizer`
    return wrapper


def default_chat_template(tokenizer: Tokenizer, model_type: str) -> str | None:
    """The template a model gets when its tokenizer has none: its family's, or plain turns."""
    if getattr(tokenizer, "chat_template", None):
        return None
    return get_family(model_type).chat_template or PLAIN_TEMPLATE


def render_chat(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    model_type: str,
    template: str | None = None,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Messages -> prompt text, with the given template, the tokenizer's, or our fallback.
    `tools`: function tools (OpenAI's JSON) for templates that take them."""
    template = template or default_chat_template(tokenizer, model_type)
    return tokenizer._tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        tools=tools,
    )


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids for a prompt: BOS when the tokenizer adds one and the text lacks it."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer.encode(text, add_special_tokens=add_special))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token sequences (of any sequence
    type: compared as lists)."""
    n = min(len(a), len(b))
    a, b = list(a[:n]), list(b[:n])
    if a == b:  # the usual case (a chat re-sent): one comparison in C
        return n
    lo, hi = 0, n  # the prefix of length lo agrees, that of length hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
