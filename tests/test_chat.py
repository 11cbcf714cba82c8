"""ChatSession: the KV cache kept across turns, context overflow, save/load, prompt formats,
and the hub-id model cache. Tiny random models (tests/tiny_models.py); the oracle for every
answer is plain greedy decoding of the whole rendered conversation without any cache."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from elm_mlx.cli.chat import set_option
from elm_mlx.cli.main import app
from elm_mlx.convert.hub_cache import cached_model_dir, ensure_model
from tiny_models import write_tiny_chat_model
from tiny_tokenizers import CHAT_CORPUS, CHAT_KINDS
from typer.testing import CliRunner

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)
from elm_mlx.engine.chat_session import ChatSession, load_template
from elm_mlx.engine.config import GenerationConfig
from elm_mlx.errors import ChatError, ModelNotFoundError
from elm_mlx.loader import load, read_config
from elm_mlx.tokenizer import common_prefix, encode_prompt, render_chat

SYSTEM = "you are a helpful assistant who answers briefly"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {kind: write_tiny_chat_model(root / kind, kind) for kind in CHAT_KINDS}


@pytest.fixture(params=CHAT_KINDS)
def kind(request):
    return request.param


def greedy(model, ids: list[int], n: int, eos: set[int]) -> list[int]:
    """Oracle: the whole sequence through the model at every step, no cache."""
    out: list[int] = []
    seq = list(ids)
    for _ in range(n):
        token = int(mx.argmax(model(mx.array(seq)[None])[0, -1]).item())
        out.append(token)
        seq.append(token)
        if token in eos:
            break
    return out


def assert_cache_holds(session: ChatSession) -> None:
    """The cache's keys and values are those of `cache_tokens`: the next logits from the
    cache equal a fresh forward pass over cache_tokens + one more token."""
    probe = 5
    held, layers = session.cache.fetch([*session.cache_tokens, probe])
    assert held == len(session.cache_tokens)
    cached = session.model(mx.array([[probe]]), cache=layers)[0, -1]
    fresh = session.model(mx.array([*session.cache_tokens, probe])[None])[0, -1]
    np.testing.assert_allclose(np.array(cached), np.array(fresh), atol=1e-4, rtol=1e-4)


def ask(session: ChatSession, text: str) -> tuple[list[int], list[int]]:
    """Send `text`; return (the conversation's tokens for this answer, the answer's tokens)."""
    session.messages.append({"role": "user", "content": text})
    prompt = session.tokens()
    return prompt, [r.token for r in session.stream()]


# ----------------------------------------------------------------------------- cache reuse


def test_second_turn_prefills_only_new_tokens(folders, kind):
    model, tokenizer = load(folders[kind])
    eos = set(tokenizer.eos_token_ids)
    session = ChatSession(model, tokenizer, system=SYSTEM, config=GenerationConfig(max_tokens=6))
    first_prompt, first = ask(session, "hello there, how are you today?")
    assert first == greedy(model, first_prompt, len(first), eos)
    held = list(session.cache_tokens)
    assert held == (first_prompt + first)[: len(held)]

    prompt, second = ask(session, "tell me about the weather in rome")
    turn = session.stats.last
    assert turn.reused_tokens == common_prefix(held, prompt)
    # Everything up to the first answer came from the cache; at most the boundary token of
    # the plain format (`Assistant:` + answer) re-tokenizes differently.
    assert turn.reused_tokens >= len(first_prompt) - (kind == "plain")
    assert turn.prompt_tokens == len(prompt) - turn.reused_tokens
    assert turn.prompt_tokens < len(prompt) - len(first_prompt) + 2
    assert second == greedy(model, prompt, len(second), eos)
    assert_cache_holds(session)


def test_cache_after_eos_and_after_max_tokens(folders):
    """The cache holds every token of the turn but the last (the next input, never fed), after
    EOS as after max_tokens; the next turn reuses exactly that."""
    model, tokenizer = load(folders["chatml"])
    session = ChatSession(model, tokenizer, config=GenerationConfig(max_tokens=5))
    prompt, answer = ask(session, "hello there")
    assert session.stats.last.finish_reason == "length"
    assert session.cache_tokens == prompt + answer[:-1]
    assert_cache_holds(session)

    session.messages.append({"role": "user", "content": "remember the word banana"})
    prompt = session.tokens()
    expected = greedy(model, prompt, 3, set())
    tokenizer.add_eos_token(str(expected[2]))  # the third greedy token now ends the answer
    expected = expected[: expected.index(expected[2]) + 1]
    answer = [r.token for r in session.stream()]
    assert answer == expected
    assert session.stats.last.finish_reason == "stop"
    assert session.cache_tokens == prompt + answer[:-1]
    assert_cache_holds(session)


@pytest.mark.parametrize("prompt_lookup", [None, 3])
def test_stopping_early_keeps_the_partial_answer(folders, kind, prompt_lookup):
    model, tokenizer = load(folders[kind])
    eos = set(tokenizer.eos_token_ids)
    config = GenerationConfig(max_tokens=20, prompt_lookup=prompt_lookup)
    session = ChatSession(model, tokenizer, config=config)
    stream = session.send(" ".join(CHAT_CORPUS))  # long enough for prompt lookup to propose
    tokens = [next(stream).token for _ in range(3)]
    stream.close()  # what Ctrl-C does
    assert session.stats.last.finish_reason == "interrupted"
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert tokenizer.decode(tokens).startswith(session.messages[-1]["content"])
    assert_cache_holds(session)

    prompt, answer = ask(session, "which word did I ask you to remember?")
    assert answer == greedy(model, prompt, len(answer), eos)


def test_prompt_lookup_keeps_answers_and_cache_exact(folders, kind):
    """Speculative decoding leaves the cache one token short of the answer (the last token is
    the next input) and rewinds rejected proposals; the session follows either way."""
    model, tokenizer = load(folders[kind])
    eos = set(tokenizer.eos_token_ids)
    config = GenerationConfig(max_tokens=12, prompt_lookup=3)
    session = ChatSession(model, tokenizer, system=SYSTEM, config=config)
    for question in ("hello there, hello there, hello there", "remember the word banana"):
        prompt, answer = ask(session, question)
        assert answer == greedy(model, prompt, len(answer), eos)
        assert session.cache_tokens == (prompt + answer)[: len(session.cache_tokens)]
        assert_cache_holds(session)
    assert session.stats.last.reused_tokens > 0


def test_nothing_generated_withdraws_the_question(folders):
    model, tokenizer = load(folders["chatml"])
    session = ChatSession(model, tokenizer, system=SYSTEM, max_context=40)
    with pytest.raises(ChatError, match="context holds 40"):
        list(session.send("hello there " * 30))
    assert [m["role"] for m in session.messages] == ["system"]
    assert session.cache_tokens == []  # the cache was never touched


# ----------------------------------------------------------------------------- overflow


def test_context_overflow_drops_oldest_turns(folders, kind):
    model, tokenizer = load(folders[kind])
    eos = set(tokenizer.eos_token_ids)
    questions = [f"question {i}: tell me about the weather in paris" for i in range(8)]
    one = ChatSession(model, tokenizer, system=SYSTEM)
    one.messages.append({"role": "user", "content": questions[0]})
    max_tokens = 8
    limit = len(one.tokens()) + max_tokens + 40  # room for about two turns
    config = GenerationConfig(max_tokens=max_tokens)
    session = ChatSession(model, tokenizer, system=SYSTEM, config=config, max_context=limit)
    dropped = 0
    for q in questions:
        answer = [r.token for r in session.send(q)]
        dropped += session.dropped
        before = session.messages[:-1]  # the conversation this answer was given to
        prompt = encode_prompt(tokenizer, render_chat(tokenizer, before, model.model_type))
        assert len(prompt) + max_tokens <= limit
        assert answer == greedy(model, prompt, len(answer), eos)
        assert session.messages[0] == {"role": "system", "content": SYSTEM}
        users = [m["content"] for m in session.messages if m["role"] == "user"]
        assert users == questions[questions.index(q) - len(users) + 1 : questions.index(q) + 1]
    assert dropped > 0
    assert len(session.messages) < 1 + 2 * len(questions)


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip(folders, tmp_path):
    model, tokenizer = load(folders["chatml"])
    config = GenerationConfig(max_tokens=6)
    first = ChatSession(model, tokenizer, system=SYSTEM, config=config)
    list(first.send("hello there"))
    list(first.send("tell me about paris"))
    path = first.save(tmp_path / "conversation.json")
    assert json.loads(path.read_text()) == {"messages": first.messages}

    second = ChatSession(model, tokenizer, config=config)
    second.load(path)
    assert second.messages == first.messages
    a = [r.token for r in first.send("and rome?")]
    b = [r.token for r in second.send("and rome?")]
    assert a == b
    assert second.stats.last.reused_tokens == 0 < first.stats.last.reused_tokens
    assert first.messages == second.messages

    (tmp_path / "list.json").write_text(json.dumps(first.messages))  # a bare list loads too
    second.load(tmp_path / "list.json")
    assert second.messages == first.messages


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("{not json", "not valid JSON"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "message 0"),
        ('{"messages": "hello"}', "expected"),
    ],
)
def test_load_rejects_bad_files(folders, tmp_path, content, error):
    model, tokenizer = load(folders["chatml"])
    session = ChatSession(model, tokenizer, system=SYSTEM)
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ChatError, match=error) as e:
        session.load(path)
    assert str(path) in str(e.value)
    assert session.messages == [{"role": "system", "content": SYSTEM}]
    with pytest.raises(ChatError, match="cannot read"):
        session.load(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- prompt formats


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def test_openelm_gets_the_zephyr_format(folders):
    model, tokenizer = load(folders["zephyr"])
    session = ChatSession(model, tokenizer, system="Be brief.")
    session.messages.append({"role": "user", "content": "hi"})
    # the Zephyr format OpenELM-Instruct was tuned with (Apple's model card)
    assert session.render() == "<|system|>\nBe brief.</s>\n<|user|>\nhi</s>\n<|assistant|>\n"
    tokens = session.tokens()
    assert tokens[0] == 1  # BOS
    assert tokens.count(2) == 2  # each "</s>" is the EOS token, not its characters


def test_chatml_comes_from_the_tokenizer(folders):
    from transformers import AutoTokenizer

    model, tokenizer = load(folders["chatml"])
    session = ChatSession(model, tokenizer, system="Be brief.")
    session.messages.append({"role": "user", "content": "hi"})
    oracle = AutoTokenizer.from_pretrained(folders["chatml"])
    expected = oracle.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert session.render() == expected
    assert expected.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert session.tokens() == oracle(expected, add_special_tokens=False).input_ids


def test_plain_fallback_without_a_template(folders):
    model, tokenizer = load(folders["plain"])
    session = ChatSession(model, tokenizer, system="Be brief.")
    session.messages.append({"role": "user", "content": "hi"})
    assert session.render() == "Be brief.\n\nUser: hi\nAssistant:"


def test_template_file_overrides(folders, tmp_path):
    model, tokenizer = load(folders["chatml"])
    text = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    (tmp_path / "t.jinja").write_text(text)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": text}))
    for name in ("t.jinja", "tokenizer_config.json"):
        session = ChatSession(model, tokenizer, system="Be brief.")
        session.template = load_template(tmp_path / name)
        session.messages.append({"role": "user", "content": "hi"})
        assert session.render() == "[system] Be brief.\n[user] hi\n[assistant]"

    session.template = "{% for m in messages %}"  # a broken template is a clear error
    with pytest.raises(ChatError, match="chat template"):
        session.render()
    with pytest.raises(ChatError, match="cannot read the chat template"):
        load_template(tmp_path / "missing.jinja")


def test_system_reset_and_set(folders):
    model, tokenizer = load(folders["chatml"])
    session = ChatSession(model, tokenizer, system=SYSTEM, config=GenerationConfig(max_tokens=4))
    list(session.send("hello there"))
    session.set_system("Be brief.")
    assert session.messages[0] == {"role": "system", "content": "Be brief."}
    assert len(session.messages) == 3
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    session.set_system(None)
    assert session.messages == []

    set_option(session, "temp", "0.7")
    set_option(session, "max_tokens", "12")
    set_option(session, "seed", "none")
    assert (session.config.temperature, session.config.max_tokens) == (0.7, 12)
    assert session.config.seed is None
    bad = {
        ("top_p", "2"): "/set top_p must be in (0, 1], got 2.0",
        ("max_tokens", "x"): "/set max_tokens: 'x' is not a int",
        ("colour", "1"): "/set knows temp, top_p",
        ("max_tokens", "0"): "/set max_tokens must be at least 1",
    }
    for (name, value), message in bad.items():
        with pytest.raises(ChatError, match=re.escape(message)):
            set_option(session, name, value)
    assert session.config.top_p == 1.0 and session.config.max_tokens == 12


# ----------------------------------------------------------------------------- model cache


def test_hub_id_is_converted_once_then_reused(folders, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # A hub cache as snapshot_download leaves it (tests run offline): "tiny/chat" holds an HF
    # checkpoint (safetensors format "pt"), "tiny/chat-mlx" the MLX folder itself.
    def put(repo_id: str) -> Path:
        repo = tmp_path / "hf" / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folders["chatml"], repo / "snapshots" / "0123abc")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abc")
        return repo / "snapshots" / "0123abc"

    snapshot = put("tiny/chat")
    weights = snapshot / "model.safetensors"
    mx.save_safetensors(str(weights), mx.load(str(weights)), metadata={"format": "pt"})
    mlx_snapshot = put("tiny/chat-mlx")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("ELM_MLX_CACHE", str(tmp_path / "elm"))
    assert ensure_model("tiny/chat-mlx") == mlx_snapshot

    path = ensure_model("tiny/chat", progress=False)
    assert path == cached_model_dir("tiny/chat") == tmp_path / "elm/models/tiny--chat-4bit"
    assert read_config(path)["quantization"]["bits"] == 4
    eight = ensure_model("tiny/chat", bits=8, progress=False)
    assert read_config(eight)["quantization"]["bits"] == 8
    plain = ensure_model("tiny/chat", quantize=False, progress=False)
    assert "quantization" not in read_config(plain)

    shutil.rmtree(tmp_path / "hf")  # reuse needs no hub at all
    assert ensure_model("tiny/chat", progress=False) == path
    model, tokenizer = load(path)
    assert [r.token for r in ChatSession(model, tokenizer).send("hello")]


def test_local_folder_is_used_as_is(folders):
    assert ensure_model(str(folders["chatml"])) == folders["chatml"]
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        ensure_model("./no/such/folder")


def test_unreachable_hub_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("ELM_MLX_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="cannot be reached"):
        ensure_model("nobody/not-downloaded")  # HF_HUB_OFFLINE=1 (conftest): as if offline


# ----------------------------------------------------------------------------- CLI (scripted)


def test_cli_reads_one_message_per_line(folders, tmp_path):
    model, tokenizer = load(folders["chatml"])
    session = ChatSession(model, tokenizer, config=GenerationConfig(max_tokens=5))
    expected = ["".join(r.text for r in session.send(q)) for q in ("hello there", "and rome?")]

    saved = tmp_path / "c.json"
    result = CliRunner().invoke(
        app,
        ["chat", "-m", str(folders["chatml"]), "--max-tokens", "5"],
        input=f"hello there\n\n/stats\nand rome?\n/save {saved}\n/quit\nnever sent\n",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "".join(f"{a}\n" for a in expected)
    assert json.loads(saved.read_text())["messages"] == session.messages
    assert "cache:" in result.stderr


def test_cli_reports_bad_input_and_goes_on(folders, tmp_path):
    result = CliRunner().invoke(
        app,
        ["chat", "-m", str(folders["chatml"]), "--max-tokens", "3"],
        input=f"/load {tmp_path / 'missing.json'}\n/set temp hot\n/frobnicate\nhello\n",
    )
    assert result.exit_code == 0, result.output
    assert "error: cannot read" in result.stderr and "is not a float" in result.stderr
    assert "unknown command" in result.stderr
    assert result.stdout.count("\n") == 1  # the one message was answered

    missing = tmp_path / "t.jinja"
    result = CliRunner().invoke(
        app, ["chat", "-m", str(folders["chatml"]), "--chat-template", str(missing)], input=""
    )
    assert result.exit_code == 1
    assert "error: cannot read the chat template" in result.stderr
