"""Fine-tuning data: row formats, loss masks, bad-row reports, batching and data position."""

from __future__ import annotations

from pathlib import Path

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import numpy as np
import pytest
from tiny_data import write_jsonl
from tiny_tokenizers import train_spm_tokenizer

from elm_mlx.errors import DataError
from elm_mlx.models.openelm import ZEPHYR_TEMPLATE
from elm_mlx.tokenizer import load_tokenizer
from elm_mlx.train.dataset import Example, epoch_batches, load_splits, train_batches


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_spm_tokenizer(folder)
    return load_tokenizer(folder, [2])


def load(tokenizer, folder: Path, model_type: str = "llama", **kw):
    return load_splits(folder, tokenizer, model_type, kw.pop("max_seq_len", 64), **kw)


def trained_text(tokenizer, example: Example) -> str:
    """The text of the trained targets (what the loss covers), EOS shown as </s>."""
    ids = example.tokens[example.mask].tolist()
    return tokenizer._tokenizer.decode(ids, skip_special_tokens=False)


def test_text_rows_train_every_token_and_end_with_eos(tokenizer, tmp_path):
    write_jsonl(tmp_path, "train", [{"text": "the capital of france is paris"}])
    (example,) = load(tokenizer, tmp_path).train
    expected = [*tokenizer.encode("the capital of france is paris"), 2]
    assert example.tokens.tolist() == expected
    assert example.mask.tolist() == [False] + [True] * (len(expected) - 1)


def test_prompt_completion_trains_the_completion_only(tokenizer, tmp_path):
    row = {"prompt": "the capital of france is", "completion": " paris"}
    write_jsonl(tmp_path, "train", [row])
    (example,) = load(tokenizer, tmp_path).train
    assert example.tokens.tolist() == [*tokenizer.encode("the capital of france is paris"), 2]
    assert trained_text(tokenizer, example).strip() == "paris</s>"
    (example,) = load(tokenizer, tmp_path, train_on_prompt=True).train
    assert example.mask[1:].all()


def test_messages_train_assistant_turns_only(tokenizer, tmp_path):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "the capital of france"},
        {"role": "assistant", "content": "paris"},
    ]
    write_jsonl(tmp_path, "train", [{"messages": messages}])
    # OpenELM: the Zephyr format, each turn closed by </s>
    (example,) = load(tokenizer, tmp_path, "openelm", max_seq_len=256).train
    full = tokenizer._tokenizer.apply_chat_template(
        messages, chat_template=ZEPHYR_TEMPLATE, tokenize=False
    )
    # ends on the template's own </s>, without the newline after it
    assert example.tokens.tolist() == tokenizer.encode(full.rstrip())
    assert example.tokens[-1] == 2
    assert full.count("</s>") == 5 and "<|assistant|>\nhi</s>" in full
    assert trained_text(tokenizer, example).replace(" ", "") == "hi</s>paris</s>"
    # Llama without a template: the plain fallback; EOS appended and trained
    (example,) = load(tokenizer, tmp_path, "llama", max_seq_len=256).train
    assert example.tokens[-1] == 2
    assert trained_text(tokenizer, example).replace(" ", "") == "hi\nparis\n</s>"
    (example,) = load(tokenizer, tmp_path, "llama", max_seq_len=256, train_on_prompt=True).train
    assert example.mask[1:].all()


