"""Tiny chat models for tests/test_chat.py: one per prompt format a chat can get.

- "chatml": Llama with a byte-level BPE tokenizer whose tokenizer_config.json ships a ChatML
  template and `<|im_end|>` as EOS (SmolLM2's layout);
- "zephyr": OpenELM with a SentencePiece tokenizer and no template (gets the Zephyr format);
- "plain": OLMo with a byte-level BPE tokenizer and no template (gets the plain fallback).

Weights are random (seeded) and written straight from the MLX modules, whose parameter names
are the Hugging Face ones, so each folder is both an MLX folder and an HF-style checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from helpers import train_spm_tokenizer
from mlx.utils import tree_flatten

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)
from elm_mlx.loader import build_model

CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "hello there, how are you today?",
    "I am fine, thank you. What can I do for you?",
    "tell me about the weather in paris and rome",
    "the quick brown fox jumps over the lazy dog",
    "my name is alice and I like green apples",
    "remember the word banana, please",
    "which word did I ask you to remember?",
    "you are a helpful assistant who answers briefly",
    "User: Assistant: <|user|> <|assistant|> <|system|>",
]
KINDS = ("chatml", "zephyr", "plain")
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_bpe(folder: Path, chat_template: str | None) -> tuple[int, int]:
    """A byte-level BPE tokenizer.json; returns (EOS id, vocab size). EOS is `<|im_end|>` with
    a template, `<|endoftext|>` without."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=BPE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.save(str(folder / "tokenizer.json"))
    eos = "<|im_end|>" if chat_template else "<|endoftext|>"
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": eos,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.token_to_id(eos), tok.get_vocab_size()


def train_spm(folder: Path) -> tuple[int, int]:
    """A Llama-style SentencePiece tokenizer (BOS 1 prepended, EOS 2); returns (EOS, vocab)."""
    train_spm_tokenizer(folder, 300, "\n".join(CORPUS * 10))
    return 2, 300


def model_config(kind: str, vocab: int, eos: int) -> dict[str, Any]:
    common = {"vocab_size": vocab, "eos_token_id": eos}
    if kind == "zephyr":
        return {
            "model_type": "openelm",
            "model_dim": 64,
            "head_dim": 16,
            "num_transformer_layers": 2,
            "num_gqa_groups": 2,
            "ffn_dim_divisor": 32,
            "max_context_length": 512,
            "bos_token_id": 1,
            **common,
        }
    return {
        "model_type": "llama" if kind == "chatml" else "olmo",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        **common,
    }


def write_tiny_chat_model(folder: Path, kind: str, seed: int = 0) -> Path:
    """A random model folder of `kind` (see the module docstring), float32."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "zephyr":
        eos, vocab = train_spm(folder)
    else:
        eos, vocab = train_bpe(folder, CHATML_TEMPLATE if kind == "chatml" else None)
    config = model_config(kind, vocab, eos)
    mx.random.seed(seed)
    model = build_model(config)
    # a wider spread than the default init, so that greedy choices are not near-ties
    params = {k: v * 3 if v.ndim == 2 else v for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), params, metadata={"format": "mlx"})
    config = {**config, **model.args.to_dict(), "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
