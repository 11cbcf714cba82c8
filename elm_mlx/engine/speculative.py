"""Speculative decoding: a cheap proposer guesses the next k tokens, the model scores them all in
one forward pass, and the longest run it agrees with is kept (Leviathan et al. 2023, "Fast
Inference from Transformers via Speculative Decoding"; Chen et al. 2023).

Under greedy decoding a proposed token is kept when it is the model's argmax, so the output is
exactly plain greedy decoding. Under sampling a token x proposed with probability q(x) is kept
with probability min(1, p(x) / q(x)); on rejection the token is drawn from the normalised
residual max(p - q, 0). Both p and q are taken after the logits processors and the sampling
transform (temperature, top-k, top-p, min-p), so the output follows plain sampling exactly.
A prompt-lookup proposal is deterministic: q is one-hot.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from ..errors import GenerationError
from ..models import CausalLM, KVCache, vocab_size
from .config import GenerationConfig
from .draft import DraftModel
from .lookup import PromptLookup
from .reference import generation_stream, prefill
from .sampling import LogitsProcessor, Transform, make_transform


@dataclass
class SpeculativeStats:
    """Running counts of one speculative generation (the caller may pass one in and read it)."""

    steps: int = 0  # target forward passes after the prompt
    proposed: int = 0
    accepted: int = 0
    tokens: int = 0
    seconds: float = 0.0  # spent proposing and verifying
    plain_step_s: float | None = None  # running time of a step that proposed nothing

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def accepted_per_step(self) -> float:
        return self.accepted / self.steps if self.steps else 0.0

    @property
    def speedup(self) -> float | None:
        """Tokens/s over what plain decoding would reach, taking a plain step as timed in this
        run (the first step and any step that proposes nothing are plain)."""
        if not self.plain_step_s or not self.seconds:
            return None
        return self.tokens * self.plain_step_s / self.seconds

    def summary(self) -> str:
        speedup = f"{self.speedup:.2f}x" if self.speedup else "n/a"
        return (
            f"speculative: {self.accepted}/{self.proposed} proposed tokens accepted "
            f"({self.acceptance_rate:.0%}), {self.accepted_per_step:.2f} accepted per step, "
            f"{self.tokens} tokens in {self.steps} steps, estimated speedup {speedup}"
        )


class ProposalLength:
    """How many tokens to propose next: the k that maximises the expected speedup

        (1 + a + a^2 + ... + a^k) / (1 + c * k),

    with a the running rate at which proposed tokens are accepted and c the cost of one
    proposed token (drafting and verifying it) relative to a plain step, both measured (c as
    the median of recent steps: timings on a busy machine have outliers). So k shrinks while
    proposals are rejected and grows back when they are accepted. As a and c are estimates,
    k = 0 unless the expected speedup is at least `min_gain`. At k = 0 one token is still
    proposed now and then, to notice when proposals become good again, spending at most
    `probe_budget` of the time on it.
    """

    def __init__(
        self,
        max_k: int,
        decay: float = 0.9,
        min_gain: float = 1.1,
        probe_budget: float = 0.02,
    ):
        self.max_k = max_k
        self.decay = decay
        self.min_gain = min_gain
        self.probe_budget = probe_budget
        self.hits, self.misses = 1.0, 1.0  # a prior of a = 0.5
        self.costs: deque[float] = deque(maxlen=9)
        self.plain_s: float | None = None
        self.idle = 0  # steps since the last proposal

    @property
    def rate(self) -> float:
        return self.hits / (self.hits + self.misses)

    @property
    def cost(self) -> float:
        return statistics.median(self.costs) if self.costs else 0.1

    def gain(self, k: int) -> float:
        a, c = self.rate, self.cost
        return sum(a**i for i in range(k + 1)) / (1 + c * k)

    def next_k(self) -> int:
        if self.plain_s is None:
            return 0  # time a plain step first
        k = max(range(self.max_k + 1), key=self.gain)
        if self.gain(k) >= self.min_gain:
            return k
        if self.probe_budget and self.idle * self.probe_budget >= self.cost:
            return 1
        return 0

    def observe(self, proposed: int, accepted: int) -> None:
        """Count a step's outcome into the acceptance rate (or the idle steps)."""
        if proposed == 0:
            self.idle += 1
            return
        self.idle = 0
        self.hits = self.decay * self.hits + accepted
        self.misses = self.decay * self.misses + (accepted < proposed)

    def update(self, proposed: int, accepted: int, seconds: float) -> None:
        self.observe(proposed, accepted)
        if proposed == 0:
            self.plain_s = seconds if self.plain_s is None else 0.8 * self.plain_s + 0.2 * seconds
            return
        if self.plain_s:
            self.costs.append(max(seconds / self.plain_s - 1.0, 0.0) / proposed)


