"""Constrained decoding (engine/constraint.py): the llguidance matcher of each row.

Both tokenizer kinds the families use, on tiny random models: SentencePiece with byte fallback
(OpenELM's and OpenLLaMA's Llama-2 kind) and byte-level BPE (SmolLM2's and Llama 3's kind).
Whatever a random model prefers, the constrained output must match in full: Python's `re` and
`jsonschema` are the oracles. The real SmolLM2 answers a set of schemas (greedy and sampled).
Decoding here is a plain loop (mask -> choose -> advance) over the model's own KV cache.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from elm_mlx.cli.chat import set_option
from elm_mlx.cli.main import app
from tiny_models import load_smollm2_example, write_tiny_chat_model
from typer.testing import CliRunner

from elm_mlx import batch_generate, generate, load, stream_generate
from elm_mlx.engine.chat_session import ChatSession
from elm_mlx.engine.config import GenerationConfig
from elm_mlx.engine.constraint import ConstraintSpec, apply_mask, bridge
from elm_mlx.errors import ChatError, OptionError
from elm_mlx.models import make_cache
from elm_mlx.tokenizer import encode_prompt, render_chat

runner = CliRunner()
KINDS = {"spm": "zephyr", "bpe": "chatml"}  # tokenizer kind -> tiny chat model kind

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "enum_and_bounds": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
            "ok": {"type": "boolean"},
        },
        "required": ["color", "age", "score", "ok"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                "minItems": 2,
                "maxItems": 4,
            }
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
}
REGEX = r"(yes|no|café) [0-9]{1,3}(\.[0-9]{1,2})? ✓"  # non-ASCII: byte-fallback pieces
GRAMMAR = r"""
start: sum
sum: term (("+" | "-") term){0,3}
term: NUMBER | "(" sum ")"
NUMBER: /[1-9][0-9]{0,2}/
"""


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, tuple]:
    root = tmp_path_factory.mktemp("constrain")
    return {kind: load(write_tiny_chat_model(root / kind, chat)) for kind, chat in KINDS.items()}


def decode(model, tokenizer, prompt: list[int], spec, max_tokens=120, temperature=0.0, seed=0):
    """Constrained decoding by hand: -> (tokens, finished, constraint)."""
    constraint = spec.build(tokenizer, model.args.vocab_size)
    eos = set(tokenizer.eos_token_ids)
    key = mx.random.key(seed)
    cache = make_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[0, -1]  # (V,)
    tokens: list[int] = []
    for _ in range(max_tokens):
        logits = apply_mask(logits, constraint.mask())
        if temperature > 0:
            key, sub = mx.random.split(key)
            token = int(mx.random.categorical(logits / temperature, key=sub))
        else:
            token = int(mx.argmax(logits))
        constraint.advance(token)
        if token in eos:
            return tokens, True, constraint
        tokens.append(token)
        if constraint.done:
            return tokens, True, constraint
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
    return tokens, False, constraint


# ---------------------------------------------------------------------------- tokenizer bridge


@pytest.mark.parametrize("kind", KINDS)
def test_bridge_reads_each_token_as_the_tokenizer_decodes_it(tiny_models, kind):
    _, tokenizer = tiny_models[kind]
    b = bridge(tokenizer)
    assert b is bridge(tokenizer)  # built once per tokenizer
    assert b.vocab_size == len(tokenizer._tokenizer)
    for text in ["hello there, how are you?", "café ✓ 42", "tab\tand\nnewline {}"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b.lltok.decode_str(ids).strip() == tokenizer.decode(ids).strip() == text
    if kind == "spm":  # characters outside the tiny vocabulary go through byte pieces
        ids = tokenizer.encode("✓", add_special_tokens=False)
        assert any(tokenizer._tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_output_matches_in_full(tiny_models, kind, temperature):
    model, tokenizer = tiny_models[kind]
    prompt = encode_prompt(tokenizer, "hello there, how are you today?")
    for seed in range(2 if temperature else 1):
        spec = ConstraintSpec("regex", REGEX)
        tokens, finished, _ = decode(model, tokenizer, prompt, spec, temperature=temperature)
        text = tokenizer.decode(tokens)
        assert finished and re.fullmatch(REGEX, text), (text, seed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", SCHEMAS)
def test_schema_output_validates(tiny_models, kind, name):
    model, tokenizer = tiny_models[kind]
    prompt = encode_prompt(tokenizer, "tell me about the weather in paris")
    spec = ConstraintSpec.json_schema(SCHEMAS[name])
    for temperature in (0.0, 1.0):
        tokens, finished, constraint = decode(
            model, tokenizer, prompt, spec, max_tokens=300, temperature=temperature
        )
        assert finished and constraint.done
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMAS[name])


@pytest.mark.parametrize("kind", KINDS)
def test_json_object_and_grammar(tiny_models, kind):
    model, tokenizer = tiny_models[kind]
    prompt = encode_prompt(tokenizer, "my name is alice")
    tokens, finished, _ = decode(model, tokenizer, prompt, ConstraintSpec("json_object"), 300, 1.0)
    # a random model may write an unbounded string; what it wrote must still be JSON so far
    text = tokenizer.decode(tokens)
    if finished:
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")
    for seed in range(3):
        spec = ConstraintSpec("grammar", GRAMMAR)
        tokens, finished, _ = decode(model, tokenizer, prompt, spec, temperature=1.0, seed=seed)
        text = tokenizer.decode(tokens)
        assert finished and re.fullmatch(r"[-+()0-9]+", text), text
        eval(compile(text, "<grammar output>", "eval"), {})  # parses as an arithmetic expression


# ---------------------------------------------------------------------------- matcher state


def test_eos_allowed_exactly_when_the_output_may_end(tiny_models):
    _, tokenizer = tiny_models["bpe"]
    (eos,) = tokenizer.eos_token_ids
    vocab = len(tokenizer._tokenizer) + 40  # a model head wider than the tokenizer
    c = ConstraintSpec("regex", "ab?").build(tokenizer, vocab)
    first = np.array(c.mask())
    assert first.shape == (vocab,) and not first[eos] and not first[-40:].any()
    (a,) = tokenizer.encode("a", add_special_tokens=False)
    assert first[a]
    c.advance(a)
    after = np.array(c.mask())
    assert after[eos] and not c.done and c.accepting
    c.advance(eos)
    assert c.done


def test_rollback_and_proposals(tiny_models):
    _, tokenizer = tiny_models["bpe"]
    (eos,) = tokenizer.eos_token_ids
    spec = ConstraintSpec.json_schema(SCHEMAS["enum_and_bounds"])
    text = '{"color": "red", "age": 7, "score": 0.5, "ok": true}'
    ids = tokenizer.encode(text, add_special_tokens=False)
    c = spec.build(tokenizer, len(tokenizer._tokenizer))
    step_masks = []
    for t in ids:
        step_masks.append(np.array(c.mask()))
        c.advance(t)
    assert c.done
    c.advance(eos)  # EOS after a finished output changes nothing
    c.rollback(1)
    assert c.done
    c.rollback(len(ids) - 3)
    assert not c.done and np.array_equal(np.array(c.mask()), step_masks[3])
    # a proposal: the valid prefix, and the masks after each of its tokens
    wrong = tokenizer.encode("}", add_special_tokens=False)
    proposal = ids[3:8] + wrong + ids[8:10]
    assert c.valid_prefix(proposal) == 5
    masks = np.array(c.masks(proposal[:5]))
    assert all(np.array_equal(masks[i], step_masks[3 + i]) for i in range(6))
    assert np.array_equal(np.array(c.mask()), step_masks[3])  # state unchanged
    with pytest.raises(ValueError, match="breaks the constraint"):
        c.advance(wrong[0])
    assert c.valid_prefix([len(tokenizer._tokenizer) + 5]) == 0  # a padding row of the head


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (ConstraintSpec("regex", "a(b", "--regex"), "unclosed group"),
        (ConstraintSpec("json_schema", "{not json", "schema"), "not valid JSON"),
        (ConstraintSpec("json_schema", "[1, 2]", "schema"), "must be a JSON object"),
        (ConstraintSpec.json_schema({"type": "bogus"}, "schema"), "Invalid type"),
        (ConstraintSpec.json_schema({"not": {"type": "string"}}, "schema"), "not"),
        (ConstraintSpec.json_schema({"$ref": "https://example.com/s.json"}, "s"), "example.com"),
        (ConstraintSpec("grammar", "start: missing", "--grammar"), "missing"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(tiny_models, spec, reason):
    with pytest.raises(OptionError) as e:
        spec.validate()  # without a tokenizer, before any model is loaded
    assert e.value.option == spec.field and reason in e.value.problem
    with pytest.raises(OptionError, match=re.escape(reason)):
        spec.check(tiny_models["bpe"][1])
    with pytest.raises(OptionError) as e:
        GenerationConfig(constraint=spec).validate()
    assert e.value.option == spec.field


def test_config_takes_a_constraint():
    spec = ConstraintSpec("regex", "[a-z]+")
    GenerationConfig(constraint=spec).validate()
    with pytest.raises(OptionError, match="constraint"):
        GenerationConfig(constraint="[a-z]+").validate()  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="unknown constraint kind"):
        ConstraintSpec("xml", "<a/>")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def smollm2():
    example = load_smollm2_example()
    return load(Path(example.build_hf_folder(example.default_cache_dir())))


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEMAS)
def test_smollm2_answers_validate(smollm2, name):
    model, tokenizer = smollm2
    question = "Describe a person as JSON: " + json.dumps(SCHEMAS[name])
    messages = [{"role": "user", "content": question}]
    prompt = encode_prompt(tokenizer, render_chat(tokenizer, messages, model.model_type))
    spec = ConstraintSpec.json_schema(SCHEMAS[name])
    for temperature, seed in ((0.0, 0), (0.8, 1)):
        tokens, finished, _ = decode(model, tokenizer, prompt, spec, 200, temperature, seed)
        assert finished
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMAS[name])
    if name == "nested":  # the engine's rows: the same greedy answer, also speculating
        config = GenerationConfig(max_tokens=200, constraint=spec)
        greedy = tokenizer.decode(decode(model, tokenizer, prompt, spec, 200)[0])
        assert generate(model, tokenizer, prompt, config) == greedy
        assert generate(model, tokenizer, prompt, replace(config, prompt_lookup=4)) == greedy


@pytest.mark.slow
def test_smollm2_regex_and_grammar(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is 12 plus 30? Answer as a sum."}]
    prompt = encode_prompt(tokenizer, render_chat(tokenizer, messages, model.model_type))
    tokens, finished, _ = decode(model, tokenizer, prompt, ConstraintSpec("grammar", GRAMMAR))
    text = tokenizer.decode(tokens)
    assert finished and re.fullmatch(r"[-+()0-9]+", text), text
    eval(compile(text, "<grammar output>", "eval"), {})
    tokens, finished, _ = decode(model, tokenizer, prompt, ConstraintSpec("regex", REGEX))
    assert finished and re.fullmatch(REGEX, tokenizer.decode(tokens))


# ---------------------------------------------------------------------------- the engine's rows

PROMPT = "tell me about the weather in paris"


@pytest.mark.parametrize("kind", KINDS)
def test_engine_constrained_alone_batched_and_speculating(tiny_models, kind):
    """Greedy constrained output is the same alone, speculating (prompt lookup, self-draft)
    and in a batch beside unconstrained and sampled rows; every output matches."""
    model, tokenizer = tiny_models[kind]
    schema = SCHEMAS["enum_and_bounds"]
    base = GenerationConfig(max_tokens=300, constraint=ConstraintSpec.json_schema(schema))
    alone = generate(model, tokenizer, PROMPT, base)
    jsonschema.validate(json.loads(alone), schema)
    assert generate(model, tokenizer, PROMPT, replace(base, prompt_lookup=4)) == alone
    assert generate(model, tokenizer, PROMPT, replace(base, draft_model=model)) == alone
    regex = GenerationConfig(max_tokens=100, constraint=ConstraintSpec("regex", REGEX))
    configs = [
        replace(base, prompt_lookup=3),
        GenerationConfig(max_tokens=12),
        replace(base, temperature=1.0, seed=7),
        replace(regex, temperature=1.0, seed=3, prompt_lookup=2),
        replace(regex, repetition_penalty=1.3),
    ]
    outs = batch_generate(model, tokenizer, [PROMPT] * len(configs), configs)
    assert outs[0] == alone
    assert outs[1] == generate(model, tokenizer, PROMPT, configs[1])
    jsonschema.validate(json.loads(outs[2]), schema)
    assert outs[2] == generate(model, tokenizer, PROMPT, configs[2])  # seeded: same alone
    assert re.fullmatch(REGEX, outs[3]) and re.fullmatch(REGEX, outs[4]), outs[3:]


def test_engine_finish_reasons(tiny_models):
    model, tokenizer = tiny_models["bpe"]
    spec = ConstraintSpec.json_schema(SCHEMAS["enum_and_bounds"])  # more than 5 tokens
    config = GenerationConfig(max_tokens=300, constraint=spec)
    *_, last = stream_generate(model, tokenizer, PROMPT, config)
    assert last.finish_reason == "stop"  # the object closed: nothing may follow
    whole = generate(model, tokenizer, PROMPT, config)
    pieces = [
        r.text for r in stream_generate(model, tokenizer, PROMPT, replace(config, max_tokens=5))
    ]
    *_, last = stream_generate(model, tokenizer, PROMPT, replace(config, max_tokens=5))
    assert last.finish_reason == "length" and whole.startswith("".join(pieces))


def test_engine_refuses_a_spec_the_tokenizer_cannot_use(tiny_models):
    model, tokenizer = tiny_models["bpe"]
    spec = ConstraintSpec("grammar", 'start: "a" <[99999]>', "grammar")  # no such token
    with pytest.raises(OptionError) as e:
        generate(model, tokenizer, PROMPT, constraint=spec)
    assert e.value.option == "grammar"


# ---------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--regex", "a(b"], "error: --regex is not usable for constrained decoding"),
        (["--json-schema", "missing.json"], "error: --json-schema cannot read missing.json"),
        (["--grammar", "missing.lark"], "error: --grammar cannot read missing.lark"),
        (["--json", "--regex", "[a-z]+"], "error: --regex cannot be combined with --json"),
    ],
)
def test_cli_refuses_bad_constraints_before_loading(flags, message):
    args = ["generate", "-m", "no-such-model-folder", "-p", "hi", *flags]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and message in result.stderr, result.stderr


def test_chat_set_json_schema(tiny_models, tmp_path):
    model, tokenizer = tiny_models["bpe"]
    session = ChatSession(model, tokenizer)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS["array"]))
    set_option(session, "json_schema", str(schema))
    assert session.config.constraint == ConstraintSpec.json_schema(SCHEMAS["array"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "bogus"}')
    with pytest.raises(ChatError, match="Invalid type"):
        set_option(session, "json_schema", str(bad))
    assert session.config.constraint is not None  # unchanged
    set_option(session, "json_schema", "none")
    assert session.config.constraint is None


def test_cli_generate_and_chat_constrained(tiny_models, tmp_path):
    folder = str(tmp_path / "model")
    write_tiny_chat_model(tmp_path / "model", "chatml")
    model, tokenizer = load(folder)
    args = ["generate", "-m", folder, "-p", PROMPT, "--max-tokens", "100", "--regex", REGEX]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert re.fullmatch(REGEX, result.stdout.removesuffix("\n"))
    config = GenerationConfig(max_tokens=100, constraint=ConstraintSpec("regex", REGEX))
    assert result.stdout == generate(model, tokenizer, PROMPT, config) + "\n"
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS["array"]))
    result = runner.invoke(
        app,
        ["chat", "-m", folder, "--json-schema", str(schema), "--max-tokens", "300"],
        input="hello there\nmy name is alice\n",
    )
    assert result.exit_code == 0, result.stderr
    decoder, text, answers = json.JSONDecoder(), result.stdout, []
    while text.strip():  # the answers, each followed by a newline (they may hold newlines)
        answer, end = decoder.raw_decode(text)
        assert text[end] == "\n"
        answers.append(answer)
        text = text[end + 1 :]
    assert len(answers) == 2
    for answer in answers:
        jsonschema.validate(answer, SCHEMAS["array"])
