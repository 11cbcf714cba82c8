"""`elm generate`."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..engine.config import GenerationConfig
from ..errors import GenerationError
from .constraint_options import Grammar, JsonObject, JsonSchema, Regex, constraint_spec
from .options import KV_FIELDS, Adapter, DraftModel, generation_options, model_name

if TYPE_CHECKING:
    from ..engine.generation import GenerationResponse
    from ..tokenizer import Tokenizer


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise GenerationError("give exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt_file is None:
        return prompt
    try:
        return prompt_file.read_text()
    except OSError as e:
        raise GenerationError(f"cannot read --prompt-file {prompt_file}: {e.strerror}") from e


def ended_at_once(last: GenerationResponse, tokenizer: Tokenizer) -> bool:
    """The first new token was end-of-sequence: the answer is empty by the model's choice."""
    return last.generation_tokens == 1 and last.token in tokenizer.eos_token_ids


def empty_answer_notice(chat: bool) -> str:
    if chat:
        return "(empty answer: the model ended its turn at once)"
    return (
        "(empty answer: the model ended at once. An Instruct model expects its chat format: "
        "try --chat)"
    )


@generation_options(
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
    "prompt_lookup", "max_ngram", "num_draft",
    *KV_FIELDS,
)  # fmt: skip
def command(
    model: Annotated[str, typer.Option("--model", "-m", help="MLX model folder or hub id.")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt text.")] = None,
    prompt_file: Annotated[
        Path | None, typer.Option(help="Read the prompt from this file ('-' reads stdin).")
    ] = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat format.")] = False,
    system: Annotated[str | None, typer.Option(help="System message (with --chat).")] = None,
    draft_model: DraftModel = None,
    adapter: Adapter = None,
    json_schema: JsonSchema = None,
    json_object: JsonObject = False,
    regex: Regex = None,
    grammar: Grammar = None,
    prompt_cache_file: Annotated[
        Path | None,
        typer.Option(
            help="Continue after the prompt of this file (elm cache-prompt) with --prompt."
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Print backend and speculation details.")
    ] = False,
    *,
    config: GenerationConfig,
) -> None:
    """Generate text from a prompt. The text goes to stdout; speeds and memory to stderr.
    --json-schema, --json, --regex or --grammar constrain the output to match (one at most)."""
    import mlx.core as mx

    from .. import _blas
    from ..engine.generation import stream_generate
    from ..loader import load
    from ..tokenizer import render_chat

    if prompt_file is not None and str(prompt_file) == "-":
        text = sys.stdin.read()
    else:
        text = read_prompt(prompt, prompt_file)
    if draft_model and config.prompt_lookup:
        raise GenerationError("give --prompt-lookup or --draft-model, not both")
    config = replace(config, constraint=constraint_spec(json_schema, json_object, regex, grammar))
    lm, tokenizer = load(model, adapter_path=adapter)
    if config.constraint is not None:
        config.constraint.check(tokenizer)  # against this tokenizer, before decoding
    if draft_model:
        config = replace(config, draft_model=load(draft_model)[0])
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}
        ]
        text = render_chat(tokenizer, messages, lm.model_type)
    prompt_cache = None
    if prompt_cache_file is not None:  # the file's tokens, then the text's, the former not fed
        from ..engine import prompt_file as files
        from ..engine.prompt_cache import PromptCache

        kv = config.kv_config()
        tokens, layers, start = files.load(prompt_cache_file, model_name(model, adapter), lm, kv)
        prompt_cache = PromptCache()
        prompt_cache.insert(tokens, layers, kv, start)
        text = tokens + tokenizer.encode(text, add_special_tokens=False)
    if verbose:
        typer.echo(f"backend: {mx.default_device()}, BLAS: {_blas.describe()}", err=True)
    last, printed = None, False
    for last in stream_generate(lm, tokenizer, text, config, prompt_cache):
        sys.stdout.write(last.text)
        sys.stdout.flush()
        printed = printed or bool(last.text)
    sys.stdout.write("\n")
    if last is not None and not printed and ended_at_once(last, tokenizer):
        typer.echo(empty_answer_notice(chat), err=True)
    if last is not None:
        typer.echo(
            f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s\n"
            f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s\n"
            f"peak memory: {last.peak_memory:.3f} GB",
            err=True,
        )
        if verbose and last.speculative is not None:
            typer.echo(last.speculative.summary(), err=True)
