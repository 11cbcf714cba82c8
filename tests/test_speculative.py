"""Speculative decoding (prompt lookup and draft model) against plain decoding: identical
tokens under greedy, the same distribution under sampling, caches that equal a fresh prefill."""

from __future__ import annotations

import random
from collections import Counter

import mlx.core as mx
import pytest
from elm_mlx.cli.main import app
from oracles import chi_square_p, exact_distribution
from tiny_data import lookup_prompt
from tiny_models import save_spec_model, spec_model
from tiny_tokenizers import SPEC_VOCAB, spec_tokenizer
from typer.testing import CliRunner

from elm_mlx.engine.config import (
    MAX_NGRAM,
    MAX_PROPOSAL,
    MAX_STOP_CHARS,
    MAX_STOPS,
    GenerationConfig,
)
from elm_mlx.engine.draft import DraftModel
from elm_mlx.engine.generation import stream_generate
from elm_mlx.engine.lookup import PromptLookup, lookup
from elm_mlx.engine.prompt_cache import PromptCache
from elm_mlx.engine.reference import generate_step
from elm_mlx.engine.scheduler import BatchGenerator, Request
from elm_mlx.engine.spec_budget import StepCost
from elm_mlx.engine.speculative import ProposalLength, SpeculativeStats
from elm_mlx.errors import GenerationError, OptionError
from elm_mlx.loader import load
from elm_mlx.models import make_cache
from elm_mlx.tokenizer import encode_prompt, load_tokenizer

FAMILIES = ["llama", "olmo", "openelm"]
FREE = StepCost.fixed(1.0, 0.0)  # proposals cost nothing: a row proposes all it wants


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tokenizer = load_tokenizer(spec_tokenizer(tmp_path_factory.mktemp("spm-tok")))
    tokenizer.eos_token_ids = set()  # the oracle loops do not stop at EOS
    return tokenizer


