"""Speculative decoding: a cheap proposer guesses the next k tokens, the model scores them all in
one forward pass, and the longest run it agrees with is kept (Leviathan et al. 2023, "Fast
Inference from Transformers via Speculative Decoding"; Chen et al. 2023).

Verification is one rule for greedy and sampled decoding: at each position the model chooses
its token exactly as plain decoding would (`sampling.choose`: the argmax, or a Gumbel-max draw
keyed by the request's seed and the position), and a proposed token is kept while it equals
that choice; the first choice that differs (or the one after the last proposal) ends the run.
The output is therefore the plain output token for token, whatever was proposed. A draft model
draws its proposals with the same per-position noise as the target, which couples q with p so
that agreement is likely where the two distributions are close ("drafter-invariant"
speculative decoding, Daliri et al. 2024, "Coupling without Communication and
Drafter-Invariant Speculative Decoding"); prompt lookup proposes deterministically, and a
proposal x is then kept with probability p(x), as in Leviathan et al.'s rule with one-hot q.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import GenerationError
from ..models import CausalLM, vocab_size
from .config import GenerationConfig
from .draft import DraftModel, Pick
from .lookup import PromptLookup


@dataclass
class SpeculativeStats:
    """Running counts of one speculative generation (the caller may pass one in and read it)."""

    steps: int = 0  # forward passes after the prompt
    proposed: int = 0
    accepted: int = 0
    tokens: int = 0
    seconds: float = 0.0  # spent in those steps (proposing and verifying)
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
        run (the first step and any step that proposes nothing are plain). A step costs at
        least a plain one, so the estimate is capped at the tokens per step actually made."""
        if not self.plain_step_s or not self.seconds or not self.steps:
            return None
        return min(self.tokens * self.plain_step_s / self.seconds, self.tokens / self.steps)

    def count(self, proposed: int, kept: int, seconds: float) -> None:
        """One step: `proposed` tokens of which `kept` were accepted, taking `seconds`."""
        self.steps += 1
        self.proposed += proposed
        self.accepted += kept
        self.tokens += kept + 1
        self.seconds += seconds
        if proposed == 0:
            last = self.plain_step_s
            self.plain_step_s = seconds if last is None else 0.8 * last + 0.2 * seconds

    def summary(self) -> str:
        speedup = f"{self.speedup:.2f}x" if self.speedup else "n/a"
        return (
            f"speculative: {self.accepted}/{self.proposed} proposed tokens accepted "
            f"({self.acceptance_rate:.0%}), {self.accepted_per_step:.2f} accepted per step, "
            f"{self.tokens} tokens in {self.steps} steps, estimated speedup {speedup}"
        )


def expected_tokens(rate: float, k: int) -> float:
    """Tokens a step emits on average when k tokens are proposed, each accepted (after the ones
    before it) with probability `rate`: 1 + rate + ... + rate^k."""
    if rate >= 1.0:
        return k + 1.0
    return (1.0 - rate ** (k + 1)) / (1.0 - rate)  # the geometric sum in O(1), whatever k


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
        return expected_tokens(a, k) / (1 + c * k)

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


def accepted(draft: Sequence[int], choice: Sequence[int]) -> int:
    """How many drafts are kept: the run of proposals equal to the tokens the model chose at
    their positions (`choice` has one more token: the one after the last draft)."""
    n = 0
    while n < len(draft) and draft[n] == choice[n]:
        n += 1
    return n


def check_draft(model: CausalLM, config: GenerationConfig) -> None:
    """A draft model must share the model's vocabulary."""
    if config.draft_model is None:
        return
    target_vocab, draft_vocab = vocab_size(model), vocab_size(config.draft_model)
    if draft_vocab != target_vocab:
        raise GenerationError(
            f"the draft model's vocabulary has {draft_vocab} tokens but the model's has "
            f"{target_vocab}: a draft model must use the same tokenizer as the model"
        )


def make_proposer(
    model: CausalLM, config: GenerationConfig, pick: Pick
) -> tuple[PromptLookup | DraftModel, ProposalLength]:
    """The proposer the config (validated) asks for, and how many tokens it proposes per step.
    `pick` chooses a draft model's tokens as the row chooses its own (same noise per position)."""
    if config.draft_model is None:
        return PromptLookup(config.max_ngram), ProposalLength(config.prompt_lookup)
    check_draft(model, config)
    draft = DraftModel(
        config.draft_model, pick, config.logits_processors(), config.prefill_step_size
    )
    # no probes: after idle steps the draft model would first have to catch up on every token
    # it missed, which costs as much as having drafted all along
    return draft, ProposalLength(config.num_draft, probe_budget=0.0)
