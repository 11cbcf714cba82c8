"""Continuous batching: the batch KV cache against single-row caches, every request of a batch
against `stream_generate` alone (greedy, seeded sampling, logits processors, logprobs, stop
strings), cancellation, speculative decoding per row, and the speculation budget."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from oracles import chi_square_p, exact_distribution
from tiny_data import lookup_prompt, random_ids
from tiny_models import spec_model
from tiny_tokenizers import spec_tokenizer

from elm_mlx import batch_generate, generate, stream_generate
from elm_mlx.engine.batch_kv import add_rows, keep_rows, make_batch_cache, set_lengths
from elm_mlx.engine.config import GenerationConfig
from elm_mlx.engine.prompt_cache import PromptCache
from elm_mlx.engine.prompt_prefill import PrefillPolicy
from elm_mlx.engine.scheduler import BatchGenerator, Request
from elm_mlx.engine.spec_budget import RowLength, StepCost, Want, speculation_width
from elm_mlx.errors import GenerationError, OptionError
from elm_mlx.models import make_cache
from elm_mlx.tokenizer import load_tokenizer

ATOL = 1e-4
FREE = StepCost.fixed(1.0, 0.0)  # proposals cost nothing: the budget never caps them
COSTLY = StepCost.fixed(1.0, 1.0)  # each token fed costs as much as a whole plain step


def run(gen: BatchGenerator, requests: list[Request]) -> list[list]:
    """Every request's events, in the order of `requests`."""
    ids = [gen.add(r) for r in requests]
    events: dict[int, list] = {i: [] for i in ids}
    while gen.has_work:
        for e in gen.step():
            events[e.request_id].append(e)
    return [events[i] for i in ids]


def solo(model, tokenizer, request: Request) -> list:
    return list(stream_generate(model, tokenizer, request.prompt, request.config))


# --- the batch KV cache ------------------------------------------------------------------------


def _prefilled(model, ids: list[int]):
    cache = make_cache(model)
    if ids:
        model(mx.array(ids, mx.uint32)[None], cache=cache)
    return cache


@pytest.mark.parametrize("family", ["llama", "olmo", "openelm", "olmo3"])
@pytest.mark.parametrize("lengths", [[1, 6, 17, 300], [9, 9]])
def test_batch_cache_rows_equal_single_rows(tiny, family, lengths):
    """Rows of different lengths (one crossing the 256-position allocation step) fed several
    tokens at once, rewound by different amounts, one leaving and one joining: every row's
    logits equal that row run alone with a plain KVCache (olmo3: sliding-window layers, whose
    window of 8 each row passes at its own position)."""
    model, _ = tiny.load(family)
    seqs = [random_ids(n, seed=n) for n in lengths]
    batch = make_batch_cache(model)
    add_rows(batch, [_prefilled(model, s) for s in seqs])
    singles = [_prefilled(model, s) for s in seqs]

    def check(inputs: list[list[int]]) -> None:
        got = np.array(model(mx.array(inputs, mx.uint32), cache=batch))
        for i, ids in enumerate(inputs):
            want = model(mx.array(ids, mx.uint32)[None], cache=singles[i])[0]
            np.testing.assert_allclose(got[i], np.array(want), atol=ATOL, rtol=0)

    check([[5, 6, 7]] * len(seqs))
    rewinds = [i % 3 for i in range(len(seqs))]
    set_lengths(batch, [n + 3 - r for n, r in zip(lengths, rewinds, strict=True)])
    for cache, r in zip(singles, rewinds, strict=True):
        for c in cache:
            c.trim(r)
    assert batch[0].lengths == [c[0].offset for c in singles]
    check([[8]] * len(seqs))
    check([[9, 10]] * len(seqs))
    keep = list(range(1, len(seqs)))[::-1]  # the first row leaves, the others swap places
    keep_rows(batch, keep)
    singles = [singles[i] for i in keep]
    newcomer = random_ids(4, seed=99)
    add_rows(batch, [_prefilled(model, newcomer)])
    singles.append(_prefilled(model, newcomer))
    check([[11, 12]] * len(singles))
    check([[13]] * len(singles))


