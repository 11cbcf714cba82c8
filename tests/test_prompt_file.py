"""Prompt caches on disk: a file round-trips, generation continuing after it gives the greedy
tokens of the uncached prompt, and files made for another model or other KV settings, or
damaged, are refused with a message naming what differs."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny_data import random_ids

from elm_mlx import batch_generate, generate
from elm_mlx.engine import prompt_file
from elm_mlx.engine.batch_kv import KVConfig
from elm_mlx.engine.config import GenerationConfig
from elm_mlx.engine.prompt_cache import PromptCache
from elm_mlx.errors import PromptCacheError
from elm_mlx.loader import load as load_model
from elm_mlx.models import make_cache

HEAD64 = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.mark.parametrize("kv", [KVConfig(), KVConfig(bits=8)], ids=["full", "kv8"])
def test_prompt_file_round_trip_and_continue(tiny, tmp_path, kv):
    model, tokenizer = tiny.load("llama", HEAD64)
    prompt = random_ids(40, seed=4)
    layers, start = prompt_file.prefill(model, prompt, kv, chunk=16)
    path = prompt_file.save(tmp_path / "p.safetensors", prompt, layers, "tiny", model, kv)
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary left
    tokens, loaded, start = prompt_file.load(path, "tiny", model, kv)
    assert tokens == prompt and start == 0
    for (k, v), (k2, v2) in zip(layers, loaded, strict=True):
        assert mx.array_equal(k, k2) and mx.array_equal(v, v2)
    if kv.bits is None:  # a full-precision prefill holds what a plain KVCache does
        cache = make_cache(model)
        model(mx.array(prompt, mx.uint32)[None], cache=cache)
        np.testing.assert_allclose(np.array(loaded[-1][0]), np.array(cache[-1].state[0]), atol=1e-5)
    # continuing after the file: the rest is fed, the cached prompt is not
    cache = PromptCache()
    cache.insert(tokens, loaded, kv)
    full = prompt + random_ids(5, seed=8)
    assert cache.fetch(full, kv)[0] == len(prompt)
    config = GenerationConfig(max_tokens=12)
    if kv.bits is None:
        got = batch_generate(model, tokenizer, [full], config, prompt_cache=cache)
        assert got == [generate(model, tokenizer, full, config)]


def test_prompt_file_refuses_other_models_settings_and_damage(tiny, tmp_path):
    model, _ = tiny.load("llama", HEAD64)
    other, _ = tiny.load("llama")
    prompt = random_ids(10, seed=1)
    path = prompt_file.save(
        tmp_path / "p.safetensors", prompt, prompt_file.prefill(model, prompt)[0], "tiny", model
    )
    with pytest.raises(PromptCacheError, match=r"made with model 'tiny'.*this run uses model 'x'"):
        prompt_file.load(path, "x", model)
    with pytest.raises(PromptCacheError, match="config"):
        prompt_file.load(path, "tiny", other)
    with pytest.raises(PromptCacheError, match=r"\"bits\": null.*\"bits\": 8"):
        prompt_file.load(path, "tiny", model, KVConfig(bits=8))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PromptCacheError, match="not a readable prompt cache"):
        prompt_file.load(damaged, "tiny", model)
    plain = tmp_path / "plain.safetensors"
    mx.save_safetensors(str(plain), {"a": mx.zeros(2)})
    with pytest.raises(PromptCacheError, match="not an elm prompt cache"):
        prompt_file.load(plain, "tiny", model)


def test_elm_cache_prompt_command(tiny, tmp_path):
    """`elm cache-prompt` writes the file generation loads; a bad KV option is refused by its
    flag before anything is loaded; nothing is left half-written."""
    from elm_mlx.cli.main import app
    from typer.testing import CliRunner

    folder = tiny.converted("llama", HEAD64)
    model, tokenizer = tiny.load("llama", HEAD64)
    text = "the capital of france is paris"
    (tmp_path / "prompt.txt").write_text(text)
    out = tmp_path / "cache" / "p.safetensors"
    args = ["cache-prompt", "-m", str(folder), "--prompt-file", str(tmp_path / "prompt.txt")]
    result = CliRunner().invoke(app, [*args, "-o", str(out), "--kv-bits", "8"])
    assert result.exit_code == 0, result.output
    tokens, layers, _ = prompt_file.load(out, folder.name, model, KVConfig(bits=8))
    assert tokens == tokenizer.encode(text) and len(layers) == len(model.layers)
    bad = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "q.safetensors"), "--kv-bits", "3"])
    assert bad.exit_code == 1 and "--kv-bits must be one of (4, 8)" in bad.output
    assert not (tmp_path / "q.safetensors").exists()


def test_disk_prompt_cache_outlives_the_process(tiny, tmp_path):
    """Entries written by one DiskPromptCache are served by the next one on the same folder
    (a restart): the prompt is not fed again and the greedy answer is unchanged; the byte
    budget deletes evicted files; a damaged file is dropped with a warning, another model's left."""
    from elm_mlx.engine.prompt_file import DiskPromptCache

    model, tokenizer = tiny.load("llama", HEAD64)
    folder = tmp_path / "cache"
    prompt = random_ids(30, seed=6)
    config = GenerationConfig(max_tokens=6)
    first = DiskPromptCache(folder, "tiny", model)
    answer = batch_generate(model, tokenizer, [prompt], config, prompt_cache=first)
    files = list(folder.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    warnings = []
    again = DiskPromptCache(folder, "tiny", model, warn=warnings.append)
    assert len(again) == 1 and not warnings
    longer = prompt + random_ids(4, seed=7)
    assert again.fetch(longer)[0] >= len(prompt)
    assert batch_generate(model, tokenizer, [prompt], config, prompt_cache=again) == answer
    # a budget of one entry: the older file goes when a new one comes
    entry = again.nbytes
    small = DiskPromptCache(folder, "tiny", model, max_bytes=int(1.5 * entry))
    batch_generate(model, tokenizer, [random_ids(30, seed=9)], config, prompt_cache=small)
    assert len(small) == 1 and len(list(folder.iterdir())) == 1
    # damage and strangers
    (folder / "broken.safetensors").write_bytes(b"\x00" * 40)
    other, _ = tiny.load("llama")
    stranger = prompt_file.save(
        folder / "other.safetensors",
        prompt[:5],
        prompt_file.prefill(other, prompt[:5])[0],
        "x",
        other,
    )
    warnings = []
    DiskPromptCache(folder, "tiny", model, warn=warnings.append)
    assert any("broken.safetensors dropped" in w for w in warnings)
    assert any("other.safetensors not used" in w for w in warnings)
    assert not (folder / "broken.safetensors").exists() and stranger.exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left


def test_elm_generate_continues_after_a_prompt_cache_file(tiny, tmp_path):
    """`elm generate --prompt-cache-file F --prompt P`: the greedy text of the file's tokens and
    P's, uncached; a file made with other KV settings is refused naming both, no traceback."""
    from elm_mlx.cli.main import app
    from typer.testing import CliRunner

    folder = tiny.converted("llama", HEAD64)
    model, tokenizer = tiny.load("llama", HEAD64)
    runner = CliRunner()
    made = tmp_path / "p.safetensors"
    base = ["-m", str(folder), "-o", str(made), "--prompt", "the capital of france is paris"]
    assert runner.invoke(app, ["cache-prompt", *base]).exit_code == 0
    args = ["generate", "-m", str(folder), "--prompt", " and rome", "--max-tokens", "8"]
    result = runner.invoke(app, [*args, "--prompt-cache-file", str(made)])
    assert result.exit_code == 0, result.output
    tokens, _, _ = prompt_file.load(made, folder.name, model)
    full = tokens + tokenizer.encode(" and rome", add_special_tokens=False)
    assert result.stdout == generate(model, tokenizer, full, GenerationConfig(max_tokens=8)) + "\n"
    assert "prompt: " in result.stderr
    other = tmp_path / "q.safetensors"
    made8 = ["cache-prompt", *base[:2], "-o", str(other), *base[4:], "--kv-bits", "8"]
    assert runner.invoke(app, made8).exit_code == 0
    refused = runner.invoke(app, [*args, "--prompt-cache-file", str(other)])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert '"bits": 8' in refused.stderr and '"bits": null' in refused.stderr


def test_elm_chat_starts_from_a_prompt_cache_file(tmp_path):
    """`elm cache-prompt --chat` of a system prompt, then `elm chat --system` with the same text
    and `--prompt-cache-file`: the first turn reuses all the file's tokens and every answer is
    the chat's without the file; a file of other KV settings is refused naming both, and a file
    the conversation does not start with is warned about (answers unchanged)."""
    from elm_mlx.cli.main import app
    from tiny_models import write_tiny_chat_model
    from typer.testing import CliRunner

    folder = write_tiny_chat_model(tmp_path / "chatml", "chatml")
    system = "you are a helpful assistant who answers briefly"
    runner = CliRunner()
    made = tmp_path / "system.safetensors"
    make = ["cache-prompt", "-m", str(folder), "--chat", "--prompt", system]
    assert runner.invoke(app, [*make, "-o", str(made)]).exit_code == 0
    tokens, _, _ = prompt_file.load(made, folder.name, load_model(folder)[0])
    assert len(tokens) > 5
    chat = ["chat", "-m", str(folder), "--system", system, "--max-tokens", "6"]
    lines = "hello there\nand rome?\n"
    plain = runner.invoke(app, chat, input=lines)
    cached = runner.invoke(app, [*chat, "--prompt-cache-file", str(made)], input=lines)
    assert plain.exit_code == 0 and cached.exit_code == 0, cached.output
    assert cached.stdout == plain.stdout and plain.stdout.count("\n") == 2
    assert f"+ {len(tokens)} cached tokens" in cached.stderr  # the first turn
    assert "+ 0 cached tokens" in plain.stderr and "warning" not in cached.stderr
    # another system prompt: the file is used only as far as it matches, with a warning
    other = runner.invoke(
        app, ["chat", "-m", str(folder), "--system", "be terse", "--max-tokens", "6",
              "--prompt-cache-file", str(made)], input=lines,
    )  # fmt: skip
    assert other.exit_code == 0 and f"of the {len(tokens)} tokens of {made}" in other.stderr
    alone = runner.invoke(
        app, ["chat", "-m", str(folder), "--system", "be terse", "--max-tokens", "6"], input=lines
    )
    assert other.stdout == alone.stdout
    # other KV settings: refused, naming both, no traceback
    windowed = tmp_path / "window.safetensors"
    assert runner.invoke(app, [*make, "-o", str(windowed), "--max-kv-size", "64"]).exit_code == 0
    refused = runner.invoke(app, [*chat, "--prompt-cache-file", str(windowed)], input=lines)
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert '"max_size": 64' in refused.stderr and '"max_size": null' in refused.stderr
    assert refused.stdout == ""


def test_a_prompt_past_a_sliding_window_is_cached_and_continues_exactly(tiny, tmp_path):
    """OLMo 3 (sliding layers over 8 positions): a prompt long enough that its sliding layers
    dropped positions goes through a file and continues as the uncached prompt; the file serves
    no prefix shorter than its `start` (the positions a continuation would look back at are
    gone), and such a prompt is then computed, not reused wrong."""
    model, tokenizer = tiny.load("olmo3")
    prompt = random_ids(400, vocab=300, seed=7)
    layers, start = prompt_file.prefill(model, prompt, chunk=64)
    assert 8 < start < len(prompt)  # positions were dropped
    path = prompt_file.save(tmp_path / "p.safetensors", prompt, layers, "tiny", model, start=start)
    tokens, layers, start = prompt_file.load(path, "tiny", model)
    cache = PromptCache()
    cache.insert(tokens, layers, start=start)
    config = GenerationConfig(max_tokens=8)
    full = prompt + random_ids(5, vocab=300, seed=6)
    short = prompt[: start - 1] + random_ids(5, vocab=300, seed=8)
    assert cache.fetch(full)[0] == len(prompt) and cache.fetch(short) == (0, None)
    for p in (full, short):
        assert batch_generate(model, tokenizer, [p], config, prompt_cache=cache) == [
            generate(model, tokenizer, p, config)
        ]
