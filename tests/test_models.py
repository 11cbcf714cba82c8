"""Each family, converted from a checkpoint in the exact HF layout, against the oracles:
transformers' torch models (Llama, OLMo 1-3) and mlx-lm's implementations (Llama, OLMo 2-3,
OpenELM)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from oracles import logits_of, mlx_lm_model, read_hf_tensors, torch_logits
from tiny_checkpoints import openelm_config
from tiny_data import random_ids

from elm_mlx.errors import ConfigError
from elm_mlx.loader import build_model, load_model
from elm_mlx.models import make_cache
from elm_mlx.models.openelm import ModelArgs as OpenELMArgs

ATOL = 1e-4  # fp32 on both sides; observed differences are ~2e-6
# The config.json of each OpenELM size as published by Apple, with derived dimensions.
OPENELM_CONFIGS = Path(__file__).parent / "data" / "openelm-configs.json"

CHECKPOINTS = [
    ("llama", {}),  # fp32, one model.safetensors, untied, transformers-4 config keys
    ("llama", {"dtype": "bfloat16", "sharded": True, "tie": True}),
    ("llama", {"legacy_config": False}),  # transformers-5 keys: rope_parameters, dtype
    ("llama", {"fmt": "bin"}),  # pickled pytorch_model.bin, as OpenLLaMA ships
    ("llama", {"fmt": "bin", "dtype": "bfloat16", "sharded": True}),
    ("olmo", {}),  # tied, like OLMo-1B-hf
    ("olmo", {"tie": False, "clip_qkv": 0.5}),  # untied + clip_qkv, like OLMo-7B-0424-hf
    ("olmo", {"dtype": "bfloat16", "sharded": True, "tie": False, "clip_qkv": 0.5}),
    ("olmo2", {}),  # untied, GQA, like OLMo-2-1124-*
    ("olmo2", {"dtype": "bfloat16", "sharded": True, "tie": True}),  # tied like OLMo-2-0425-1B
    ("olmo3", {}),  # sliding layers over 8 positions, a full one; 16 tokens pass the window
    ("olmo3", {"legacy_config": False}),  # transformers 5: rope_parameters per layer type
    ("olmo3", {"rope_scaling": "yarn", "max_position_embeddings": 64}),  # like Olmo-3-1025-7B
    ("openelm", {}),  # fp32 base model, one file
    ("openelm", {"dtype": "bfloat16", "sharded": True}),  # bf16, sharded like 3B
]


# Olmo-3-1025-7B's YaRN, with the original context scaled down to the tiny model's.
OLMO3_YARN = {
    "rope_type": "yarn",
    "factor": 8.0,
    "original_max_position_embeddings": 8,
    "attention_factor": 1.2079441541679836,
    "beta_fast": 32,
    "beta_slow": 1,
}


def _hf(hf: dict) -> dict:
    """A CHECKPOINTS entry as `TinyModels.hf` keyword arguments (named scalings expanded)."""
    return {**hf, "rope_scaling": OLMO3_YARN} if hf.get("rope_scaling") == "yarn" else hf


def _id(case):
    family, hf = case
    return family + "".join(f"-{k}={v}" for k, v in sorted(hf.items()))


@pytest.mark.parametrize("case", CHECKPOINTS, ids=_id)
def test_converted_logits_match_oracles(tiny, case):
    family, hf = case[0], _hf(case[1])
    src = tiny.hf(family, **hf)
    model = load_model(tiny.converted(family, hf)).model
    ids = random_ids(16)
    ours = logits_of(model, ids)
    # Weights of std 0.1 give logits of std ~0.8: the tolerance is small against them.
    assert ours.std() > 0.3
    checked = 0
    if family != "openelm":
        np.testing.assert_allclose(ours, torch_logits(src, ids), atol=ATOL, rtol=0)
        checked += 1
    config = json.loads((src / "config.json").read_text())
    if family != "olmo" and not (family == "olmo3" and "rope_parameters" in config):
        # (mlx-lm reads OLMo 3's RoPE from transformers-4 keys only)
        oracle = mlx_lm_model(family, config, read_hf_tensors(src))
        np.testing.assert_allclose(ours, logits_of(oracle, ids), atol=ATOL, rtol=0)
        checked += 1
    assert checked


@pytest.mark.parametrize("hf", [{}, {"rope_scaling": "yarn", "max_position_embeddings": 64}])
def test_olmo3_through_the_cache_past_the_window(tiny, hf):
    """Prompt chunks and single tokens fed through the cache up to 40 positions (five times the
    sliding window of 8) give transformers' logits of the whole sequence at every position."""
    hf = _hf(hf)
    src = tiny.hf("olmo3", **hf)
    model = load_model(tiny.converted("olmo3", hf)).model
    ids = random_ids(40, seed=3)
    want = torch_logits(src, ids)
    cache = make_cache(model)
    got, start = [], 0
    for size in (5, 1, 1, 7, 1, 12, 1, 1, 1, 10):  # chunks that start inside and past windows
        chunk = mx.array(ids[start : start + size], mx.uint32)[None]
        got.append(np.array(model(chunk, cache=cache)[0].astype(mx.float32)))
        start += size
    assert start == len(ids)
    np.testing.assert_allclose(np.concatenate(got), want, atol=ATOL, rtol=0)
    # the window and the scaling matter: transformers without them gives other logits
    wide = torch_logits(src, ids, sliding_window=4096)
    assert np.abs(wide[8:] - want[8:]).max() > 1e-2
    assert np.abs(wide[:8] - want[:8]).max() < ATOL  # inside the window, nothing differs
    if hf:
        default = {"rope_type": "default", "rope_theta": 500000.0}
        plain = torch_logits(
            src, ids, rope_parameters={"full_attention": default, "sliding_attention": default}
        )
        assert np.abs(plain - want).max() > 1e-2


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
}