def verify(
    logits: mx.array,
    history: list[int],
    draft: list[int],
    q: mx.array | None,
    processors: Sequence[LogitsProcessor],
    transform: Transform | None,
) -> tuple[list[bool], list[int], mx.array]:
    """Score a proposal. logits (m + 1, V) are the model's at the last history token and at
    each of the m drafts; q (m, V) the drafts' proposal logprobs (None: one-hot).

    Returns whether each draft is accepted; for each position, the token to emit if the run
    stops there (a resampled token after a rejection, or the bonus token after all m); and the
    model's logprobs (m + 1, V) after the logits processors, as plain decoding reports them."""
    if processors:  # each position sees the history plus the drafts before it
        seen = mx.array(history + draft, mx.uint32)
        rows = []
        for i in range(logits.shape[0]):
            row = logits[i : i + 1]
            tokens = seen[: len(history) + i]
            for processor in processors:
                row = processor(tokens, row)
            rows.append(row)
        logits = mx.concatenate(rows, axis=0)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (m + 1, V)
    x = mx.array(draft, mx.uint32)
    m = len(draft)
    if transform is None:  # greedy: keep a draft when it is the argmax
        choice = mx.argmax(logp, axis=-1)
        accept = choice[:m] == x
        mx.eval(accept, choice)
        return accept.tolist(), choice.tolist(), logp
    p = mx.exp(transform(logp))  # (m + 1, V)
    one_hot = (mx.arange(p.shape[-1])[None] == x[:, None]).astype(p.dtype)
    q = one_hot if q is None else mx.exp(q)  # (m, V)
    p_x = mx.take_along_axis(p[:m], x[:, None], axis=-1)[:, 0]
    q_x = mx.take_along_axis(q, x[:, None], axis=-1)[:, 0]
    accept = mx.random.uniform(shape=(m,)) * q_x < p_x  # u < p(x) / q(x)
    residual = mx.maximum(p[:m] - q, 0.0)
    # p == q leaves no residual, but then nothing is ever rejected
    residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p[:m])
    fallback = mx.concatenate([residual, p[m:]], axis=0)  # the last row: the bonus token
    choice = mx.random.categorical(mx.log(fallback), axis=-1)
    mx.eval(accept, choice)
    return accept.tolist(), choice.tolist(), logp


def make_proposer(
    model: CausalLM, config: GenerationConfig, transform: Transform | None
) -> tuple[PromptLookup | DraftModel, ProposalLength]:
    """The proposer the config (validated) asks for, and how many tokens it proposes per step."""
    if config.draft_model is None:
        return PromptLookup(config.max_ngram), ProposalLength(config.prompt_lookup)
    target_vocab, draft_vocab = vocab_size(model), vocab_size(config.draft_model)
    if draft_vocab != target_vocab:
        raise GenerationError(
            f"the draft model's vocabulary has {draft_vocab} tokens but the model's has "
            f"{target_vocab}: a draft model must use the same tokenizer as the model"
        )
    draft = DraftModel(
        config.draft_model, transform, config.logits_processors(), config.prefill_step_size
    )
    # no probes: after idle steps the draft model would first have to catch up on every token
    # it missed, which costs as much as having drafted all along
    return draft, ProposalLength(config.num_draft, probe_budget=0.0)


def speculative_generate_step(
    prompt: mx.array,
    model: CausalLM,
    config: GenerationConfig,
    cache: list[KVCache],
    stats: SpeculativeStats | None = None,
    lengths: ProposalLength | None = None,
    history: Sequence[int] = (),
) -> Iterator[tuple[int, mx.array, bool]]:
    """Yield (token, logprobs (V,), whether it was a proposed token) up to `config.max_tokens`
    times; the logprobs are the model's after the logits processors, as in `generate_step`.
    `stats` receives running counts; `lengths` decides how many tokens to propose per step;
    `history` are the tokens already in `cache` before the prompt (a chat's earlier turns): the
    proposer sees them too, the logits processors see the prompt on, as plain decoding does.

    Between steps, and whenever the caller stops early, `cache` holds everything it held before,
    the prompt, and every yielded token but the last (which is the next input), as after
    `prefill`."""
    if prompt.size == 0:
        raise GenerationError("the prompt is empty: give at least one token")
    config.validate()
    stats = stats if stats is not None else SpeculativeStats()
    transform = None
    if config.temperature > 0:
        transform = make_transform(config.temperature, config.top_p, config.top_k, config.min_p)
    processors = config.logits_processors()
    proposer, default_lengths = make_proposer(model, config, transform)
    lengths = lengths or default_lengths

    tokens = prompt.tolist()  # what the logits processors see
    seen = [*history, *tokens]  # what the proposer sees
    start = cache[0].offset if cache else 0

    def rewind() -> None:  # forget the rejected drafts: keep all tokens but the last
        for c in cache:
            c.trim(c.offset - (start + len(tokens) - 1))

    prefill(model, prompt, cache, config.prefill_step_size)
    proposer.start(seen)
    try:
        while (left := config.max_tokens - (len(tokens) - prompt.size)) > 0:
            tic = time.perf_counter()
            k = min(lengths.next_k(), left - 1)  # a run is at most k + 1 tokens
            with mx.stream(generation_stream()):
                draft, q = proposer.propose(seen, k)
                inputs = mx.array(tokens[-1:] + draft, mx.uint32)
                logits = model(inputs[None], cache=cache)[0]  # (m + 1, V)
                accept, choice, logprobs = verify(logits, tokens, draft, q, processors, transform)
            n = accept.index(False) if False in accept else len(draft)
            seconds = time.perf_counter() - tic
            lengths.update(len(draft), n, seconds)
            stats.steps += 1
            stats.proposed += len(draft)
            stats.accepted += n
            stats.seconds += seconds
            stats.plain_step_s = lengths.plain_s
            for i, token in enumerate([*draft[:n], choice[n]]):
                tokens.append(token)
                seen.append(token)
                stats.tokens += 1
                yield token, logprobs[i], i < n
            rewind()
    finally:
        rewind()