def prompts(seed: int) -> list[list[int]]:
    """Random prompts and prompts that repeat themselves (so that lookups hit)."""
    rng = random.Random(seed)
    out = [[rng.randrange(3, SPEC_VOCAB) for _ in range(n)] for n in (1, 2, 9, 33)]
    for n in (3, 7, 12):
        chunk = [rng.randrange(3, SPEC_VOCAB) for _ in range(n)]
        out.append(chunk * 3 + chunk[: n // 2])
    return out


def plain(model, prompt: list[int], config: GenerationConfig) -> list[int]:
    """The reference loop (greedy, with the config's logits processors)."""
    steps = generate_step(
        mx.array(prompt, mx.uint32),
        model,
        max_tokens=config.max_tokens,
        logits_processors=config.logits_processors(),
        prefill_step_size=config.prefill_step_size,
    )
    return [token for token, *_ in steps]


def speculative(model, tokenizer, prompt, config, prompt_cache=None, stop_after=None):
    """The engine's tokens for one request that proposes all it wants, and its statistics;
    after `stop_after` tokens the caller stops early (as a client that leaves)."""
    gen = BatchGenerator(model, tokenizer, max_batch=1, prompt_cache=prompt_cache, cost=FREE)
    rid = gen.add(Request(prompt, config))
    out, stats = [], SpeculativeStats()
    while gen.has_work and len(out) != stop_after:
        for event in gen.step():
            out.append(event.token)
            stats = event.speculative
            if len(out) == stop_after:
                break
    gen.cancel(rid, keep=True)
    return out, stats


# --- the prompt-lookup proposer, pure Python ---------------------------------------------------


def test_lookup_definition():
    assert lookup([5, 6, 7, 8, 5, 6], num=3) == [7, 8, 5]  # "5 6" seen before: copy what followed
    assert lookup([1, 2, 3, 9, 2, 3, 4, 2, 3], num=2) == [4, 2]  # the most recent occurrence
    assert lookup([1, 2, 3, 4, 9, 3, 4, 1, 2, 3, 4], num=2, max_ngram=3) == [9, 3]  # longest n
    assert lookup([1, 2, 3, 4, 9, 3, 4, 1, 2, 3, 4], num=2, max_ngram=2) == [1, 2]
    assert lookup([7, 7], num=4) == [7, 7, 7, 7]  # the copy runs on into its own output
    assert lookup([1, 2, 1, 2], num=5) == [1, 2, 1, 2, 1]
    assert lookup([1, 2, 3], num=4) == []  # nothing repeats
    assert lookup([4], num=4) == []
    assert lookup([1, 2, 1], num=0) == []


def test_prompt_lookup_index_matches_definition():
    """The indexed proposer answers like `lookup` on growing histories of small alphabets."""
    rng = random.Random(0)
    for trial in range(60):
        alphabet = rng.choice([2, 3, 5, 20])
        max_ngram = rng.choice([1, 2, 3, 4])
        proposer = PromptLookup(max_ngram)
        tokens = [rng.randrange(alphabet) for _ in range(rng.randrange(1, 6))]
        proposer.start(tokens)
        for _ in range(40):
            k = rng.randrange(0, 6)
            proposal, q = proposer.propose(tokens, k)
            assert q is None
            assert proposal == lookup(tokens, k, max_ngram), (trial, tokens, k)
            tokens += [rng.randrange(alphabet) for _ in range(rng.randrange(1, 4))]


# --- greedy: token for token identical to plain decoding ---------------------------------------


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_lookup_greedy_identity(family, bits, tok):
    model = spec_model(family, seed=0, bits=bits)
    totals = SpeculativeStats()
    configs = [
        GenerationConfig(max_tokens=30, prompt_lookup=4),
        GenerationConfig(max_tokens=17, prompt_lookup=8, max_ngram=1),
        GenerationConfig(max_tokens=9, prompt_lookup=2, prefill_step_size=5),
        GenerationConfig(max_tokens=25, prompt_lookup=6, repetition_penalty=1.3),
    ]
    for i, prompt in enumerate(prompts(seed=1)):
        for config in configs:
            expected = plain(model, prompt, config)
            got, stats = speculative(model, tok, prompt, config)
            assert got == expected, (i, config)
            assert stats.tokens == len(got) == config.max_tokens
            totals.proposed += stats.proposed
            totals.accepted += stats.accepted
    # both paths ran: runs of accepted proposals and rejections
    assert 0 < totals.accepted < totals.proposed


@pytest.mark.parametrize("family", FAMILIES)
def test_draft_model_greedy_identity(family, tok):
    model = spec_model(family, seed=0)
    drafts = {
        "4-bit copy": spec_model(family, seed=0, bits=4),  # mostly agrees
        "other model": spec_model(family, seed=1),  # mostly disagrees
    }
    rates = {}
    totals = SpeculativeStats()
    for name, draft in drafts.items():
        before = SpeculativeStats(proposed=totals.proposed, accepted=totals.accepted)
        for prompt in prompts(seed=2):
            for config in (
                GenerationConfig(max_tokens=24, draft_model=draft, num_draft=3),
                GenerationConfig(
                    max_tokens=11, draft_model=draft, num_draft=5, repetition_penalty=1.2
                ),
            ):
                got, stats = speculative(model, tok, prompt, config)
                assert got == plain(model, prompt, config), name
                totals.proposed += stats.proposed
                totals.accepted += stats.accepted
        rates[name] = (totals.accepted - before.accepted) / (totals.proposed - before.proposed)
    assert 0 < totals.accepted < totals.proposed  # runs accepted, rejections rewound
    assert rates["4-bit copy"] > rates["other model"]  # a quantized copy agrees more often


def test_refuses_draft_with_another_vocabulary(tok):
    model = spec_model("llama", seed=0)
    draft = spec_model("llama", seed=1, vocab=SPEC_VOCAB + 64)
    config = GenerationConfig(max_tokens=4, draft_model=draft)
    with pytest.raises(
        GenerationError, match=rf"vocabulary has {SPEC_VOCAB + 64} tokens.*{SPEC_VOCAB}"
    ):
        speculative(model, tok, [5, 6, 7], config)


def test_refuses_bad_options(tok):
    model = spec_model("llama")
    both = GenerationConfig(prompt_lookup=3, draft_model=spec_model("llama", seed=1))
    with pytest.raises(OptionError, match="prompt_lookup and a draft model cannot be combined"):
        speculative(model, tok, [5, 6], both)
    with pytest.raises(OptionError, match=r"num_draft must be in \[1, 64\], got 0") as e:
        speculative(model, tok, [5, 6], GenerationConfig(draft_model=model, num_draft=0))
    assert e.value.option == "num_draft"
    with pytest.raises(OptionError, match=r"max_ngram must be in \[1, 16\]"):
        speculative(model, tok, [5, 6], GenerationConfig(prompt_lookup=3, max_ngram=0))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt_lookup", MAX_PROPOSAL + 1),
        ("prompt_lookup", 10**9),
        ("num_draft", MAX_PROPOSAL + 1),
        ("max_ngram", MAX_NGRAM + 1),
        ("stop", tuple(str(i) for i in range(MAX_STOPS + 1))),
        ("stop", ("x" * (MAX_STOP_CHARS + 1),)),
    ],
)
def test_per_request_costs_are_bounded(field, value):
    """What a request may make each step cost is bounded by the one request check; the bounds
    themselves are accepted."""
    with pytest.raises(OptionError) as e:
        GenerationConfig(**{field: value}).validate()
    assert e.value.option == field and len(str(e.value)) < 200  # a short message, not the value
    GenerationConfig(
        prompt_lookup=MAX_PROPOSAL,
        num_draft=MAX_PROPOSAL,
        max_ngram=MAX_NGRAM,
        stop=tuple(str(i) + "x" * (MAX_STOP_CHARS - len(str(i))) for i in range(MAX_STOPS)),
    ).validate()


