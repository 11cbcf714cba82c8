"""`elm cache-prompt`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .generate import read_prompt
from .options import (
    GENERATION,
    Adapter,
    ChatTemplate,
    KvBits,
    KvFullTokens,
    KvGroupSize,
    KvRecentTokens,
    MaxKvSize,
    model_name,
)


def command(
    model: Annotated[str, typer.Option("--model", "-m", help="MLX model folder or hub id.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The prompt cache file.")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt text.")] = None,
    prompt_file: Annotated[
        Path | None, typer.Option(help="Read the prompt from this file.")
    ] = None,
    kv_bits: KvBits = GENERATION.kv_bits,
    kv_group_size: KvGroupSize = GENERATION.kv_group_size,
    kv_full_tokens: KvFullTokens = GENERATION.kv_full_tokens,
    kv_recent_tokens: KvRecentTokens = GENERATION.kv_recent_tokens,
    max_kv_size: MaxKvSize = GENERATION.max_kv_size,
    adapter: Adapter = None,
    chat: Annotated[
        bool,
        typer.Option(
            help="The prompt is a system prompt: cache it in the chat format, for "
            "elm chat --system with the same text."
        ),
    ] = False,
    chat_template: ChatTemplate = None,
) -> None:
    """Process a prompt once and write its keys and values to a file (safetensors, with the
    model, its config hash, the KV settings and the tokens), for generation (elm generate, or
    elm chat with --chat) to continue after it without processing it again."""
    import time
    from dataclasses import replace

    from ..engine import prompt_file as files
    from ..engine.chat_session import load_template
    from ..loader import load
    from ..tokenizer import encode_prompt, render_chat

    text = read_prompt(prompt, prompt_file)
    config = replace(
        GENERATION, kv_bits=kv_bits, kv_group_size=kv_group_size,
        kv_full_tokens=kv_full_tokens, kv_recent_tokens=kv_recent_tokens,
        max_kv_size=max_kv_size,
    )  # fmt: skip
    config.validate()  # before anything is loaded
    template = load_template(chat_template) if chat_template else None
    lm, tokenizer = load(model, adapter_path=adapter)
    if chat:  # the system turn alone: how every conversation with this system prompt starts
        system = [{"role": "system", "content": text}]
        text = render_chat(tokenizer, system, lm.model_type, template, add_generation_prompt=False)
    tokens = encode_prompt(tokenizer, text)
    tic = time.perf_counter()
    kv = config.kv_config()
    layers, start = files.prefill(lm, tokens, kv, config.prefill_step_size)
    files.save(output, tokens, layers, model_name(model, adapter), lm, kv, start)
    seconds = time.perf_counter() - tic
    typer.echo(f"{output}: {len(tokens)} tokens in {seconds:.1f} s", err=True)