# --- continuous batching against stream_generate -----------------------------------------------


def test_greedy_batch_equals_each_request_alone(tiny, family):
    """16 greedy requests of different prompt lengths, token limits and stop strings through a
    batch of 8: each returns the tokens, text, finish reason and usage it returns alone."""
    model, tokenizer = tiny.load(family)
    rng = random.Random(3)
    requests = []
    for i in range(16):
        prompt = random_ids(rng.randrange(1, 40), seed=100 + i)
        config = GenerationConfig(max_tokens=rng.randrange(1, 25))
        if i % 4 == 3:  # a stop string from the request's own text, so that it does stop
            text = generate(model, tokenizer, prompt, config)
            if len(text) > 4:
                config = GenerationConfig(max_tokens=config.max_tokens, stop=(text[2:4],))
        requests.append(Request(prompt, config))
    batched = run(BatchGenerator(model, tokenizer, max_batch=8), requests)
    reasons = set()
    for request, events in zip(requests, batched, strict=True):
        alone = solo(model, tokenizer, request)
        assert [e.token for e in events] == [r.token for r in alone]
        assert "".join(e.text for e in events) == "".join(r.text for r in alone)
        assert events[-1].finish_reason == alone[-1].finish_reason
        assert all(e.finish_reason is None for e in events[:-1])
        assert events[-1].usage.completion_tokens == len(alone)
        assert events[-1].usage.prompt_tokens == len(request.prompt)
        reasons.add(alone[-1].finish_reason)
    assert reasons == {"stop", "length"}


def test_sampling_processors_and_logprobs_equal_each_request_alone(tiny):
    """Seeded sampling (with top-p, top-k, min-p), a repetition penalty and logprobs: per row,
    whatever runs beside it, the tokens `stream_generate` gives alone with that seed, and the
    logprobs it reports."""
    model, tokenizer = tiny.load("llama")
    configs = [
        GenerationConfig(max_tokens=20, temperature=0.9, seed=1),
        GenerationConfig(max_tokens=12, temperature=1.3, top_p=0.9, top_k=30, seed=2),
        GenerationConfig(max_tokens=20, repetition_penalty=1.4),
        GenerationConfig(max_tokens=16, temperature=0.7, min_p=0.05, seed=3),
        GenerationConfig(max_tokens=8, temperature=1.0, repetition_penalty=1.2, seed=4),
    ]
    requests = [
        Request(random_ids(3 + 5 * i, seed=i), c, logprobs=3 if i % 2 else 0)
        for i, c in enumerate(configs)
    ]
    mx.random.seed(123)  # the unseeded neighbours below must not matter
    neighbours = [Request(random_ids(9, seed=50), GenerationConfig(temperature=1.0))] * 3
    batched = run(BatchGenerator(model, tokenizer, max_batch=8), requests + neighbours)
    for request, events in zip(requests, batched[: len(requests)], strict=True):
        alone = solo(model, tokenizer, request)
        assert [e.token for e in events] == [r.token for r in alone]
        for e, r in zip(events, alone, strict=True):
            assert e.logprob == pytest.approx(r.logprobs[r.token].item(), abs=ATOL)
            top = np.argsort(-np.array(r.logprobs))[: request.logprobs]
            assert [t for t, _ in e.top_logprobs] == top.tolist()
            assert [v for _, v in e.top_logprobs] == pytest.approx(
                np.array(r.logprobs)[top].tolist(), abs=ATOL
            )


