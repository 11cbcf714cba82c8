"""AllenAI OLMo in the Hugging Face layout (OlmoForCausalLM, `model_type: "olmo"`).

Llama's tensor names, but every norm is a LayerNorm without weights (eps 1e-5, in fp32) and
q, k, v may be clamped to [-clip_qkv, clip_qkv] right after their projections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelArgs, Family, KVCache, attention, causal_mask
from .llama import FAMILY as LLAMA
from .llama import MLP
from .rope import check_scaling, make_rope, rope_config


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    clip_qkv: float | None = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    mlp_bias: bool = False  # OLMo has none; lets MLP be shared with llama

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_scaling(self.rope_scaling)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        return super().from_dict(rope_config(config))


class LayerNorm(nn.Module):
    """Non-parametric LayerNorm computed in fp32, as OlmoLayerNorm does."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.layer_norm(x.astype(mx.float32), None, None, self.eps).astype(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim = args.hidden_size
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        hd = dim // self.n_heads
        self.scale = hd**-0.5
        self.clip = args.clip_qkv
        bias = args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=bias)
        self.rope = make_rope(hd, args.rope_theta, args.rope_scaling, args.max_position_embeddings)

    def __call__(self, x: mx.array, mask: str | None, cache: KVCache | None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.clip is not None:
            q, k, v = (mx.clip(t, -self.clip, self.clip) for t in (q, k, v))
        # (B, L, H*D) -> (B, H, L, D)
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.o_proj(attention(q, k, v, self.scale, mask, cache))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = LayerNorm()
        self.post_attention_layernorm = LayerNorm()

    def __call__(self, x: mx.array, mask: str | None, cache: KVCache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class OlmoModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = LayerNorm()

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None) -> mx.array:
        h = self.embed_tokens(inputs)  # (B, L, D)
        mask = causal_mask(h, cache)
        for layer, c in zip(self.layers, cache or [None] * len(self.layers), strict=True):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = OlmoModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        h = self.model(inputs, cache)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers


# Llama's tensor names, so Llama's LoRA targets and body; no chat template of its own.
FAMILY = Family(
    model_type="olmo",
    ModelArgs=ModelArgs,
    Model=Model,
    context_key="max_position_embeddings",
    lora_targets=LLAMA.lora_targets,
    body="model",
    embedding="embed_tokens",
)
