"""Fine-tuning data: JSONL rows -> token ids with loss masks -> length-bucketed batches.

A data folder holds train.jsonl (required), valid.jsonl and test.jsonl (optional). For
supervised fine-tuning each row is one of `{"text"}`, `{"prompt", "completion"}` (the
completion follows the prompt as plain text) or `{"messages": [{"role", "content"}, ...]}`
(rendered with the model's chat template). The loss covers completions and assistant turns
only, unless `train_on_prompt`.

For preference tuning (DPO, ORPO) each row is `{"prompt", "chosen", "rejected"}`: plain
strings (each completion follows the prompt, as above), or TRL's conversational form (`prompt`
a list of messages, `chosen` and `rejected` lists holding the assistant turn). A batch of
pairs holds the chosen rows first, then the rejected ones in the same order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..tokenizer import Tokenizer, common_prefix, encode_prompt, render_chat

SPLITS = ("train", "valid", "test")
ROLES = ("system", "user", "assistant")
FORMATS = ({"text"}, {"prompt", "completion"}, {"messages"})
PAIR_KEYS = {"prompt", "chosen", "rejected"}
MAX_REPORTED = 20


class RowError(ValueError):
    """One row cannot be used; the message says why."""


@dataclass
class Example:
    tokens: np.ndarray  # (T,) int32
    mask: np.ndarray  # (T,) bool: is token t a training target

    @property
    def size(self) -> int:
        return len(self.tokens)

    def rows(self) -> list[Example]:
        return [self]

    def check(self, max_seq_len: int) -> None:
        if self.size > max_seq_len:
            raise RowError(f"{self.size} tokens, longer than --max-seq-len {max_seq_len}")
        if not self.mask.any():
            raise RowError("no tokens to learn from")


@dataclass
class Pair:
    """A preference pair: the same prompt, a chosen and a rejected completion."""

    chosen: Example
    rejected: Example

    @property
    def size(self) -> int:
        return max(self.chosen.size, self.rejected.size)

    def rows(self) -> list[Example]:
        return [self.chosen, self.rejected]

    def check(self, max_seq_len: int) -> None:
        for e in self.rows():
            e.check(max_seq_len)


@dataclass
class BadRow:
    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class Splits:
    """Examples (SFT) or Pairs (DPO, ORPO) of each split."""

    train: list[Example | Pair]
    valid: list[Example | Pair] = field(default_factory=list)
    test: list[Example | Pair] = field(default_factory=list)
    skipped: list[BadRow] = field(default_factory=list)


def _check_text(row: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"{key!r} must be a string, not {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(f"{key!r} is empty")
    return value


def _check_messages(messages: Any, train_on_prompt: bool) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RowError("'messages' is empty" if messages == [] else "'messages' must be a list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise RowError(f"message {i} must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RowError(f"message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise RowError(f"message {i} has empty content")
    if not train_on_prompt and all(m["role"] != "assistant" for m in messages):
        raise RowError("no assistant message to learn from")
    return messages


class Tokenize:
    """Row -> Example for one tokenizer and chat template."""

    def __init__(self, tokenizer: Tokenizer, model_type: str, train_on_prompt: bool):
        self.tokenizer, self.model_type = tokenizer, model_type
        self.train_on_prompt = train_on_prompt
        self.eos = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text)

    def with_eos(self, ids: list[int]) -> list[int]:
        # Learning to stop needs the end-of-sequence token as the last target.
        return ids if self.eos is None or (ids and ids[-1] == self.eos) else [*ids, self.eos]

    def __call__(self, row: Any) -> Example:
        if not isinstance(row, dict):
            raise RowError(f"a row must be a JSON object, not {type(row).__name__}")
        if set(row) not in FORMATS:
            unknown = sorted(set(row) - set().union(*FORMATS))
            what = f"unknown keys {unknown}" if unknown else f"keys {sorted(row)} do not make a row"
            if not row:
                what = "empty row"
            hint = (
                " (a preference row? train it with --method dpo or orpo)"
                if set(row) == PAIR_KEYS
                else ""
            )
            raise RowError(
                f"{what}; a row has 'text', 'prompt' and 'completion', or 'messages'{hint}"
            )
        if "text" in row:
            ids = self.with_eos(self.encode(_check_text(row, "text")))
            mask = np.ones(len(ids), bool)
        elif "prompt" in row:
            prompt = _check_text(row, "prompt", allow_empty=True)
            ids = self.with_eos(self.encode(prompt + _check_text(row, "completion")))
            mask = np.zeros(len(ids), bool)
            mask[common_prefix(ids, self.encode(prompt)) :] = True
        else:
            ids, mask = self.chat(_check_messages(row["messages"], self.train_on_prompt))
        if self.train_on_prompt:
            mask[:] = True
        mask[0] = False  # the first token is never predicted
        return Example(np.array(ids, np.int32), mask)

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        """Token ids of `messages` in the model's chat format."""
        eos_text = getattr(self.tokenizer, "eos_token", None)
        text = render_chat(self.tokenizer, messages, self.model_type, None, generation_prompt)
        if eos_text and text.rstrip().endswith(eos_text):
            text = text.rstrip()  # end on the template's own EOS, not on a newline after it
        return self.encode(text)

    def chat(self, messages: list[dict[str, str]]) -> tuple[list[int], np.ndarray]:
        render = self.render
        ids = self.with_eos(render(messages, False))
        mask = np.zeros(len(ids), bool)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = common_prefix(ids, render(messages[:i], True))
            last = i == len(messages) - 1
            end = len(ids) if last else common_prefix(ids, render(messages[: i + 1], False))
            mask[start:end] = True
        return ids, mask