def test_prompt_lookup_cost_is_linear_in_k_and_history():
    """Counted, not timed: the proposer reads each history token O(max_ngram) times and a
    proposal of k tokens reads O(max_ngram + k) more, however large k is."""

    class Counted(list):
        reads = 0

        def __getitem__(self, i):
            Counted.reads += 1
            return super().__getitem__(i)

    for n in (1000, 4000):
        tokens = Counted([i % 7 for i in range(n)])
        proposer = PromptLookup(max_ngram=4)
        Counted.reads = 0
        proposer.start(tokens)
        assert Counted.reads <= 4 * n
        for k in (10, 10_000):
            Counted.reads = 0
            proposal, _ = proposer.propose(tokens, k)
            assert len(proposal) == k and Counted.reads <= 4 * 4 + 2 * k + 10


# --- caches ------------------------------------------------------------------------------------


def assert_entry_equals_prefill(model, cache: PromptCache, seen: list[int]) -> None:
    """The prompt cache's newest entry holds the tokens the caller saw (and the rest of the
    last run it stopped in), with a fresh prefill's keys and values."""
    tokens = cache.tokens()
    assert tokens[: len(seen)] == seen
    held, layers = cache.fetch([*tokens, 0])
    assert held == len(tokens)
    fresh = make_cache(model)
    model(mx.array(tokens, mx.uint32)[None], cache=fresh)
    for c, f in zip(layers, fresh, strict=True):
        assert c.offset == f.offset == len(tokens)
        for a, b in zip(c.state, f.state, strict=True):
            assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()


def prefilled(model, tokens: list[int]) -> PromptCache:
    """A prompt cache holding `tokens` (a conversation so far)."""
    cache = make_cache(model)
    model(mx.array(tokens, mx.uint32)[None], cache=cache)
    store = PromptCache()
    store.insert(tokens, [c.state for c in cache])
    return store


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_after_rejections_equals_fresh_prefill(family, tok):
    """When the request ends or its caller stops (mid-run or at max_tokens), the entry it
    leaves holds the earlier context, the prompt and every token but the last, as a fresh
    prefill would: rejected proposals were rewound."""
    model = spec_model(family)
    draft = spec_model(family, seed=1)
    prompt = prompts(seed=4)[5]
    before = [9, 8, 7, 6]  # a conversation so far, already in the cache
    for config in (
        GenerationConfig(max_tokens=20, prompt_lookup=5),
        GenerationConfig(max_tokens=20, draft_model=draft, num_draft=3),
    ):
        rejected = 0
        for stop_after in (20, 13, 6, 1):
            store = prefilled(model, before)
            out, stats = speculative(model, tok, before + prompt, config, store, stop_after)
            assert len(out) == stop_after
            rejected += stats.proposed - stats.accepted
            assert_entry_equals_prefill(model, store, before + prompt + out[:-1])
        assert rejected > 0  # there were rejected tokens to rewind


def test_draft_cache_rewinds_to_history():
    draft = DraftModel(spec_model("olmo", seed=1), lambda logprobs, _: mx.argmax(logprobs, -1))
    rng = random.Random(5)
    history = [rng.randrange(3, SPEC_VOCAB) for _ in range(11)]
    draft.start(history)
    for accept in (4, 0, 2, 3, 1):
        proposal, _ = draft.propose(history, 4)
        history += [*proposal[:accept], rng.randrange(3, SPEC_VOCAB)]  # then a rejection
    draft.sync(history)
    fresh = make_cache(draft.model)
    draft.model(mx.array(history[:-1], mx.uint32)[None], cache=fresh)
    for c, f in zip(draft.cache, fresh, strict=True):
        assert c.offset == f.offset == len(history) - 1
        for a, b in zip(c.state, f.state, strict=True):
            assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()