def test_cancel_frees_the_slot(tiny):
    model, tokenizer = tiny.load("olmo")
    requests = [
        Request(random_ids(5 + i, seed=i), GenerationConfig(max_tokens=12)) for i in range(4)
    ]
    gen = BatchGenerator(model, tokenizer, max_batch=2)
    ids = [gen.add(r) for r in requests]
    assert gen.cancel(ids[3])  # still queued
    events: dict[int, list] = {i: [] for i in ids}
    for e in gen.step() + gen.step():
        events[e.request_id].append(e)
    assert gen.active == 2 and gen.waiting == 1
    before = len(events[ids[0]])
    assert before >= 1
    assert gen.cancel(ids[0])
    assert gen.active == 1 and not gen.cancel(ids[0])
    while gen.has_work:
        for e in gen.step():
            events[e.request_id].append(e)
    assert len(events[ids[0]]) == before and events[ids[3]] == []  # nothing after the cancel
    for i in (1, 2):  # the request that joined in the freed slot, and its neighbour
        assert [e.token for e in events[ids[i]]] == [
            r.token for r in solo(model, tokenizer, requests[i])
        ]
    assert not gen.cancel(ids[1])  # finished


def _step_all(gen: BatchGenerator, events: dict[int, list]) -> None:
    while gen.has_work:
        for e in gen.step():
            events[e.request_id].append(e)


def test_long_prompt_prefills_within_its_share_while_others_stream(tiny):
    """A 200-token prompt (prefill_step_size 64) arriving while a request decodes, with pass
    costs from a fixed model (n tokens: 1 + 0.05 n; a 64-token chunk ~4 decode steps): the
    running request gets a token at every step meanwhile, the prefill passes cost at most
    `share` (0.5) of the decode steps so far (but for one pass's overdraft) and are narrower
    than a full chunk, and both equal their solo runs."""
    model, tokenizer = tiny.load("llama")
    cost = StepCost.fixed(1.0, 0.05)
    short = Request(random_ids(5, seed=1), GenerationConfig(max_tokens=80))
    long = Request(random_ids(200, seed=2), GenerationConfig(max_tokens=6, prefill_step_size=64))
    gen = BatchGenerator(model, tokenizer, max_batch=4, cost=cost)
    ids = [gen.add(short)]
    events: dict[int, list] = {ids[0]: []}
    for _ in range(3):
        events[ids[0]] += gen.step()
    ids.append(gen.add(long))
    events[ids[1]] = []
    earned = spent = 0.0
    widths, fed = [], 0
    while gen.waiting:
        new = gen.step()
        assert [e.request_id for e in new] == [ids[0]]  # one token each step
        events[ids[0]] += new
        earned += PrefillPolicy().share * cost(1)  # one row decoded
        now = gen.prefill.items[0].fed if gen.waiting else len(long.prompt) - 1
        if now > fed:
            widths.append(now - fed)
            spent += cost(now - fed)
            fed = now
        assert spent <= earned + cost(max(widths, default=0))
    assert fed == len(long.prompt) - 1 and max(widths) < 64
    assert len(widths) >= 199 // 64 + 1
    _step_all(gen, events)
    for rid, request in zip(ids, (short, long), strict=True):
        assert [e.token for e in events[rid]] == [r.token for r in solo(model, tokenizer, request)]


def test_full_chunks_when_no_row_decodes(tiny):
    """Prefill alone: each pass feeds the request's whole prefill_step_size."""
    model, tokenizer = tiny.load("llama")
    long = Request(random_ids(200, seed=2), GenerationConfig(max_tokens=3, prefill_step_size=64))
    gen = BatchGenerator(model, tokenizer, cost=StepCost.fixed(1.0, 0.05))
    rid = gen.add(long)
    fed = []
    while gen.waiting:
        gen.step()
        fed.append(gen.prefill.items[0].fed if gen.waiting else None)
    assert fed == [64, 128, 192, None]
    events: dict[int, list] = {rid: []}
    _step_all(gen, events)
    assert [e.token for e in events[rid]] == [r.token for r in solo(model, tokenizer, long)]


