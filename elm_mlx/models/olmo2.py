"""AllenAI OLMo 2 in the Hugging Face layout (Olmo2ForCausalLM, `model_type: "olmo2"`).

Llama's tensor names and SwiGLU MLP, with three differences: RMSNorm over the whole q and k
projections (QK-norm, before RoPE), and the norms moved after attention and after the MLP
(`post_attention_layernorm`, `post_feedforward_layernorm`, applied to each branch before it is
added to the residual); no norm before them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .base import BaseModelArgs, Family, KVCache, attention, causal_mask
from .llama import FAMILY as LLAMA
from .llama import MLP
from .rope import check_scaling, make_rope, rope_config

# OLMo 2 Instruct's template (Tülu's), for tokenizers that ship none.
TULU_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    mlp_bias: bool = False  # OLMo 2 has none; lets MLP be shared with llama

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_scaling(self.rope_scaling)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        return super().from_dict(rope_config(config))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, rope: nn.Module):
        super().__init__()
        dim, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.scale = hd**-0.5
        bias = args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=bias)
        # QK-norm over all heads at once, as the checkpoints' (H*D,) weights say
        self.q_norm = nn.RMSNorm(self.n_heads * hd, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.n_kv_heads * hd, eps=args.rms_norm_eps)
        self.rope = rope

    def __call__(self, x: mx.array, mask: str | mx.array | None, cache: KVCache | None) -> mx.array:
        B, L, _ = x.shape
        q, k = self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x))
        # (B, L, H*D) -> (B, H, L, D)
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.o_proj(attention(q, k, v, self.scale, mask, cache))


def default_rope(args: ModelArgs) -> nn.Module:
    return make_rope(
        args.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings
    )


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, rope: nn.Module):
        super().__init__()
        self.self_attn = Attention(args, rope)
        self.mlp = MLP(args)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_feedforward_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: str | mx.array | None, cache: KVCache | None) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(x, mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(h))


class Olmo2Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, rope) for rope in self.ropes(args)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    @staticmethod
    def ropes(args: ModelArgs) -> list[nn.Module]:
        """Each layer's rotary embedding (here one for all: it holds no weights)."""
        return [default_rope(args)] * args.num_hidden_layers

    def masks(self, h: mx.array, cache: list[KVCache] | None) -> list[str | mx.array | None]:
        """Each layer's attention mask (all alike here: causal)."""
        return [causal_mask(h, cache)] * len(self.layers)

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None) -> mx.array:
        h = self.embed_tokens(inputs)  # (B, L, D)
        masks = self.masks(h, cache)
        for layer, mask, c in zip(
            self.layers, masks, cache or [None] * len(self.layers), strict=True
        ):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(llama.Model):
    """Llama's head over OLMo 2's body."""

    Body = Olmo2Model


# Llama's tensor names, so Llama's LoRA targets and body.
FAMILY = Family(
    model_type="olmo2",
    ModelArgs=ModelArgs,
    Model=Model,
    context_key="max_position_embeddings",
    lora_targets=LLAMA.lora_targets,
    body="model",
    embedding="embed_tokens",
    chat_template=TULU_TEMPLATE,
    default_dtype=lambda args: "bfloat16",  # trained in bf16; its residual stream is not normed
)
