"""What a training step minimises: SFT's cross-entropy, DPO (Rafailov et al. 2023; the IPO loss
of Azar et al. 2023) and ORPO (Hong et al. 2024), as TRL's trainers compute them.

Each objective turns a batch into a vector of sums (losses, counts, metrics) that add up over
micro-batches and processes. The loss of a step is a weighted sum of that vector whose weights
are 1 / the global counts (tokens, pairs), counted from the batch before the step, so that N
processes or N accumulated micro-batches give the update of one process on the whole batch.

DPO's reference model is the same weights with the LoRA adapter switched off (no second copy
of the model); its log-probabilities are computed in the same step, under stop_gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..lora import adapters_off
from .dataset import Batch
from .losses import cross_entropy_sum, sequence_logprobs

METHODS = ("sft", "dpo", "orpo")
DPO_LOSSES = ("sigmoid", "ipo")
# Metrics of preference methods, as logged (train_log.csv, with a val_ twin each).
PREFERENCE_METRICS = ("reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps",
                      "log_odds_ratio")  # fmt: skip
LN2 = math.log(2.0)


class SFT:
    """Cross-entropy summed over the trained tokens, divided by their count."""

    names = ("loss_sum", "tokens")
    metrics_logged: tuple[str, ...] = ()

    def sums(
        self, model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array, grad: bool
    ) -> mx.array:
        loss, ntok = cross_entropy_sum(model, inputs, targets, mask, grad)
        return mx.stack([loss, ntok])  # (2,)

    def counts(self, batch: Batch) -> np.ndarray:
        return np.array([0.0, batch.mask.sum()], np.float32)

    def weights(self, counts: np.ndarray) -> np.ndarray:
        return np.array([1 / max(counts[1], 1), 0.0], np.float32)

    def tokens(self, sums: np.ndarray) -> int:
        return int(sums[1])

    def metrics(self, sums: np.ndarray) -> dict[str, float]:
        return {"loss": float(sums[0] / max(sums[1], 1))}


def log1mexp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012); both branches stay
    finite so that `where` passes no NaN gradient."""
    near_zero = mx.log(-mx.expm1(mx.maximum(x, -LN2)))
    far = mx.log1p(-mx.exp(mx.minimum(x, -LN2)))
    return mx.where(x > -LN2, near_zero, far)


# Slots of a preference objective's sums vector.
PREF_LOSS, NLL, CHOSEN_TOKENS, PAIRS, CORRECT, MARGIN = 0, 1, 2, 3, 4, 5
CHOSEN_REWARD, REJECTED_REWARD, CHOSEN_LOGPS, REJECTED_LOGPS, LOG_ODDS, TOKENS = range(6, 12)


@dataclass(frozen=True)
class Preference:
    """DPO or ORPO on a batch of pairs: rows [chosen_1..B, rejected_1..B].

    DPO: rewards are beta * (policy - reference) summed log-probabilities; the loss is
    -log sigmoid(chosen reward - rejected reward) ("sigmoid"), or IPO's squared loss on the
    per-token log-ratios ("ipo", as TRL normalises it). ORPO: the chosen rows' NLL (per
    trained token over the batch) minus lambda (= beta) times the mean of log sigmoid of the
    log odds ratio of the rows' mean token log-probabilities; rewards are beta times those
    means. Logged log-probabilities are those rewards are made of (DPO: sums; ORPO: means).
    """

    method: str
    beta: float = 0.1
    loss: str = "sigmoid"

    names = ("pref_loss_sum", "nll_sum", "chosen_tokens", "pairs", "correct", "margin_sum",
             "chosen_reward_sum", "rejected_reward_sum", "chosen_logps_sum",
             "rejected_logps_sum", "log_odds_sum", "tokens")  # fmt: skip

    @property
    def metrics_logged(self) -> tuple[str, ...]:
        return PREFERENCE_METRICS

    def sums(
        self, model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array, grad: bool
    ) -> mx.array:
        logps, counts = sequence_logprobs(model, inputs, targets, mask, grad)  # (2B,), (2B,)
        n = logps.shape[0] // 2
        chosen, rejected = logps[:n], logps[n:]  # (B,)
        n_chosen, n_rejected = counts[:n], counts[n:]
        if self.method == "dpo":
            with adapters_off(model):
                ref, _ = sequence_logprobs(model, inputs, targets, mask, grad=False)
            ref = mx.stop_gradient(ref)
            chosen_ratio, rejected_ratio = chosen - ref[:n], rejected - ref[n:]
            if self.loss == "ipo":
                delta = chosen_ratio / n_chosen - rejected_ratio / n_rejected
                pair_loss = (delta - 1 / (2 * self.beta)) ** 2
            else:
                pair_loss = -nn.log_sigmoid(self.beta * (chosen_ratio - rejected_ratio))
            chosen_reward, rejected_reward = self.beta * chosen_ratio, self.beta * rejected_ratio
            log_odds = mx.zeros_like(chosen)
            chosen_shown, rejected_shown = chosen, rejected
        else:
            chosen_mean, rejected_mean = chosen / n_chosen, rejected / n_rejected
            log_odds = (chosen_mean - rejected_mean) - (
                log1mexp(chosen_mean) - log1mexp(rejected_mean)
            )
            pair_loss = -self.beta * nn.log_sigmoid(log_odds)
            chosen_reward, rejected_reward = self.beta * chosen_mean, self.beta * rejected_mean
            chosen_shown, rejected_shown = chosen_mean, rejected_mean
        margin = mx.stop_gradient(chosen_reward - rejected_reward)
        return mx.stack([
            pair_loss.sum(), -chosen.sum(), n_chosen.sum(), mx.array(float(n)),
            (margin > 0).sum().astype(mx.float32), margin.sum(),
            *(mx.stop_gradient(v).sum() for v in (chosen_reward, rejected_reward,
                                                   chosen_shown, rejected_shown, log_odds)),
            counts.sum(),
        ])  # fmt: skip

    def counts(self, batch: Batch) -> np.ndarray:
        n = len(batch.mask) // 2
        out = np.zeros(len(self.names), np.float32)
        out[CHOSEN_TOKENS], out[PAIRS], out[TOKENS] = batch.mask[:n].sum(), n, batch.mask.sum()
        return out

    def weights(self, counts: np.ndarray) -> np.ndarray:
        out = np.zeros(len(self.names), np.float32)
        out[PREF_LOSS] = 1 / max(counts[PAIRS], 1)
        if self.method == "orpo":
            out[NLL] = 1 / max(counts[CHOSEN_TOKENS], 1)
        return out

    def tokens(self, sums: np.ndarray) -> int:
        return int(sums[TOKENS])

    def metrics(self, sums: np.ndarray) -> dict[str, float]:
        pairs = max(float(sums[PAIRS]), 1.0)
        loss = sums[PREF_LOSS] / pairs
        if self.method == "orpo":
            loss += sums[NLL] / max(float(sums[CHOSEN_TOKENS]), 1.0)
        out = {
            "loss": float(loss),
            "reward_accuracy": float(sums[CORRECT] / pairs),
            "reward_margin": float(sums[MARGIN] / pairs),
            "chosen_logps": float(sums[CHOSEN_LOGPS] / pairs),
            "rejected_logps": float(sums[REJECTED_LOGPS] / pairs),
        }
        if self.method == "orpo":
            out["log_odds_ratio"] = float(sums[LOG_ODDS] / pairs)
        return out


def make_objective(method: str, beta: float, loss: str) -> SFT | Preference:
    return SFT() if method == "sft" else Preference(method, beta, loss)
