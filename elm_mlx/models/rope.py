"""Rotary position embeddings with the scalings Llama-architecture checkpoints declare in
config.json (`rope_scaling`, or `rope_parameters` in transformers >= 5): none, `linear`
(positions divided by `factor`), `dynamic` (NTK-aware: the base grows once a sequence passes
`max_position_embeddings`), `llama3` (Llama 3.1+: low frequencies divided by `factor`,
high ones kept, a smooth blend between) and `yarn` (OLMo 3: the same blend over a linear ramp
of dimensions, and queries and keys scaled by an attention factor). Formulas as in
transformers' `modeling_rope_utils`.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_type(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type") or scaling.get("type") or "default"


def rope_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json with transformers-5 `rope_parameters` folded into the keys of
    transformers 4 (`rope_theta`, `rope_scaling`), which is also what mlx-lm reads."""
    params = config.get("rope_parameters") or {}
    out = dict(config)
    if "rope_theta" not in out and "rope_theta" in params:
        out["rope_theta"] = params["rope_theta"]
    if not out.get("rope_scaling") and rope_type(params) != "default":
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return out


def check_scaling(scaling: dict[str, Any] | None) -> None:
    kind = rope_type(scaling)
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported; elm-mlx supports "
            + ", ".join(ROPE_TYPES)
        )
    required = {"linear": ("factor",), "dynamic": ("factor",)}
    required["llama3"] = (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
    )  # fmt: skip
    required["yarn"] = ("original_max_position_embeddings",)
    if missing := [k for k in required.get(kind, ()) if k not in scaling]:
        raise ValueError(f"rope_scaling of type {kind!r} lacks {', '.join(missing)}")


def _inv_freq(dims: int, base: float) -> mx.array:
    return 1.0 / (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))  # (dims/2,)


def llama3_inv_freq(dims: int, base: float, scaling: dict[str, Any]) -> mx.array:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    inv_freq = _inv_freq(dims, base)
    wavelen = 2 * math.pi / inv_freq
    scaled = mx.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return mx.where(medium, blended, scaled)


def yarn_inv_freq(
    dims: int, base: float, scaling: dict[str, Any], max_positions: int
) -> tuple[mx.array, float]:
    """YaRN's inverse frequencies and attention factor (arXiv 2309.00071): dimensions that turn
    fewer than `beta_slow` times over the original context are interpolated (divided by
    `factor`), those turning more than `beta_fast` times kept, a linear ramp between."""
    old_context = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_positions / old_context
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor)
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dims * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001  # no singularity
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    inv_freq = _inv_freq(dims, base)
    keep = 1 - ramp  # (dims/2,) 1: extrapolate (keep), 0: interpolate
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention_factor)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class ScaledRoPE(nn.Module):
    """RoPE from explicit inverse frequencies (llama3), or whose base grows with the
    sequence length (dynamic NTK: for a sequence of n > max_positions tokens the base is
    base * (factor * n / max_positions - factor + 1) ** (dims / (dims - 2)), applied to the
    positions of this call as transformers does); `mscale` multiplies the result (YaRN)."""

    def __init__(
        self,
        dims: int,
        traditional: bool,
        base: float,
        inv_freq: mx.array | None = None,
        dynamic_factor: float | None = None,
        max_positions: int = 0,
        mscale: float = 1.0,
    ):
        super().__init__()
        self.dims, self.traditional, self.base, self.mscale = dims, traditional, base, mscale
        self.dynamic_factor, self.max_positions = dynamic_factor, max_positions
        if inv_freq is not None:
            self._freqs = 1.0 / inv_freq  # mx.fast.rope takes periods: (dims/2,)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        freqs = getattr(self, "_freqs", None)
        if self.dynamic_factor is not None:
            # (B, H, L, D): the sequence reaches the largest position of this call
            length = int(mx.max(mx.array(offset)).item()) + x.shape[-2]
            if length > self.max_positions:
                factor, dims = self.dynamic_factor, self.dims
                base = self.base * (factor * length / self.max_positions - factor + 1) ** (
                    dims / (dims - 2)
                )
                freqs = 1.0 / _inv_freq(dims, base)
        base = None if freqs is not None else self.base
        out = mx.fast.rope(
            x, self.dims, traditional=self.traditional, base=base, scale=1.0, offset=offset,
            freqs=freqs,
        )  # fmt: skip
        return out if self.mscale == 1.0 else out * self.mscale


def make_rope(
    dims: int,
    base: float,
    scaling: dict[str, Any] | None,
    max_positions: int,
    traditional: bool = False,
) -> nn.Module:
    """The rotary embedding a config asks for (see `check_scaling` for what is supported)."""
    check_scaling(scaling)
    kind = rope_type(scaling)
    if kind == "default":
        return nn.RoPE(dims, traditional=traditional, base=base)
    if kind == "linear":
        return nn.RoPE(dims, traditional=traditional, base=base, scale=1 / scaling["factor"])
    if kind == "llama3":
        return ScaledRoPE(dims, traditional, base, inv_freq=llama3_inv_freq(dims, base, scaling))
    if kind == "yarn":
        inv_freq, mscale = yarn_inv_freq(dims, base, scaling, max_positions)
        return ScaledRoPE(dims, traditional, base, inv_freq=inv_freq, mscale=mscale)
    return ScaledRoPE(
        dims, traditional, base, dynamic_factor=scaling["factor"], max_positions=max_positions
    )