def test_bound_idle_passes_start_from_the_time_between_paid_ones_and_double(tiny):
    """A server's policy (`bound_idle`): with nothing decoding, the first pass costs about what
    the decode steps between two paid passes earn (here 2 x 1.05 / 0.5 = 4.2: 64 tokens; it is
    sized by a guess of the time per token, each later pass by the last pass's), and each pass
    in a row may take twice as long as the one before, up to the 512-token chunk; the tokens are
    still the solo run's."""
    model, tokenizer = tiny.load("llama")
    long = Request(random_ids(1200, seed=2), GenerationConfig(max_tokens=3))
    cost = StepCost.fixed(1.0, 0.05)
    gen = BatchGenerator(model, tokenizer, cost=cost, prefill=PrefillPolicy(bound_idle=True))
    rid = gen.add(long)
    fed = [0]
    while gen.waiting:
        gen.step()
        fed.append(gen.prefill.items[0].fed if gen.waiting else len(long.prompt) - 1)
    widths = [b - a for a, b in itertools.pairwise(fed)]
    assert 1 <= widths[0] < 2 * 64 and widths[1] < 4 * 64
    bound = 2 * cost(1) / 0.5
    assert all(cost(w) <= bound * 2**i * 1.1 for i, w in enumerate(widths[1:], 1)), widths
    assert 512 in widths
    events: dict[int, list] = {rid: []}
    _step_all(gen, events)
    assert [e.token for e in events[rid]] == [r.token for r in solo(model, tokenizer, long)]


@pytest.mark.parametrize("share", [0.25, 1.0])
def test_a_short_request_beside_a_long_prefill_finishes_in_steps_bounded_by_its_own(tiny, share):
    """A row decodes, a long prompt prefills beside it, then a short request arrives: the
    steps until the short one finishes do not depend on the long prompt's length (700 or 1,400
    tokens), and the long prompt still finishes with its solo tokens."""
    model, tokenizer = tiny.load("llama")
    running = Request(random_ids(4, seed=5), GenerationConfig(max_tokens=200))
    short = Request(random_ids(6, seed=6), GenerationConfig(max_tokens=4))
    steps = []
    for length in (700, 1400):
        long = Request(random_ids(length, seed=7), GenerationConfig(max_tokens=3))
        gen = BatchGenerator(
            model, tokenizer, cost=StepCost.fixed(1.0, 0.02), prefill=PrefillPolicy(share)
        )
        ids = [gen.add(running)]
        events: dict[int, list] = {ids[0]: []}
        for _ in range(2):
            events[ids[0]] += gen.step()
        ids.append(gen.add(long))
        for _ in range(3):
            events[ids[0]] += gen.step()
        assert gen.waiting == 1  # the long prompt is still prefilling
        ids.append(gen.add(short))
        events.update({ids[1]: [], ids[2]: []})
        n = 0
        while not (events[ids[2]] and events[ids[2]][-1].finish_reason):
            for e in gen.step():
                events[e.request_id].append(e)
            n += 1
        steps.append(n)
        assert gen.waiting == 1  # the short one overtook the long one
        gen.cancel(ids[0])
        _step_all(gen, events)
        for rid, request in zip(ids[1:], (long, short), strict=True):
            want = [r.token for r in solo(model, tokenizer, request)]
            assert [e.token for e in events[rid]] == want
    assert steps[0] == steps[1] <= 12


def test_prefill_share_must_be_positive():
    with pytest.raises(OptionError, match="prefill_share"):
        PrefillPolicy(share=0).validate()


def test_batch_generate_equals_generate(tiny):
    model, tokenizer = tiny.load("llama")
    prompts = ["the capital of france is", "one two three", "to be or not", "alpha"]
    config = GenerationConfig(max_tokens=10)
    got = batch_generate(model, tokenizer, prompts, config, max_batch=3)
    assert got == [generate(model, tokenizer, p, config) for p in prompts]
    with pytest.raises(GenerationError, match="4 prompts but 1 configs"):
        batch_generate(model, tokenizer, prompts, [config])