@pytest.mark.parametrize("legacy_config", [True, False], ids=["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("kind", ROPE_SCALINGS)
def test_llama_rope_scaling_matches_transformers(tiny, kind, legacy_config):
    """Llama 3.x (`llama3`) and fine-tunes that stretch the context (`linear`, `dynamic`), with
    the keys of transformers 4 (`rope_scaling`) or 5 (`rope_parameters`); 40 tokens pass the
    16 positions the config names, so the dynamic base grows."""
    hf = {"rope_scaling": ROPE_SCALINGS[kind], "max_position_embeddings": 16}
    src = tiny.hf("llama", legacy_config=legacy_config, **hf)
    written = json.loads((src / "config.json").read_text())
    assert ("rope_scaling" in written) is legacy_config
    ids = random_ids(40)
    model = load_model(tiny.converted("llama", {"legacy_config": legacy_config, **hf})).model
    ours = logits_of(model, ids)
    np.testing.assert_allclose(ours, torch_logits(src, ids), atol=ATOL, rtol=0)
    # the scaling matters: without it transformers' own logits differ
    default = {"rope_type": "default", "rope_theta": 10000.0}
    plain = torch_logits(src, ids, rope_scaling=None, rope_parameters=default)
    assert np.abs(plain - ours).max() > 1e-2


def test_unknown_rope_scaling_is_refused(tiny, tmp_path):
    src = tiny.hf("llama")
    config = json.loads((src / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "longrope", "factor": 4.0}
    with pytest.raises(ConfigError, match="rope_scaling type 'longrope' is not supported"):
        build_model(config)


def test_olmo_clip_qkv_is_exercised(tiny):
    """The clip_qkv cases above only prove something if clamping changes the output."""
    src = tiny.hf("olmo", tie=False, clip_qkv=0.5)
    ids = random_ids(16)
    clipped, unclipped = torch_logits(src, ids), torch_logits(src, ids, clip_qkv=None)
    assert np.abs(clipped - unclipped).max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "olmo", "olmo2"])
def test_tied_checkpoints_have_no_lm_head(tiny, family):
    for tie in (True, False):
        out = tiny.converted(family, {"tie": tie})
        names = set(mx.load(str(out / "model.safetensors")))
        assert ("lm_head.weight" in names) is not tie
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tie


def _without_lists(config: dict) -> dict:
    config = {k: v for k, v in config.items() if k not in ("num_query_heads", "num_kv_heads")}
    config["ffn_multipliers"] = [0.5, 4.0]  # the (min, max) form Apple's code expands
    return config


@pytest.mark.parametrize("size", ["270M", "450M", "1_1B", "3B"])
def test_openelm_sizes_derived_from_multipliers(size):
    """A config without the per-layer lists yields the lists Apple's saved configs hold."""
    entry = json.loads(OPENELM_CONFIGS.read_text())[f"apple/OpenELM-{size}"]
    saved, derived = entry["config.json"], entry["derived"]
    args = OpenELMArgs.from_dict(_without_lists(saved))
    n = saved["num_transformer_layers"]
    assert args.num_query_heads == saved["num_query_heads"]
    assert args.num_kv_heads == saved["num_kv_heads"]
    assert args.ffn_multipliers == saved["ffn_multipliers"]
    assert [args.ffn_dim(i) for i in range(n)] == derived["ffn_dims"]
    qkv_out = [
        (q + 2 * k) * saved["head_dim"]
        for q, k in zip(args.num_query_heads, args.num_kv_heads, strict=True)
    ]
    assert qkv_out == derived["qkv_out"]
    # The model built from it (lazily: nothing is computed) has the published parameter count.
    model = build_model(_without_lists(saved))
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == derived["params"]


def test_openelm_without_lists_converts_for_mlx_lm(tiny, tmp_path):
    """The converter writes the per-layer lists mlx-lm needs when the source lacks them."""
    import mlx_lm
    from tiny_checkpoints import convert_tiny, write_hf_openelm

    full = openelm_config(num_layers=3)
    src = write_hf_openelm(tmp_path / "hf", config=_without_lists(full), layout=full, seed=1)
    out = convert_tiny(src, tmp_path / "mlx", tokenizer=str(tiny.spm / "tokenizer.model"))
    written = json.loads((out / "config.json").read_text())
    for key in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
        assert written[key] == full[key]
    ids = random_ids(12)
    theirs = logits_of(mlx_lm.load(str(out))[0], ids)
    oracle = logits_of(mlx_lm_model("openelm", full, read_hf_tensors(src)), ids)
    np.testing.assert_allclose(logits_of(load_model(out).model, ids), oracle, atol=ATOL, rtol=0)
    np.testing.assert_allclose(theirs, oracle, atol=ATOL, rtol=0)
