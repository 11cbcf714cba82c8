"""What every model family shares: the model contract, the family contract, the KV cache and
attention helpers."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn

# Tokens per forward pass when a long input is fed in chunks (prefill, perplexity windows): the
# one default of every such loop.
PREFILL_STEP_SIZE = 512


@dataclass
class BaseModelArgs:
    """Dataclass fields are named after config.json keys; unknown keys are dropped."""

    @classmethod
    def from_dict(cls, config: dict[str, Any]):
        params = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in config.items() if k in params})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class KVCache:
    """Per-layer key/value cache, grown in steps and trimmable (chat and speculation rewind it)."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None  # (B, n_kv_heads, capacity, head_dim)
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev = self.offset
        length = keys.shape[2]
        if self.keys is None or prev + length > self.keys.shape[2]:
            batch, heads, _, k_dim = keys.shape
            n_steps = (self.step + length - 1) // self.step
            grow = (batch, heads, n_steps * self.step)
            new_k = mx.zeros((*grow, k_dim), keys.dtype)
            new_v = mx.zeros((*grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.offset += length
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def trim(self, n: int) -> int:
        """Forget the last n positions; return how many were forgotten."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def is_trimmable(self) -> bool:
        return True

    def make_mask(self, length: int, window: int | None = None) -> str | mx.array | None:
        """The attention mask for `length` new queries: every row of the batch holds the same
        positions, so the kernel's bottom-right aligned causal mask fits (None for one query).
        With a `window`, a query sees only the last `window` positions up to its own."""
        return window_mask(length, window, self.offset)

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, value: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = value
        self.offset = self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x as one kernel (a decode step is thousands of small ops; as mlx-lm's)."""
    return nn.silu(gate) * x


def make_cache(model: CausalLM) -> list[KVCache]:
    return [KVCache() for _ in model.layers]


class Block(Protocol):
    """One transformer block of a family's `Model.layers`. Quantization calibrates blocks one
    at a time on their own, as `block(h, "causal", None)`: no cache, the plain causal mask."""

    def __call__(self, x: mx.array, mask: str | mx.array | None, cache: KVCache | None) -> mx.array:
        """x (B, L, D), the attention mask, this layer's cache -> (B, L, D)."""
        ...


def layer_windows(model: CausalLM) -> list[int | None]:
    """The window each layer attends to (None: all positions), as the model declares it
    (`layer_windows`, OLMo 3's sliding layers); a cache need keep no more."""
    return getattr(model, "layer_windows", None) or [None] * len(model.layers)


class CausalLM(Protocol):
    """The contract every family's `Model` fulfils (and that mlx-lm's models fulfil too)."""

    model_type: str
    layers: list[Block]

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """inputs (B, L) token ids -> logits (B, L, vocab)."""
        ...

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map a checkpoint's tensors onto this module's parameter names."""
        ...


def window_mask(
    length: int, window: int | None, start: int, offsets: mx.array | None = None
) -> str | mx.array | None:
    """The mask of `length` new queries after `start` cached positions (the longest row's;
    `offsets` (B,): each row's own, when rows differ), keys at positions 0 .. start + length - 1:
    query j of row b, at position p = offsets[b] + j, sees keys k with p - window < k <= p.
    Rows alike whose window no query reaches past get the kernel's own causal mask ("causal",
    aligned to the bottom right; None for one query); else (B, 1, L, S) booleans."""
    end = start + length
    if offsets is None and (window is None or end <= window):
        return "causal" if length > 1 else None
    if offsets is None:
        offsets = mx.array([start])
    queries = (offsets[:, None] + mx.arange(length))[:, :, None]  # (B, L, 1)
    keys = mx.arange(end)[None, None, :]  # (1, 1, S)
    mask = keys <= queries
    if window is not None:
        mask &= keys > queries - window
    return mask[:, None]  # (B, 1, L, S)


def causal_mask(
    h: mx.array, cache: list[KVCache] | None, window: int | None = None, layer: int = 0
) -> str | mx.array | None:
    """The mask of a forward pass over h (B, L, D) for the layers that see the last `window`
    positions (None: all), asked of layer `layer`'s cache, since only it knows where each row's
    positions are (a batch cache of rows of different lengths gives an array); without one,
    the causal mask ("causal": mx.fast.scaled_dot_product_attention aligns it to the bottom
    right, which is also what a cached prefix needs)."""
    if cache:
        return cache[layer].make_mask(h.shape[1], window)
    return window_mask(h.shape[1], window, 0)


def attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    mask: str | mx.array | None,
    cache: Any = None,
) -> mx.array:
    """(B, Hq, L, D) x (B, Hkv, S, D) -> (B, L, Hq*D); GQA is handled by the kernel. A cache
    that stores keys and values its own way (quantized) attends itself (`cache.attend`)."""
    if (attend := getattr(cache, "attend", None)) is not None:
        out = attend(queries, keys, values, scale, mask)
    else:
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    batch, _, length, _ = queries.shape
    return out.transpose(0, 2, 1, 3).reshape(batch, length, -1)


@dataclass(frozen=True)
class TokenizerSource:
    """Where a family's tokenizer comes from when its checkpoints ship none: a file found in
    any of `repos` (tried in order) whose sha256 is `sha256`."""

    filename: str
    sha256: str
    repos: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """Everything the rest of elm needs to know about a model family, declared once in the
    family's module as `FAMILY` (adding a family means adding one module)."""

    model_type: str  # config.json's model_type
    ModelArgs: type[BaseModelArgs]  # the names mlx-lm gives them
    Model: type[nn.Module]
    context_key: str  # the ModelArgs field holding the context length it was trained for
    lora_targets: tuple[str, ...]  # its linear layers, as paths inside one block
    body: str  # Model attribute: embedding -> blocks -> final norm, (B, L) -> (B, L, D)
    embedding: str  # body attribute: the token embedding (the output layer too when tied)
    chat_template: str | None = None  # Jinja, for tokenizers without one (None: plain turns)
    tokenizer: TokenizerSource | None = None  # for checkpoints that ship no tokenizer
    default_dtype: Callable[[Any], str] = lambda args: "float16"  # ModelArgs -> dtype name

    def args(self, config: dict[str, Any]) -> BaseModelArgs:
        return self.ModelArgs.from_dict(config)

    def context_length(self, args: Any) -> int:
        return int(getattr(args, self.context_key))

    def body_and_embedding(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        body = getattr(model, self.body)
        return body, getattr(body, self.embedding)