def test_prompt_lookup_searches_the_cached_history(tok):
    """A chat's earlier turns come from the prompt cache; prompt lookup copies from them too,
    while the tokens stay those of plain decoding over history + prompt."""
    model = spec_model("llama", seed=0)
    rng = random.Random(7)
    history = [rng.randrange(3, SPEC_VOCAB) for _ in range(24)]
    prompt = [history[5]]  # occurs only in the history
    config = GenerationConfig(max_tokens=2, prompt_lookup=4)
    expected = plain(model, history + prompt, config)
    got, stats = speculative(model, tok, history + prompt, config, prefilled(model, history))
    assert got == expected
    # k = 1 at the first step (2 tokens left); only the history holds a match for it
    assert stats.proposed == 1


# --- sampling: the distribution of plain sampling ----------------------------------------------


@pytest.mark.parametrize("proposer", ["prompt lookup", "draft model"])
def test_sampling_follows_plain_distribution(proposer, tok):
    """Chi-square test of the first three sampled tokens against their exact probabilities
    under plain sampling, over a fixed set of seeds. (At this size it rejects, with p-values
    below 1e-5, sampling from p instead of the residual after a rejection, accepting every
    proposal that p allows, and repetition penalties that ignore the drafts before a position.)"""
    model = spec_model("llama", seed=0, sharpen=2.0)
    if proposer == "prompt lookup":
        config = GenerationConfig(max_tokens=3, temperature=1.5, top_k=3, prompt_lookup=4)
        prompt = lookup_prompt(model, config)
    else:
        draft = spec_model("llama", seed=0, sharpen=0.25, bits=4)  # q flatter than p
        config = GenerationConfig(
            max_tokens=3,
            temperature=1.5,
            top_k=4,
            top_p=0.9,
            repetition_penalty=1.5,
            draft_model=draft,
        )
        prompt = [11, 12, 13, 14, 11, 12]
    dist = exact_distribution(model, prompt, config, 3)
    n = 1200
    counts: Counter = Counter()
    totals = SpeculativeStats()
    for seed in range(n):
        mx.random.seed(seed)
        out, stats = speculative(model, tok, prompt, config)
        counts[tuple(out)] += 1
        totals.proposed += stats.proposed
        totals.accepted += stats.accepted
    assert 0.1 < totals.acceptance_rate < 0.9  # both rules (accept, resample) were used
    assert chi_square_p(counts, dist, n) > 1e-3


# --- through stream_generate: EOS, stop strings, max_tokens ------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return spec_tokenizer(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer_dir):
    return save_spec_model(
        spec_model("llama"), "llama", tmp_path_factory.mktemp("tiny"), tokenizer_dir
    )


PROMPT = "the quick brown fox jumps over the lazy dog, the quick brown fox jumps over the"


def responses(model, tokenizer, **options):
    return list(stream_generate(model, tokenizer, PROMPT, **options))


def unpriced(model, tokenizer, **options):
    """A batch of one whose proposals cost nothing to the speculation budget: on a busy machine
    the timed step costs may otherwise price speculation out, and nothing would be proposed."""
    engine = BatchGenerator(model, tokenizer, max_batch=1, cost=StepCost.fixed(1.0, 0.0))
    engine.add(Request(encode_prompt(tokenizer, PROMPT), GenerationConfig(**options)))
    events = []
    while engine.has_work:
        events += engine.step()
    return events


def test_eos_inside_an_accepted_run(tiny_folder):
    """Each distinct token of the output in turn ends the text: the speculative stream stops
    where plain decoding does, also when the end of text is inside a run of accepted tokens.
    (The model drafting for itself gets most of its proposals accepted.)"""
    model, tokenizer = load(tiny_folder)
    tokenizer.eos_token_ids = set()
    reference = [r.token for r in responses(model, tokenizer, max_tokens=48)]
    inside_a_run = 0
    for eos in dict.fromkeys(reference):
        tokenizer.eos_token_ids = {eos}
        expected = responses(model, tokenizer, max_tokens=48)
        for options in ({"prompt_lookup": 6}, {"draft_model": model, "num_draft": 4}):
            got = unpriced(model, tokenizer, max_tokens=48, **options)
            assert [(r.token, r.text) for r in got] == [(r.token, r.text) for r in expected]
            assert got[-1].token == eos and got[-1].finish_reason == "stop"
            inside_a_run += got[-1].from_draft  # a proposed token never ends its run
    assert inside_a_run > 0