class TokenizePair:
    """Preference row -> Pair; the loss covers the completions only. A pair longer than
    `max_seq_len` loses prompt tokens from the left (the same ones in both rows) until it
    fits; one whose completion alone does not fit is a bad row."""

    def __init__(self, tokenize: Tokenize, max_seq_len: int):
        self.tokenize, self.max_seq_len = tokenize, max_seq_len

    def __call__(self, row: Any) -> Pair:
        if not isinstance(row, dict):
            raise RowError(f"a row must be a JSON object, not {type(row).__name__}")
        if set(row) != PAIR_KEYS:
            missing, unknown = sorted(PAIR_KEYS - set(row)), sorted(set(row) - PAIR_KEYS)
            what = f"missing {missing}" if missing else f"unknown keys {unknown}"
            raise RowError(f"{what}; a preference row has 'prompt', 'chosen' and 'rejected'")
        if isinstance(row["prompt"], str):
            prompt = _check_text(row, "prompt")
            chosen, rejected = _check_text(row, "chosen"), _check_text(row, "rejected")
            make = self.plain
        elif isinstance(row["prompt"], list):
            prompt = _check_messages(row["prompt"], train_on_prompt=True)
            chosen, rejected = self.answer(row, "chosen"), self.answer(row, "rejected")
            make = self.chat
        else:
            raise RowError("'prompt' must be a string or a list of messages")
        if chosen == rejected:
            raise RowError("'chosen' and 'rejected' are the same")
        return self.fit(make(prompt, chosen), make(prompt, rejected))

    @staticmethod
    def answer(row: dict[str, Any], key: str) -> list[dict[str, str]]:
        value = row[key]
        if not isinstance(value, list):
            raise RowError(f"{key!r} must be a list of messages when 'prompt' is one")
        try:
            messages = _check_messages(value, train_on_prompt=False)
        except RowError as e:
            raise RowError(f"{key!r}: {e}") from e
        if messages[-1]["role"] != "assistant":
            raise RowError(f"{key!r} must end with an assistant message")
        return messages

    def plain(self, prompt: str, completion: str) -> tuple[list[int], int]:
        t = self.tokenize
        ids = t.with_eos(t.encode(prompt + completion))
        return ids, common_prefix(ids, t.encode(prompt))

    def chat(
        self, prompt: list[dict[str, str]], answer: list[dict[str, str]]
    ) -> tuple[list[int], int]:
        t = self.tokenize
        ids = t.with_eos(t.render(prompt + answer, False))
        return ids, common_prefix(ids, t.render(prompt, True))

    def fit(self, *rows: tuple[list[int], int]) -> Pair:
        """rows: (token ids, where the completion starts) for chosen and rejected."""
        cut = max(0, max(len(ids) for ids, _ in rows) - self.max_seq_len)
        examples = []
        for (ids, start), name in zip(rows, ("chosen", "rejected"), strict=True):
            if start - cut < 1:  # the first completion token needs a token before it
                raise RowError(
                    f"the pair is longer than --max-seq-len {self.max_seq_len} even with the "
                    f"prompt cut from the left (the {name} completion has {len(ids) - start} "
                    "tokens)"
                )
            mask = np.zeros(len(ids) - cut, bool)
            mask[start - cut :] = True
            examples.append(Example(np.array(ids[cut:], np.int32), mask))
        return Pair(*examples)


def read_jsonl(
    path: Path, tokenize: Tokenize | TokenizePair, max_seq_len: int
) -> tuple[list[Example | Pair], list[BadRow]]:
    examples, bad = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue  # blank lines separate nothing; not a row
        try:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RowError(f"not valid JSON ({e.msg} at column {e.colno})") from e
            example = tokenize(row)
            example.check(max_seq_len)
        except RowError as e:
            bad.append(BadRow(path, number, str(e)))
            continue
        examples.append(example)
    return examples, bad