BAD_ROWS = {
    "not JSON": ('{"text": "unterminated', "not valid JSON"),
    "not an object": ('["text"]', "must be a JSON object"),
    "unknown keys": ({"text": "a", "label": 1}, "unknown keys"),
    "prompt without completion": ({"prompt": "a"}, "do not make a row"),
    "empty object": ({}, "empty row"),
    "empty text": ({"text": "  "}, "'text' is empty"),
    "empty completion": ({"prompt": "a", "completion": ""}, "'completion' is empty"),
    "text not a string": ({"text": 3}, "must be a string"),
    "empty messages": ({"messages": []}, "'messages' is empty"),
    "no assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    "bad role": ({"messages": [{"role": "bot", "content": "hi"}]}, "role 'bot'"),
    "empty content": ({"messages": [{"role": "assistant", "content": ""}]}, "empty content"),
    "too long": ({"text": "the quick brown fox " * 30}, "longer than --max-seq-len 64"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_row_is_reported_with_file_and_line(tokenizer, tmp_path, case):
    bad, reason = BAD_ROWS[case]
    good = {"text": "all that glitters is not gold"}
    path = write_jsonl(tmp_path, "train", [good, good, bad, good])
    with pytest.raises(DataError) as error:
        load(tokenizer, tmp_path)
    message = str(error.value)
    assert f"{path}:3: " in message and reason in message
    assert "1 bad row" in message and "--skip-bad-rows" in message
    splits = load(tokenizer, tmp_path, skip_bad_rows=True)
    assert len(splits.train) == 3
    assert [(b.path, b.line) for b in splits.skipped] == [(path, 3)]


def test_bad_rows_in_every_split_are_all_listed(tokenizer, tmp_path):
    write_jsonl(tmp_path, "train", [{"text": "a b"}, "nope", "", {"text": ""}])
    write_jsonl(tmp_path, "valid", [{"x": 1}])
    with pytest.raises(DataError) as error:
        load(tokenizer, tmp_path)
    message = str(error.value)
    assert "3 bad row(s)" in message  # the blank line 3 is not a row
    for where in ("train.jsonl:2:", "train.jsonl:4:", "valid.jsonl:1:"):
        assert where in message


def test_missing_folder_or_train_file(tokenizer, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(tokenizer, tmp_path / "nowhere")
    write_jsonl(tmp_path, "valid", [{"text": "a"}])
    with pytest.raises(DataError, match=r"has no train\.jsonl"):
        load(tokenizer, tmp_path)
    write_jsonl(tmp_path, "train", ["{}"])
    with pytest.raises(DataError, match="no usable rows"):
        load(tokenizer, tmp_path, skip_bad_rows=True)


def examples_of_lengths(lengths: list[int]) -> list[Example]:
    return [Example(np.arange(n, dtype=np.int32) + 10 * i, np.ones(n, bool)) for i, n in
            enumerate(lengths)]  # fmt: skip


def test_an_epoch_covers_every_example_and_buckets_by_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, 100).tolist()
    batches = epoch_batches(lengths, 4, seed=1, epoch=0)
    assert len(batches) == 25
    assert sorted(np.concatenate(batches).tolist()) == list(range(100))
    # length-sorted windows pad far less than random batches would
    pad = sum(max(lengths[i] for i in b) * 4 - sum(lengths[i] for i in b) for b in batches)
    shuffled = rng.permutation(100).reshape(25, 4)
    pad_random = sum(max(lengths[i] for i in b) * 4 - sum(lengths[i] for i in b) for b in shuffled)
    assert pad < pad_random / 3
    assert not np.array_equal(epoch_batches(lengths, 4, 1, 1), batches)  # a new order each epoch
    # an incomplete last batch is topped up so no example is left out
    assert sorted(set(np.concatenate(epoch_batches(lengths[:10], 4, 1, 0)).tolist())) == list(
        range(10)
    )


def test_batches_resume_at_a_position_and_split_among_processes():
    examples = examples_of_lengths([7, 9, 12, 15, 20, 33, 40, 41, 50, 64])
    stream = train_batches(examples, 4, seed=3)
    whole = [next(stream) for _ in range(8)]  # crosses epochs (3 batches each)
    resumed = train_batches(examples, 4, seed=3, start=5)
    for expected in whole[5:]:
        got = next(resumed)
        assert np.array_equal(got.inputs, expected.inputs)
    for batch in whole:
        assert batch.inputs.shape[1] % 32 == 0
        # targets are the inputs shifted by one; the mask is 0 on padding
        for row_in, row_t, row_m in zip(batch.inputs, batch.targets, batch.mask, strict=True):
            n = int(row_m.sum())
            assert np.array_equal(row_t[: n - 1], row_in[1:n])
            assert not row_m[n:].any()
    shares = [train_batches(examples, 4, seed=3, rank=r, world=2) for r in range(2)]
    for expected in whole[:4]:
        parts = [next(s) for s in shares]
        rows = {tuple(r[r > 0]) for p in parts for r in p.inputs}
        assert rows == {tuple(r[r > 0]) for r in expected.inputs}
        assert all(len(p.inputs) == 2 for p in parts)
