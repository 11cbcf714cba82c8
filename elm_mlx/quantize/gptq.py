"""GPTQ: round a layer's weights one input column at a time, folding each column's rounding
error into the columns not yet rounded so that the layer's output on calibration inputs moves
as little as possible (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", arXiv:2210.17323).

The objective is ||(W_q - W) X^T||^2 for inputs X, i.e. tr((W_q - W) H (W_q - W)^T) with
H = X^T X / N. Columns go in decreasing order of H's diagonal ("act-order"), and every group's
grid is fixed beforehand by `grid.fit_grid` ("static groups"), so the order does not scatter
groups and the grids can be chosen to hit a source checkpoint's own grid.
"""

from __future__ import annotations

import os

import numpy as np

from .grid import thread_pool

DAMP = 0.01  # fraction of H's mean diagonal added to it, as in the paper
BLOCK = 128  # columns rounded before their error is propagated to the rest in one matmul


def inverse_cholesky(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1 (U^T U = H^-1), in float64;
    the damping grows until H is positive definite."""
    h = h.astype(np.float64)
    n = h.shape[0]
    mean_diag = float(np.mean(np.diag(h))) or 1.0
    for _ in range(6):
        try:
            lower = np.linalg.cholesky(h + damp * mean_diag * np.eye(n))
            break
        except np.linalg.LinAlgError:
            damp *= 10
    else:
        raise np.linalg.LinAlgError("input second moment is not positive definite")
    lower_inv = np.linalg.inv(lower)
    return np.linalg.cholesky(lower_inv.T @ lower_inv).T


def gptq(
    w: np.ndarray, h: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int
) -> np.ndarray:
    """Codes (out, n) for w (out, n) on the fixed grids scales/biases (out, n / group), given the
    input second moment h (n, n). Rows are independent given H: chunks of them run on threads."""
    out, n = w.shape
    group = n // scales.shape[1]
    h = h.copy()
    dead = np.diag(h) == 0  # inputs never active: any value is exact
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable")
    u = inverse_cholesky(h[np.ix_(order, order)]).astype(np.float32)
    w = w[:, order].astype(np.float32)
    w[:, dead[order]] = 0.0
    col_scales, col_biases = scales[:, order // group], biases[:, order // group]  # (out, n)
    codes = np.empty((out, n), np.float32)

    chunk = -(-out // (os.cpu_count() or 1))  # one task per core: the column loop is long

    def rows(r0: int) -> None:
        r = slice(r0, r0 + chunk)
        codes[r] = _gptq_rows(w[r], u, col_scales[r], col_biases[r], 2**bits - 1)

    list(thread_pool().map(rows, range(0, out, chunk)))
    return codes[:, np.argsort(order)]


def _gptq_rows(
    w: np.ndarray, u: np.ndarray, scales: np.ndarray, biases: np.ndarray, top: int
) -> np.ndarray:
    """GPTQ's column loop for some rows: w, scales, biases (rows, n) in act-order, u (n, n)."""
    rows, n = w.shape
    codes = np.empty((rows, n), np.float32)
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        block, err = w[:, b0:b1].copy(), np.empty((rows, b1 - b0), np.float32)
        for i in range(b1 - b0):
            j = b0 + i
            s, b = scales[:, j], biases[:, j]
            c = np.clip(np.rint((block[:, i] - b) / s), 0, top)
            codes[:, j] = c
            e = (block[:, i] - (c * s + b)) / u[j, j]
            block[:, i:] -= np.outer(e, u[j, j:b1])
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return codes


def asymmetric_target(
    w: np.ndarray, h: np.ndarray, cross: np.ndarray, alpha: float = 1.0, damp: float = DAMP
) -> np.ndarray:
    """The weight (out, n) whose GPTQ objective on H is the asymmetric one of GPTAQ (Li et al.
    2025, "GPTQv2: Efficient Finetuning-Free Quantization for Asymmetric Calibration",
    arXiv:2504.02692, since renamed GPTAQ): the error against the float model's own output
    X_f W^T, not against W applied to the quantized model's inputs X_q.

    With H = X_q^T X_q / N and C = `cross` = (X_f - X_q)^T X_q / N, both (n, n),
    ||X_q W_q^T - X_f W^T||^2 = ||X_q (W_q - W*)^T||^2 + const for W* = W + W C H^-1, so GPTQ
    run on W* with the same H minimises it. H is damped as GPTQ damps it; `alpha` scales the
    correction (0: GPTQ's own target W; 1: the least-squares W*)."""
    h = h.astype(np.float64)  # a copy
    n = h.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0  # as `gptq` does: such inputs have no cross term either (column 0)
    h[np.diag_indices(n)] += damp * float(np.mean(np.diag(h)))
    w64 = w.astype(np.float64)
    # (W C H^-1)^T = H^-1 (W C)^T: a solve, H symmetric positive definite
    correction = np.linalg.solve(h, (w64 @ cross.astype(np.float64)).T).T  # (out, n)
    return (w64 + alpha * correction).astype(np.float32)