def load_splits(
    folder: Path,
    tokenizer: Tokenizer,
    model_type: str,
    max_seq_len: int,
    train_on_prompt: bool = False,
    skip_bad_rows: bool = False,
    pairs: bool = False,
) -> Splits:
    """Read and check every split before training starts; bad rows stop the run or are skipped.
    `pairs`: preference rows (DPO, ORPO) instead of SFT rows."""
    folder = Path(folder).expanduser()
    if not (folder / "train.jsonl").exists():
        what = "does not exist" if not folder.exists() else "has no train.jsonl"
        raise DataError(f"data folder {folder} {what}; it needs train.jsonl (one JSON row a line)")
    tokenize: Tokenize | TokenizePair = Tokenize(tokenizer, model_type, train_on_prompt)
    if pairs:
        tokenize = TokenizePair(tokenize, max_seq_len)
    splits: dict[str, list[Example | Pair]] = {}
    bad: list[BadRow] = []
    for name in SPLITS:
        path = folder / f"{name}.jsonl"
        if path.exists():
            splits[name], bad_rows = read_jsonl(path, tokenize, max_seq_len)
            bad += bad_rows
    if bad and not skip_bad_rows:
        listed = "\n  ".join(str(b) for b in bad[:MAX_REPORTED])
        more = f"\n  ... and {len(bad) - MAX_REPORTED} more" if len(bad) > MAX_REPORTED else ""
        raise DataError(
            f"{len(bad)} bad row(s) in {folder}:\n  {listed}{more}\n"
            "Fix them, or pass --skip-bad-rows to train without them."
        )
    if not splits["train"]:
        raise DataError(f"{folder / 'train.jsonl'} has no usable rows")
    return Splits(splits["train"], splits.get("valid", []), splits.get("test", []), bad)


@dataclass
class Batch:
    inputs: np.ndarray  # (B, L) int32
    targets: np.ndarray  # (B, L) int32
    mask: np.ndarray  # (B, L) float32, 1 where the target is trained


def collate(items: list[Example | Pair], pad_multiple: int) -> Batch:
    """Right-pad to a multiple of `pad_multiple`, which bounds how many shapes get compiled.
    Pairs give their chosen rows first, then their rejected rows."""
    examples = [row for rows in zip(*(i.rows() for i in items), strict=True) for row in rows]
    longest = max(len(e.tokens) for e in examples) - 1
    length = -(-longest // pad_multiple) * pad_multiple
    inputs = np.zeros((len(examples), length), np.int32)
    targets = np.zeros((len(examples), length), np.int32)
    mask = np.zeros((len(examples), length), np.float32)
    for i, e in enumerate(examples):
        n = len(e.tokens) - 1
        inputs[i, :n] = e.tokens[:-1]
        targets[i, :n] = e.tokens[1:]
        mask[i, :n] = e.mask[1:]
    return Batch(inputs, targets, mask)


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch's batches of example indices: shuffled, then bucketed by length.

    Every example appears each epoch (the last batch is topped up with repeats); windows of
    16 batches are sorted by length so a batch pads little, and the batch order is shuffled.
    """
    rng = np.random.default_rng([seed, epoch])
    n_batches = -(-len(lengths) // batch_size)
    order = np.resize(rng.permutation(len(lengths)), n_batches * batch_size)
    window = 16 * batch_size
    for i in range(0, len(order), window):
        chunk = order[i : i + window]
        order[i : i + window] = chunk[np.argsort([lengths[j] for j in chunk], kind="stable")]
    batches = order.reshape(n_batches, batch_size)
    return list(batches[rng.permutation(n_batches)])


def train_batches(
    examples: list[Example | Pair],
    batch_size: int,
    seed: int,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
    pad_multiple: int = 32,
) -> Iterator[Batch]:
    """Endless global batches from global position `start` on (so a resumed run continues
    exactly); each of `world` processes collates its contiguous share of every batch."""
    lengths = [e.size for e in examples]
    n_batches = -(-len(examples) // batch_size)
    share = batch_size // world
    position = start
    epoch, batches = -1, []
    while True:
        if position // n_batches != epoch:
            epoch = position // n_batches
            batches = epoch_batches(lengths, batch_size, seed, epoch)
        indices = batches[position % n_batches][rank * share : (rank + 1) * share]
        yield collate([examples[i] for i in indices], pad_multiple)
        position += 1


def eval_batches(
    examples: list[Example | Pair], batch_size: int, max_batches: int = -1
) -> list[list[Example | Pair]]:
    """Fixed batches for a validation or test loss, shortest first; -1 takes all."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].size)
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if max_batches >= 0:
        groups = groups[:max_batches]
    return [[examples[i] for i in g] for g in groups]
