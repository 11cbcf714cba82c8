"""AllenAI OLMo 3 in the Hugging Face layout (Olmo3ForCausalLM, `model_type: "olmo3"`).

OLMo 2's blocks (QK-norm, norms after attention and after the MLP), with sliding-window
attention: `layer_types[i]` is "sliding_attention" (the query sees the last `sliding_window`
positions, its own included; three layers of every four by default) or "full_attention".
`rope_scaling` (YaRN in the long-context checkpoints) applies to the full layers only; sliding
layers keep plain RoPE, as in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import olmo2
from .base import Family, KVCache, causal_mask
from .rope import rope_type

FULL, SLIDING = "full_attention", "sliding_attention"

# OLMo 3 Instruct's turns (ChatML), for tokenizers that ship no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class ModelArgs(olmo2.ModelArgs):
    sliding_window: int = 4096
    layer_types: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_types is None:  # transformers' default: every fourth layer is full
            self.layer_types = [
                FULL if (i + 1) % 4 == 0 else SLIDING for i in range(self.num_hidden_layers)
            ]
        if unknown := set(self.layer_types) - {FULL, SLIDING}:
            raise ValueError(f"layer_types holds {sorted(unknown)}; OLMo 3 has {FULL}, {SLIDING}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types names {len(self.layer_types)} layers, the model has "
                f"{self.num_hidden_layers}"
            )

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        return super().from_dict(_fold_rope_parameters(config))


def _fold_rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes OLMo 3's RoPE per layer type (`rope_parameters: {"full_attention":
    {...}, "sliding_attention": {...}}`); fold it into the keys of transformers 4 (`rope_theta`,
    `rope_scaling` of the full layers), which the public checkpoints hold. Sliding layers with
    a RoPE of their own (not plain, or another base) are refused."""
    params = config.get("rope_parameters") or {}
    if FULL not in params and SLIDING not in params:
        return config
    full = dict(params.get(FULL) or {})
    sliding = dict(params.get(SLIDING) or {})
    out = {k: v for k, v in config.items() if k != "rope_parameters"}
    theta = full.pop("rope_theta", config.get("rope_theta", 500000.0))
    out["rope_theta"] = theta
    if rope_type(full) != "default":
        out["rope_scaling"] = full
    if rope_type(sliding) != "default" or sliding.get("rope_theta", theta) != theta:
        raise ValueError(
            "rope_parameters.sliding_attention differs from plain RoPE with the full layers' "
            f"rope_theta ({sliding}); elm-mlx runs OLMo 3 as published"
        )
    return out


class Olmo3Model(olmo2.Olmo2Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.window = args.sliding_window
        self.layer_types = args.layer_types

    @staticmethod
    def ropes(args: ModelArgs) -> list[nn.Module]:
        full = olmo2.default_rope(args)
        sliding = nn.RoPE(args.head_dim, base=args.rope_theta)
        return [full if t == FULL else sliding for t in args.layer_types]

    def masks(self, h: mx.array, cache: list[KVCache] | None) -> list[str | mx.array | None]:
        """Each layer's attention mask: causal for full layers, windowed for sliding ones, each
        asked of a cache of that kind of layer."""
        masks = {}
        for kind, window in ((FULL, None), (SLIDING, self.window)):
            if kind in self.layer_types:
                masks[kind] = causal_mask(h, cache, window, self.layer_types.index(kind))
        return [masks[t] for t in self.layer_types]


class Model(olmo2.Model):
    Body = Olmo3Model

    @property
    def layer_windows(self) -> list[int | None]:
        """What each layer attends to: a batch cache keeps only that (see models.base)."""
        return [self.args.sliding_window if t == SLIDING else None for t in self.args.layer_types]


FAMILY = Family(
    model_type="olmo3",
    ModelArgs=ModelArgs,
    Model=Model,
    context_key="max_position_embeddings",
    lora_targets=olmo2.FAMILY.lora_targets,
    body="model",
    embedding="embed_tokens",
    chat_template=CHATML_TEMPLATE,
    default_dtype=olmo2.FAMILY.default_dtype,
)
