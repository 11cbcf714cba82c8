"""`elm cache-prompt`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .generate import read_prompt
from .options import GENERATION, Adapter, KvBits, KvFullTokens, KvGroupSize, MaxKvSize, model_name


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
    max_kv_size: MaxKvSize = GENERATION.max_kv_size,
    adapter: Adapter = None,
) -> None:
    """Process a prompt once and write its keys and values to a file (safetensors, with the
    model, its config hash, the KV settings and the tokens), for generation to continue after
    it without processing it again."""
    import time
    from dataclasses import replace

    from ..engine import prompt_file as files
    from ..loader import load
    from ..tokenizer import encode_prompt

    text = read_prompt(prompt, prompt_file)
    config = replace(
        GENERATION, kv_bits=kv_bits, kv_group_size=kv_group_size,
        kv_full_tokens=kv_full_tokens, max_kv_size=max_kv_size,
    )  # fmt: skip
    config.validate()  # before anything is loaded
    lm, tokenizer = load(model, adapter_path=adapter)
    tokens = encode_prompt(tokenizer, text)
    tic = time.perf_counter()
    layers = files.prefill(lm, tokens, config.kv_config(), config.prefill_step_size)
    files.save(output, tokens, layers, model_name(model, adapter), lm, config.kv_config())
    seconds = time.perf_counter() - tic
    typer.echo(f"{output}: {len(tokens)} tokens in {seconds:.1f} s", err=True)
