"""What the tests compare with and run beside: the oracles (transformers' torch models,
mlx-lm's implementations, numpy's reading of MLX's quantized layout, exact sampling
distributions with a chi-square test) and free ports for processes that talk to each other."""

from __future__ import annotations

import math
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np

from elm_mlx.engine.config import GenerationConfig
from elm_mlx.engine.sampling import make_transform

# ---------------------------------------------------------------------------- models


def logits_of(model: Any, ids: list[int] | np.ndarray) -> np.ndarray:
    """Full-sequence fp32 logits (L, V) of an MLX model (ours or mlx-lm's)."""
    out = model(mx.array(np.asarray(ids, dtype=np.int32))[None])
    return np.array(out[0].astype(mx.float32))


def torch_model(folder: Path, **config: Any) -> Any:
    """transformers' fp32 model of an HF Llama or OLMo folder (`config` overrides keys)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **config)
    return model.eval()


def torch_logits(folder: Path, ids: list[int] | np.ndarray, **config: Any) -> np.ndarray:
    """transformers' fp32 logits (L, V) for an HF Llama or OLMo folder."""
    import torch

    model = torch_model(folder, **config)
    with torch.no_grad():
        out = model(torch.tensor(np.asarray(ids, dtype=np.int64))[None]).logits
    return out[0].float().numpy()


def mlx_lm_model(family: str, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> Any:
    """mlx-lm's own implementation of `family` holding `tensors` (fp32)."""
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{family}")
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = {k: mx.array(v) for k, v in tensors.items()}
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def read_hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF folder as fp32 numpy, read with torch/safetensors (not our reader)."""
    import torch
    from safetensors.torch import load_file

    out: dict[str, np.ndarray] = {}
    files = sorted(Path(folder).glob("*.safetensors")) or sorted(Path(folder).glob("*.bin"))
    for f in files:
        state = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f)
        out |= {k: v.float().numpy() for k, v in state.items()}
    return out


def dequantize_np(
    wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int
) -> np.ndarray:
    """mlx-lm's affine layout decoded with numpy alone: `bits`-bit codes in one little-endian
    bit stream through the uint32 words (a 3-, 5- or 6-bit code may straddle two words),
    value = code * scale + bias per group of `group_size` inputs."""
    stream = np.unpackbits(wq.astype("<u4").view(np.uint8), axis=-1, bitorder="little")
    stream = stream.reshape(*wq.shape[:-1], -1, bits).astype(np.uint32)
    codes = (stream << np.arange(bits, dtype=np.uint32)).sum(-1).astype(np.float32)
    s = np.repeat(scales.astype(np.float32), group_size, axis=-1)
    b = np.repeat(biases.astype(np.float32), group_size, axis=-1)
    return codes * s + b


# ---------------------------------------------------------------------------- distributions


def exact_distribution(model, prompt: list[int], config: GenerationConfig, n: int) -> dict:
    """P(first n tokens) under plain sampling, from full forward passes (no cache)."""
    transform = make_transform(config.temperature, config.top_p, config.top_k, config.min_p)
    processors = config.logits_processors()
    dist = {(): 1.0}
    for _ in range(n):
        longer = {}
        for prefix, prob in dist.items():
            seq = mx.array(prompt + list(prefix), mx.uint32)
            logits = model(seq[None])[:, -1, :]
            for processor in processors:
                logits = processor(seq, logits)
            p = mx.exp(transform(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))[0]
            for t, pt in enumerate(p.tolist()):
                if pt > 0:
                    longer[(*prefix, t)] = prob * pt
        dist = longer
    return dist


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square variable with `dof` degrees of freedom: the regularised upper
    incomplete gamma Q(dof/2, x/2), by the recursion Q(a+1, y) = Q(a, y) + y^a e^-y / Γ(a+1)."""
    y = x / 2
    if dof % 2 == 0:
        a, q = 1.0, math.exp(-y)
    else:
        a, q = 0.5, math.erfc(math.sqrt(y))
    while a < dof / 2:
        q += math.exp(a * math.log(y) - y - math.lgamma(a + 1)) if y > 0 else 0.0
        a += 1
    return q


def chi_square_p(counts: Counter, dist: dict, total: int) -> float:
    """p-value of the counts under `dist`; cells expecting fewer than 5 are pooled."""
    assert set(counts) <= set(dist), "sampled a sequence plain sampling cannot produce"
    stat, small_obs, small_exp, cells = 0.0, 0, 0.0, 0
    for seq, prob in dist.items():
        expected = prob * total
        if expected < 5:
            small_obs, small_exp = small_obs + counts[seq], small_exp + expected
            continue
        stat += (counts[seq] - expected) ** 2 / expected
        cells += 1
    if small_exp > 0:
        stat += (small_obs - small_exp) ** 2 / small_exp
        cells += 1
    return chi2_sf(stat, cells - 1)


# ---------------------------------------------------------------------------- processes


def free_port_pair() -> int:
    """A port p such that p and p + 1 were free a moment ago (the ring listens on both)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports")