def test_stop_strings_and_max_tokens(tiny_folder):
    model, tokenizer = load(tiny_folder)
    tokenizer.eos_token_ids = set()
    text = "".join(r.text for r in responses(model, tokenizer, max_tokens=40))
    for start in (3, 10, len(text) // 2, len(text) - 4):
        stop = text[start : start + 3]
        expected = "".join(r.text for r in responses(model, tokenizer, max_tokens=40, stop=stop))
        got = responses(model, tokenizer, max_tokens=40, stop=stop, prompt_lookup=5)
        assert "".join(r.text for r in got) == expected
        assert got[-1].finish_reason == "stop"
    for max_tokens in range(1, 13):  # ends inside what would have been a run
        expected = [r.token for r in responses(model, tokenizer, max_tokens=max_tokens)]
        got = responses(model, tokenizer, max_tokens=max_tokens, prompt_lookup=8)
        assert [r.token for r in got] == expected
        assert len(got) == max_tokens and got[-1].finish_reason == "length"
        stats = got[-1].speculative
        assert stats is not None and stats.tokens == max_tokens


def test_cli_prints_statistics_and_refuses_other_vocabulary(tmp_path, tiny_folder, tokenizer_dir):
    runner = CliRunner()
    args = ["generate", "-m", str(tiny_folder), "-p", PROMPT, "--max-tokens", "24"]
    plain_run = runner.invoke(app, args)
    spec_run = runner.invoke(app, [*args, "--prompt-lookup", "4", "--verbose"])
    assert plain_run.exit_code == 0 and spec_run.exit_code == 0, spec_run.stderr
    assert spec_run.stdout == plain_run.stdout
    assert "proposed tokens accepted" in spec_run.stderr and "speedup" in spec_run.stderr
    assert "proposed tokens accepted" not in plain_run.stderr

    other = save_spec_model(
        spec_model("llama", vocab=SPEC_VOCAB + 64), "llama", tmp_path / "o", tokenizer_dir
    )
    result = runner.invoke(app, [*args, "--draft-model", str(other)])
    assert result.exit_code == 1
    assert "error:" in result.stderr and "same tokenizer" in result.stderr


# --- the adaptive proposal length ------------------------------------------------------------


def feed(lengths: ProposalLength, steps: int, accept_rate: float, cost: float) -> list[int]:
    """Run the controller against a proposer whose tokens are each accepted with `accept_rate`
    (deterministically: the expected run length) and a step costing 1 + cost * k plain steps."""
    ks = []
    for _ in range(steps):
        k = lengths.next_k()
        ks.append(k)
        accepted = int(sum(accept_rate**i for i in range(1, k + 1)) + 1e-9) if k else 0
        lengths.update(k, min(accepted, k), 0.01 * (1 + cost * k))
    return ks


def test_controller_times_a_plain_step_first():
    lengths = ProposalLength(max_k=8)
    assert lengths.next_k() == 0
    lengths.update(0, 0, 0.01)
    assert lengths.plain_s == 0.01 and lengths.next_k() > 0


def test_controller_picks_the_k_of_the_best_expected_speedup():
    """next_k is the argmax over k of (1 + a + ... + a^k) / (1 + c k), by brute force."""
    for a, c in [(0.9, 0.02), (0.6, 0.05), (0.5, 0.3), (0.95, 0.0)]:
        lengths = ProposalLength(max_k=10, min_gain=1.0)
        lengths.plain_s = 0.01
        lengths.hits, lengths.misses = a, 1 - a
        lengths.costs.extend([c] * 3)
        gains = {k: sum(a**i for i in range(k + 1)) / (1 + c * k) for k in range(11)}
        assert lengths.next_k() == max(gains, key=gains.get)


def test_controller_grows_on_acceptance_and_stops_on_rejection():
    good = feed(ProposalLength(max_k=8), 40, accept_rate=0.95, cost=0.01)
    assert good[-1] == 8  # nearly free and nearly always right: propose the most
    bad = ProposalLength(max_k=8, probe_budget=0.02)
    ks = feed(bad, 300, accept_rate=0.0, cost=0.5)
    # stopped proposing runs; one token now and then notices if proposals become good again,
    # spending at most the probe budget of the time (a probe costs 0.5 of a plain step here)
    probes = [k for k in ks[100:] if k]
    assert probes and set(probes) == {1}
    assert len(probes) * 0.5 <= 0.02 * 200 + 0.5


def test_controller_cost_is_robust_to_an_outlier_step():
    lengths = ProposalLength(max_k=8)
    lengths.update(0, 0, 0.01)
    for seconds in [0.011, 0.011, 0.5, 0.011, 0.011]:  # one step hit by a busy machine
        lengths.update(1, 1, seconds)
    assert lengths.cost == pytest.approx(0.1, abs=1e-6)  # the median, not the mean


def test_no_probes_for_a_draft_model():
    lengths = ProposalLength(max_k=4, probe_budget=0.0)
    assert set(feed(lengths, 200, accept_rate=0.0, cost=0.5)[20:]) == {0}