def test_sliding_window_batch_equals_each_prompt_alone(tiny):
    """OLMo 3 (sliding window of 8): prompts shorter and longer than the window, generating past
    it, batched (rows at different positions, so windowed masks per row) as each alone."""
    model, tokenizer = tiny.load("olmo3")
    prompts = [random_ids(n, vocab=300, seed=n) for n in (2, 7, 13, 30)]
    config = GenerationConfig(max_tokens=20)
    got = batch_generate(model, tokenizer, prompts, config, max_batch=4)
    assert got == [generate(model, tokenizer, p, config) for p in prompts]
    # the short prompts do generate past the window (no early end of sequence)
    lengths = [len(list(stream_generate(model, tokenizer, p, config))) for p in prompts[:2]]
    assert min(n + len(p) for n, p in zip(lengths, prompts, strict=False)) > 8


def test_sliding_window_rows_past_their_window_are_prompt_cached_exactly(tiny):
    """A row whose sliding layers dropped positions (past the window plus the compaction slack)
    leaves its entry to the prompt cache, serving only prefixes whose continuations do not look
    back at the dropped positions: a request continuing it reuses it, one sharing less does not,
    and both answer as alone."""
    model, tokenizer = tiny.load("olmo3")
    cache = PromptCache()
    short, long = random_ids(20, vocab=300, seed=1), random_ids(320, vocab=300, seed=2)
    config = GenerationConfig(max_tokens=4)
    got = batch_generate(model, tokenizer, [short, long], config, prompt_cache=cache)
    assert got == [generate(model, tokenizer, p, config) for p in (short, long)]
    (entry,) = [e for e in cache.entries.values() if e.tokens[:320] == long]
    assert 8 < entry.start < 320 and entry.start > 0
    gen = BatchGenerator(model, tokenizer, prompt_cache=cache)
    more = long + random_ids(6, vocab=300, seed=3)
    less = long[: entry.start - 2] + random_ids(6, vocab=300, seed=4)
    ids = [gen.add(Request(more, config)), gen.add(Request(less, config))]
    events: dict[int, list] = {i: [] for i in ids}
    while gen.has_work:
        for e in gen.step():
            events[e.request_id].append(e)
    assert events[ids[0]][-1].usage.cached_tokens >= 320
    assert events[ids[1]][-1].usage.cached_tokens == 0
    for rid, p in zip(ids, (more, less), strict=True):
        assert "".join(e.text for e in events[rid]) == generate(model, tokenizer, p, config)


def test_refuses_bad_requests(tiny):
    model, tokenizer = tiny.load("llama")
    gen = BatchGenerator(model, tokenizer)
    with pytest.raises(GenerationError, match="prompt is empty"):
        gen.add(Request([]))
    with pytest.raises(OptionError, match="max_tokens must be at least 1"):
        gen.add(Request([5], GenerationConfig(max_tokens=0)))
    with pytest.raises(OptionError, match="temperature"):
        gen.add(Request([5], GenerationConfig(temperature=-1.0)))
    with pytest.raises(OptionError, match="logprobs"):
        gen.add(Request([5], logprobs=-1))
    with pytest.raises(OptionError, match="max_batch"):
        BatchGenerator(model, tokenizer, max_batch=0)
    assert not gen.has_work


# --- speculative decoding per row --------------------------------------------------------------


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    return spec_tokenizer(tmp_path_factory.mktemp("spm"))


def _spec_requests(family: str) -> list[Request]:
    """Prompts that repeat themselves (lookups hit), for plain, prompt-lookup and draft rows."""
    draft = spec_model(family, seed=0, bits=4)  # a quantized copy: mostly agrees
    rng = random.Random(7)
    out = []
    for i in range(9):
        chunk = [rng.randrange(3, 300) for _ in range(rng.randrange(2, 10))]
        config = [
            GenerationConfig(max_tokens=24),
            GenerationConfig(max_tokens=30, prompt_lookup=4),
            GenerationConfig(max_tokens=20, draft_model=draft, num_draft=3),
            GenerationConfig(max_tokens=16, prompt_lookup=3, repetition_penalty=1.3),
        ][i % 4]
        out.append(Request(chunk * 3 + chunk[:1], config))
    return out


