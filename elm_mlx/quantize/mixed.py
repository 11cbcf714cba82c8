"""Mixed precision under a bit budget: which layer gets which `Setting`.

Each layer l has, for every candidate setting s, a cost in bits (codes + scales + biases) and an
estimated increase of the model's loss E_l(s) (see `sensitivity.py`). Assuming the increases
add up, the best assignment under a budget is a multiple-choice knapsack; like mlx-lm's
dynamic quantization we solve it greedily, but on each layer's lower convex hull of
(cost, error), upgrading first where an extra bit removes the most error. On convex hulls the
greedy order is that of the Lagrangian relaxation, optimal up to the last step that no longer
fits (Everett 1963; the standard bit-allocation argument of Shoham & Gersho 1988).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Any

import mlx.nn as nn

from .grid import Setting
from .sensitivity import LayerOptions


def lower_hull(points: list[tuple[float, float, Setting]]) -> list[tuple[float, float, Setting]]:
    """The (cost, error, setting) points on the lower-left convex hull, by increasing cost:
    each step costs more and removes error at a falling rate per bit."""
    best: dict[float, tuple[float, float, Setting]] = {}
    for cost, err, s in points:  # one point per cost: the least error
        if cost not in best or err < best[cost][1]:
            best[cost] = (cost, err, s)
    hull: list[tuple[float, float, Setting]] = []
    for p in sorted(best.values(), key=lambda p: p[0]):
        if hull and p[1] >= hull[-1][1]:
            continue  # costs more and is no better
        while len(hull) >= 2:
            (c0, e0, _), (c1, e1, _) = hull[-2], hull[-1]
            # drop the middle point if it lies on or above the chord from hull[-2] to p
            if (e1 - e0) * (p[0] - c0) >= (p[1] - e0) * (c1 - c0):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(
    options: Mapping[str, list[tuple[float, float, Setting]]], budget: float
) -> dict[str, Setting]:
    """One setting per layer, given each layer's (cost in bits, error, setting) options, with
    total cost at most `budget` bits (the caller checks that the cheapest choice fits)."""
    hulls = {name: lower_hull(points) for name, points in options.items()}
    chosen = {name: 0 for name in hulls}
    spent = sum(h[0][0] for h in hulls.values())
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        i, hull = chosen[name], hulls[name]
        if i + 1 < len(hull):
            rate = (hull[i][1] - hull[i + 1][1]) / (hull[i + 1][0] - hull[i][0])
            heapq.heappush(heap, (-rate, name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        i, hull = chosen[name], hulls[name]
        extra = hull[i + 1][0] - hull[i][0]
        if spent + extra <= budget:
            chosen[name], spent = i + 1, spent + extra
            push(name)
        # else: this layer's next step does not fit; cheaper steps of other layers still may
    return {name: hulls[name][i][2] for name, i in chosen.items()}


# Candidate settings of a mixed plan, cheapest first (bits per weight with 16-bit scales):
# 3/64 3.5, 3/32 4.0, 4/128 4.25, 4/64 4.5, 4/32 5.0, 5/64 5.5, 6/64 6.5, 8/64 8.5.
CANDIDATES = tuple(
    Setting(bits, group)
    for bits, group in ((3, 64), (3, 32), (4, 128), (4, 64), (4, 32), (5, 64), (6, 64), (8, 64))
)
MAX_BPW = 16.0  # a budget above 16 bits per weight asks for no quantization at all


def quantizable(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> the Linear and Embedding layers MLX can quantize."""
    return {p: m for p, m in model.named_modules() if hasattr(m, "to_quantized")}


def uniform_plan(model: nn.Module, setting: Setting) -> dict[str, Setting]:
    """`setting` for every quantizable layer whose input width it divides (others stay float,
    as `elm convert --quantize` leaves them)."""
    return {p: setting for p, m in quantizable(model).items() if setting.fits(m.weight.shape[-1])}


def cheapest_bpw(model: nn.Module, scale_bytes: int, candidates=CANDIDATES) -> float:
    """The lowest average bits per weight the candidates reach on this model."""
    bits = weights = 0.0
    for m in quantizable(model).values():
        fitting = [s.bits_per_weight(scale_bytes) for s in candidates if s.fits(m.weight.shape[-1])]
        if fitting:
            bits += min(fitting) * m.weight.size
            weights += m.weight.size
    return bits / max(weights, 1)


def budget_plan(options: Mapping[str, LayerOptions], bpw: float) -> dict[str, Setting]:
    """The settings whose estimated loss is least with at most `bpw` bits per weight on
    average over the layers in `options`."""
    options = {p: o for p, o in options.items() if o.options}  # no candidate fits: stays float
    weights = sum(o.size for o in options.values())
    return allocate({p: o.options for p, o in options.items()}, bpw * weights)


def quantization_config(plan: Mapping[str, Setting], sizes: Mapping[str, int]) -> dict[str, Any]:
    """config.json's "quantization" as mlx-lm writes it: the most common setting (by weights)
    at the top, and each layer that differs under its module path."""
    by_setting: dict[Setting, int] = {}
    for path, s in plan.items():
        by_setting[s] = by_setting.get(s, 0) + sizes[path]
    base = max(by_setting, key=lambda s: (by_setting[s], s))
    config: dict[str, Any] = {**base.as_dict(), "mode": "affine"}
    config.update({p: s.as_dict() for p, s in sorted(plan.items()) if s != base})
    return config


def describe_plan(plan: Mapping[str, Setting], sizes: Mapping[str, int]) -> str:
    """One line: each setting's layer count and share of the weights, most weights first, and
    the setting of each layer above a tenth of the weights (embedding, output layer)."""
    total = sum(sizes[p] for p in plan)
    by_setting: dict[Setting, list[str]] = {}
    for path, s in plan.items():
        by_setting.setdefault(s, []).append(path)
    parts = [
        f"{s.bits}-bit g{s.group_size} {len(paths)} layers "
        f"({100 * sum(sizes[p] for p in paths) / total:.0f}%)"
        for s, paths in sorted(by_setting.items(), key=lambda kv: -sum(sizes[p] for p in kv[1]))
    ]
    large = [f"{p} {s.bits}-bit g{s.group_size}" for p, s in plan.items() if sizes[p] > total / 10]
    return "; ".join(parts) + (f" ({', '.join(large)})" if large else "")


def bits_per_weight(model: nn.Module) -> float:
    """Average bits per weight over the quantized layers: packed codes, scales and biases."""
    bits = weights = 0
    for m in model.modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            bits += 8 * (m.weight.nbytes + m.scales.nbytes + m.biases.nbytes)
            weights += m.weight.size * 32 // m.bits
    return bits / max(weights, 1)
