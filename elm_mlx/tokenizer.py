"""Tokenizers (mlx-lm's wrapper and streaming detokenizers) and prompt formatting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import TokenizerError

# OpenELM-Instruct was tuned on Zephyr-style turns whose role markers are plain text.
ZEPHYR_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Documented fallback for models without a template (OLMo, base models): plain text turns.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

Tokenizer = Any  # mlx_lm.tokenizer_utils.TokenizerWrapper


def load_tokenizer(model_dir: Path, eos_token_ids: list[int] | None = None) -> Tokenizer:
    from mlx_lm.tokenizer_utils import load as load_wrapper

    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise TokenizerError(
            f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model); "
            "re-run `elm convert` with --tokenizer PATH_OR_REPO"
        )
    try:
        return load_wrapper(model_dir, eos_token_ids=eos_token_ids)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot load the tokenizer in {model_dir}: {e}") from e


def default_chat_template(tokenizer: Tokenizer, model_type: str) -> str | None:
    """The template a model gets when its tokenizer has none."""
    if getattr(tokenizer, "chat_template", None):
        return None
    return ZEPHYR_TEMPLATE if model_type == "openelm" else PLAIN_TEMPLATE


def render_chat(
    tokenizer: Tokenizer,
    messages: list[dict[str, str]],
    model_type: str,
    template: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Messages -> prompt text, with the given template, the tokenizer's, or our fallback."""
    template = template or default_chat_template(tokenizer, model_type)
    return tokenizer._tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids for a prompt: BOS when the tokenizer adds one and the text lacks it."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer.encode(text, add_special_tokens=add_special))
