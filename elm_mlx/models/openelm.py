"""Apple OpenELM (`model_type: "openelm"`), layer-wise scaled: every layer has its own number
of query/kv heads and its own FFN width, read from config.json or derived from the multipliers.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .base import (
    BaseModelArgs,
    Family,
    KVCache,
    TokenizerSource,
    attention,
    causal_mask,
    swiglu,
)


def make_divisible(v: float, divisor: int) -> int:
    """Round v to a multiple of divisor, never more than 10% below v (Apple's rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


def _linspace(lo: float, hi: float, n: int) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) if n > 1 else lo for i in range(n)]


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    head_dim: int
    num_transformer_layers: int
    model_dim: int
    vocab_size: int
    ffn_dim_divisor: int = 256
    num_query_heads: list[int] | None = None
    num_kv_heads: list[int] | None = None
    ffn_multipliers: list[float] | float | tuple[float, float] = (0.5, 4.0)
    qkv_multipliers: list[float] | float = (0.5, 1.0)
    num_gqa_groups: int = 4
    ffn_with_glu: bool = True
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    rms_norm_eps: float = 1e-6
    rope_freq_constant: float = 10000
    max_context_length: int = 2048

    def __post_init__(self) -> None:
        # The saved configs hold the per-layer lists; derive them as Apple's code does otherwise.
        n = self.num_transformer_layers
        if self.num_query_heads is None or self.num_kv_heads is None:
            qkv = self.qkv_multipliers
            if isinstance(qkv, (int, float)):
                qkv_m = [float(qkv)] * n
            else:
                qkv_m = [round(m, 2) for m in _linspace(qkv[0], qkv[1], n)]
            step = self.head_dim * self.num_gqa_groups
            self.num_query_heads = [
                make_divisible(self.model_dim * m, step) // self.head_dim for m in qkv_m
            ]
            self.num_kv_heads = [q // self.num_gqa_groups for q in self.num_query_heads]
        ffn = self.ffn_multipliers
        if isinstance(ffn, (int, float)):
            self.ffn_multipliers = [float(ffn)] * n
        elif len(ffn) != n:
            self.ffn_multipliers = [round(m, 2) for m in _linspace(ffn[0], ffn[1], n)]
        self.ffn_multipliers = list(self.ffn_multipliers)
        if not (len(self.num_query_heads) == len(self.num_kv_heads) == n):
            raise ValueError(f"per-layer head lists must have {n} entries")
        if not self.ffn_with_glu:
            raise ValueError("OpenELM without GLU (ffn_with_glu: false) is not supported")

    def ffn_dim(self, layer: int) -> int:
        return int(
            make_divisible(self.ffn_multipliers[layer] * self.model_dim, self.ffn_dim_divisor)
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        hd = args.head_dim
        self.n_heads, self.n_kv_heads = args.num_query_heads[layer], args.num_kv_heads[layer]
        self.scale = hd**-0.5
        self.qkv_proj = nn.Linear(
            args.model_dim, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=False
        )
        self.out_proj = nn.Linear(self.n_heads * hd, args.model_dim, bias=False)
        if args.normalize_qk_projections:
            self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.rope = nn.RoPE(hd, traditional=False, base=args.rope_freq_constant)

    def __call__(self, x: mx.array, mask: str | None, cache: KVCache | None) -> mx.array:
        B, L, _ = x.shape
        # qkv rows are head-major blocks: q heads, then k heads, then v heads.
        qkv = self.qkv_proj(x).reshape(B, L, -1, self.rope.dims).transpose(0, 2, 1, 3)
        q, k, v = mx.split(qkv, [self.n_heads, self.n_heads + self.n_kv_heads], axis=1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)  # per head, before RoPE
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.out_proj(attention(q, k, v, self.scale, mask, cache))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        hidden = args.ffn_dim(layer)
        self.proj_1 = nn.Linear(args.model_dim, 2 * hidden, bias=False)
        self.proj_2 = nn.Linear(hidden, args.model_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.proj_1(x), 2, axis=-1)  # the FIRST half is the gate
        return self.proj_2(swiglu(gate, up))


class TransformerLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.attn = Attention(args, layer)
        self.ffn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.ffn = FeedForward(args, layer)

    def __call__(self, x: mx.array, mask: str | None, cache: KVCache | None) -> mx.array:
        h = x + self.attn(self.attn_norm(x), mask, cache)
        return h + self.ffn(self.ffn_norm(h))


class OpenELMModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.token_embeddings = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [TransformerLayer(args, i) for i in range(args.num_transformer_layers)]
        self.norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None) -> mx.array:
        h = self.token_embeddings(inputs)  # (B, L, D)
        mask = causal_mask(h, cache)
        for layer, c in zip(self.layers, cache or [None] * len(self.layers), strict=True):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.transformer = OpenELMModel(args)
        if not args.share_input_output_layers:
            self.lm_head = nn.Linear(args.model_dim, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        h = self.transformer(inputs, cache)
        if self.args.share_input_output_layers:
            return self.transformer.token_embeddings.as_linear(h)
        return self.lm_head(h)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        if self.args.share_input_output_layers:
            weights.pop("lm_head.weight", None)
        return weights

    @property
    def layers(self) -> list[TransformerLayer]:
        return self.transformer.layers


# OpenELM-Instruct was tuned on Zephyr-style turns whose role markers are plain text.
ZEPHYR_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Apple's repos ship no tokenizer: OpenELM uses Llama-2's SentencePiece model, which some
# ungated repos carry too (the file is checked by its hash).
LLAMA2_TOKENIZER = TokenizerSource(
    filename="tokenizer.model",
    sha256="9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347",
    repos=(
        "meta-llama/Llama-2-7b-hf",
        "mlx-community/OpenELM-1_1B-4bit",
        "Xenova/OpenELM-270M-Instruct",
    ),
)


def default_dtype(args: ModelArgs) -> str:
    """bfloat16 for OpenELM-3B, as Apple advises (its activations overflow float16)."""
    return "bfloat16" if args.model_dim >= 3072 else "float16"


FAMILY = Family(
    model_type="openelm",
    ModelArgs=ModelArgs,
    Model=Model,
    context_key="max_context_length",
    lora_targets=("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2"),
    body="transformer",
    embedding="token_embeddings",
    chat_template=ZEPHYR_TEMPLATE,
    tokenizer=LLAMA2_TOKENIZER,
    default_dtype=default_dtype,
)