@pytest.mark.parametrize("family", ["llama", "olmo", "openelm"])
def test_speculating_rows_are_exact(spm_dir, family):
    """Greedy rows with prompt lookup or a draft model, beside plain rows: every row gives the
    tokens of plain decoding alone, proposals were accepted, and a costly budget stops them."""
    model, tokenizer = spec_model(family), load_tokenizer(spm_dir)
    requests = _spec_requests(family)
    expected = []
    for r in requests:
        plain = GenerationConfig(
            max_tokens=r.config.max_tokens, repetition_penalty=r.config.repetition_penalty
        )
        expected.append([x.token for x in solo(model, tokenizer, Request(r.prompt, plain))])
    free = run(BatchGenerator(model, tokenizer, max_batch=6, cost=FREE), requests)
    assert [[e.token for e in events] for events in free] == expected
    assert sum(e.from_draft for events in free for e in events) > 10
    assert not any(e.from_draft for events in free[::4] for e in events)  # plain rows
    costly = run(BatchGenerator(model, tokenizer, max_batch=6, cost=COSTLY), requests)
    assert [[e.token for e in events] for events in costly] == expected
    assert not any(e.from_draft for events in costly for e in events)  # bystanders protected


def test_speculative_sampling_in_a_batch_follows_plain_distribution(spm_dir):
    """Prompt-lookup rows sampled beside plain rows of another length: the first three tokens
    follow plain sampling's exact distribution (chi-square, as in test_speculative)."""
    model, tokenizer = spec_model("llama", seed=0, sharpen=2.0), load_tokenizer(spm_dir)
    config = GenerationConfig(max_tokens=3, temperature=1.5, top_k=3, prompt_lookup=4)
    prompt = lookup_prompt(model, config)
    dist = exact_distribution(model, prompt, config, 3)
    n = 1200
    filler = Request(random_ids(13, vocab=300, seed=5), GenerationConfig(max_tokens=3))
    requests = [Request(prompt, config) for _ in range(n)]
    for i in range(0, n, 4):
        requests.insert(i + i // 4, filler)
    mx.random.seed(0)
    results = run(BatchGenerator(model, tokenizer, max_batch=16, cost=FREE), requests)
    counts = Counter(
        tuple(e.token for e in events)
        for request, events in zip(requests, results, strict=True)
        if request is not filler
    )
    drafted = sum(e.from_draft for events in results for e in events)
    assert sum(counts.values()) == n and drafted > 100
    assert chi_square_p(counts, dist, n) > 1e-3


# --- the speculation budget --------------------------------------------------------------------


def test_step_cost_fits_a_line_through_timings():
    cost = StepCost()
    assert cost.line() is None
    cost.add(4, 0.5)
    assert cost(8) == pytest.approx(1.0)  # before a fit: proportional to the tokens fed
    cost = StepCost(keep=4)
    cost.add(2, 9.0)  # forgotten: only the 4 most recently seen sizes count
    for n in (1, 8, 16, 64):
        cost.add(n, 1.0)
        cost.add(n, 0.2 + 0.01 * n)
        cost.add(n, 0.2 + 0.01 * n)
    a, b = cost.line()
    # running means with weight 0.3: 1 -> 0.3 * t + 0.7 * 1 -> ..., exact after the fit below
    means = {n: 1.0 + (1 - 0.7**2) * (0.2 + 0.01 * n - 1.0) for n in (1, 8, 16, 64)}
    assert cost.means == pytest.approx(means)
    ns = list(means)
    slope = np.polyfit(ns, [means[n] for n in ns], 1)
    assert (b, a) == pytest.approx(tuple(slope))


def test_budget_caps_proposals_beside_bystanders():
    """With a row that does not speculate, the step may cost 5% more than a plain one."""
    wants = [Want(0), Want(8, rate=0.9), Want(0), Want(4, rate=0.9)]
    assert speculation_width(wants, StepCost.fixed(1.0, 1.0)) == 0  # one more token: +80%
    # 4 rows, width w: 1 + 0.016 (1 + w) <= 1.05 * 1.016, so w <= 3 (w = 4 costs 1.08)
    assert speculation_width(wants, StepCost.fixed(1.0, 0.004)) == 3
    assert speculation_width(wants, StepCost.fixed(1.0, 0.004), tolerance=0.2) == 8
    assert speculation_width(wants, FREE) == 8
    drafting = [Want(0), Want(8, rate=0.9, draft_s=0.01)]  # the draft model's time counts too
    assert speculation_width(drafting, FREE) == 5
    assert speculation_width([Want(0), Want(0)], FREE) == 0
    assert speculation_width([Want(0), Want(3)], StepCost()) == 0  # nothing timed yet


def test_budget_without_bystanders_maximises_the_batch_rate():
    cost = StepCost.fixed(1.0, 0.1)  # 2 rows: a plain step 1.2, width w: 1.2 + 0.2 w
    # accepted nine times in ten: worth proposing all 4 (4.1 tokens / 2.0 vs 1 / 1.2 each)
    assert speculation_width([Want(4, rate=0.9), Want(4, rate=0.9)], cost) == 4
    # never accepted: a proposal only slows both rows down
    assert speculation_width([Want(4, rate=0.01), Want(4, rate=0.01)], cost) == 0
    # one good row, one bad: the batch rate grows up to w = 4, but from w = 3 on the bad row
    # would fall below its plain speed (1.417 tokens per 1.8 s < 1 per 1.2 s): w = 2
    mixed = [Want(4, rate=0.95), Want(4, rate=0.3)]
    assert speculation_width(mixed, cost) == 2


def test_row_length_follows_the_batch_cost():
    lengths = RowLength(max_k=6, probe_budget=0.02)
    lengths.token_cost = 0.05
    assert lengths.next_k() > 0
    lengths.token_cost = 5.0  # a proposed token costs five plain steps
    assert lengths.next_k() == 0
    for _ in range(20):
        lengths.observe(4, 4)
    lengths.token_cost = 0.05
    assert lengths.next_k() == 6


def test_seeded_sampling_is_the_same_alone_batched_and_speculating(tiny):
    """One seeding rule (the request's seed and the token's position): a seeded sampled request
    draws the same tokens alone, in batches of any size beside other sampled rows, and with
    prompt lookup, whose proposals are forced on (a free budget)."""
    model, tokenizer = tiny.load("llama")
    chunk = random_ids(6, seed=3)
    prompt = chunk * 3 + chunk[:2]  # repeats itself: lookups propose
    config = GenerationConfig(max_tokens=16, temperature=1.0, top_k=20, seed=77)
    alone = [r.token for r in stream_generate(model, tokenizer, prompt, config)]
    assert alone != [
        r.token for r in stream_generate(model, tokenizer, prompt, replace(config, seed=78))
    ]
    for size, lookup in [(1, 4), (3, None), (6, 4), (9, 3)]:
        mine = Request(prompt, replace(config, prompt_lookup=lookup))
        others = [
            Request(
                random_ids(3 + i, seed=10 + i), GenerationConfig(max_tokens=5 + i, temperature=0.8)
            )
            for i in range(size - 1)
        ]
        requests = [*others[: size // 2], mine, *others[size // 2 :]]
        results = run(BatchGenerator(model, tokenizer, max_batch=size, cost=FREE), requests)
        assert [e.token for e in results[size // 2]] == alone, (size, lookup)
