"""Speculative decoding inside a batch: how many tokens the rows may propose in one step.

A batched verify pass pads every row to the longest proposal, so one row's proposal costs the
whole batch: a pass feeding n = rows x width tokens takes T(n) = a + b * n (`StepCost`, fitted
online), plus the draft model's own time for the rows that draft. Each row wants k_i tokens
(its own `RowLength`, a `ProposalLength` costed with the batch's marginal cost instead of its
own timings); the batch then picks one extra width w and each row proposes min(k_i, w):

- while some row does not speculate (a bystander), the step may cost at most
  (1 + tolerance) x a plain step, so bystanders keep >= 1 / (1 + tolerance) of their plain
  speed (tolerance 5% by default): w is the widest proposal within that budget;
- when every row speculates, nobody is a bystander: w maximises the expected tokens per second
  of the batch, sum_i E_i(min(k_i, w)) / C(w), among the widths at which each row still expects
  at least its plain speed, E_i / C(w) >= 1 / T(rows). E_i(k) = 1 + a_i + ... + a_i^k with a_i
  the row's acceptance rate; C(w) the step's cost.

Until two different n have been timed, T(n) is taken as proportional to n, which allows no
speculation at all: the first prefill chunks and decode steps provide the fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .speculative import ProposalLength, expected_tokens


class StepCost:
    """Forward-pass seconds as a + b * n (n: tokens fed), a least-squares line through the
    running mean time of each n timed (the `keep` most recently seen n)."""

    def __init__(self, keep: int = 32, smoothing: float = 0.3):
        self.keep = keep
        self.smoothing = smoothing  # weight of a new time in its n's running mean
        self.means: dict[int, float] = {}  # n -> seconds, least recently seen first
        self._fixed: tuple[float, float] | None = None
        self._line: tuple[float, float] | None = None

    @classmethod
    def fixed(cls, a: float, b: float) -> StepCost:
        """A cost model that ignores timings (for tests and for forcing a policy)."""
        cost = cls()
        cost._fixed = (a, b)
        return cost

    def add(self, n: int, seconds: float) -> None:
        if self._fixed is not None or n <= 0:
            return
        old = self.means.pop(n, None)
        self.means[n] = seconds if old is None else old + self.smoothing * (seconds - old)
        if len(self.means) > self.keep:
            del self.means[next(iter(self.means))]
        self._line = None

    def line(self) -> tuple[float, float] | None:
        """(a, b), or None before two different n were timed."""
        if self._fixed is not None:
            return self._fixed
        if self._line is None and len(self.means) >= 2:
            ns, ts = list(self.means), list(self.means.values())
            n_mean, t_mean = sum(ns) / len(ns), sum(ts) / len(ts)
            spread = sum((n - n_mean) ** 2 for n in ns)
            b = sum((n - n_mean) * (t - t_mean) for n, t in zip(ns, ts, strict=True)) / spread
            b = max(b, 0.0)
            self._line = (max(t_mean - b * n_mean, 0.0), b)
        return self._line

    def charge(self, n: int, seconds: float) -> float:
        """What a pass of n tokens that took `seconds` counts as: its time, or under a fixed
        model (tests, a forced policy) the model's, so that a policy follows the model."""
        return self(n) if self._fixed is not None else seconds

    def __call__(self, n: int) -> float:
        line = self.line()
        if line is None:  # no fit yet: proportional to n, from whatever was timed
            per_token = sum(t / m for m, t in self.means.items()) / max(len(self.means), 1)
            return n * (per_token or 1.0)
        return line[0] + line[1] * n


class RowLength(ProposalLength):
    """One row's proposal length: `ProposalLength`'s rule (the k maximising expected tokens per
    cost, with its acceptance-rate tracking and probes) with the cost per proposed token, relative
    to a plain step, set by the engine from the batch's cost model each step."""

    def __init__(self, max_k: int, probe_budget: float):
        super().__init__(max_k, probe_budget=probe_budget)
        self.plain_s = 1.0  # the batch times its steps: nothing to wait for
        self.token_cost = 1.0  # until the engine has a cost model

    @property
    def cost(self) -> float:
        return self.token_cost

    def update(self, proposed: int, accepted: int, seconds: float = 0.0) -> None:
        self.observe(proposed, accepted)


@dataclass(frozen=True)
class Want:
    """What one row would propose this step: k tokens (0: none), at its acceptance rate, each
    drafted token costing `draft_s` seconds of the step (0 for prompt lookup)."""

    k: int
    rate: float = 0.5
    draft_s: float = 0.0


def speculation_width(wants: Sequence[Want], cost: StepCost, tolerance: float = 0.05) -> int:
    """The most tokens any row may propose this step (see the module docstring)."""
    top = max((w.k for w in wants), default=0)
    if top == 0:
        return 0
    rows = len(wants)
    plain = cost(rows)

    def step_cost(width: int) -> float:
        drafts = sum(w.draft_s * min(w.k, width) for w in wants)
        return cost(rows * (1 + width)) + drafts

    if any(w.k == 0 for w in wants):
        within = [w for w in range(top + 1) if step_cost(w) <= (1 + tolerance) * plain]
        return max(within)  # width 0 always fits

    def rate(width: int) -> float | None:  # the batch's tokens per second, None if a row loses
        seconds = step_cost(width)
        gains = [expected_tokens(w.rate, min(w.k, width)) for w in wants]
        if any(g / seconds < 1 / plain for g in gains):
            return None
        return sum(gains) / seconds

    best, best_rate = 0, rows / plain
    for width in range(1, top + 1):
        r = rate(width)
        if r is not None and r > best_rate:
            best, best_rate = width, r
    return best
