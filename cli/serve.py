"""`elm serve`: an OpenAI-compatible HTTP server for one model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from ..convert.hub_cache import DEFAULT_BITS, ensure_model
from ..engine.config import GenerationConfig
from ..errors import GenerationError, ServeError
from ..server.options import ServeOptions
from .options import (
    KV_FIELDS,
    Adapter,
    ChatTemplate,
    DraftModel,
    HfToken,
    HubBits,
    HubQuantize,
    generation_options,
)

SERVE = ServeOptions()  # the defaults the options show


def served_id(model: str) -> str:
    """The model's name in the API: a folder's name, or the hub id as given."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


@generation_options(
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "prompt_lookup", "max_ngram", "num_draft",
    *KV_FIELDS,
)  # fmt: skip
def command(
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="MLX model folder, HF checkpoint or hub id (repeat to serve several; the "
            "first loads at once, the others on their first request).",
        ),
    ] = None,
    models_dir: Annotated[
        Path | None, typer.Option(help="Serve every model folder inside this folder too.")
    ] = None,
    ttl: Annotated[
        float, typer.Option(help="Unload a model idle this many seconds (0: keep it loaded).")
    ] = SERVE.ttl,
    max_loaded: Annotated[
        int | None,
        typer.Option(help="Models loaded at once at most (then the least recently used goes)."),
    ] = SERVE.max_loaded,
    adapter: Adapter = None,
    draft_model: DraftModel = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = SERVE.host,
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one).")] = SERVE.port,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="ELM_API_KEY", help="Require `Authorization: Bearer KEY`."),
    ] = SERVE.api_key,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together.")] = SERVE.max_batch,
    max_queue: Annotated[
        int,
        typer.Option(help="Requests waiting beyond the --max-batch running; more get 429."),
    ] = SERVE.max_queue,
    prompt_cache_bytes: Annotated[
        int, typer.Option(help="Bytes of past requests' KV cache kept for reuse (0: none).")
    ] = SERVE.prompt_cache_bytes,
    graceful_seconds: Annotated[
        float, typer.Option(help="On Ctrl-C/SIGTERM, how long requests in flight may finish.")
    ] = SERVE.graceful_seconds,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds a connection may take to send a request's headers.")
    ] = SERVE.header_timeout,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds a request's body may take to arrive.")
    ] = SERVE.body_timeout,
    max_connections: Annotated[
        int, typer.Option(help="Open connections at most (then idle or slow ones are closed).")
    ] = SERVE.max_connections,
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest request body in bytes (more: 413, before it is read).")
    ] = SERVE.max_body_bytes,
    client_rate: Annotated[
        float,
        typer.Option(
            help="Requests a second one client (address) may send to /v1, twice that at once; "
            "each 16 KiB of body counts as one more. Past it requests wait (1 s at most), then "
            "get 429 (0: no limit)."
        ),
    ] = SERVE.client_rate,
    prefill_share: Annotated[
        float,
        typer.Option(
            help="While requests decode, the share of their time that prefilling new prompts may "
            "take (0.5: they slow by at most 1.5x, however long a newcomer's prompt; higher: "
            "faster first tokens for long prompts). While nothing decodes, a prefill pass "
            "takes about as long as the decode steps between two (2 / share); each at most "
            "512 tokens of a prompt."
        ),
    ] = SERVE.prefill_share,
    allowed_hosts: Annotated[
        list[str] | None,
        typer.Option(help="Host names accepted on a loopback bind besides localhost (repeat)."),
    ] = None,
    allowed_origins: Annotated[
        list[str] | None,
        typer.Option(help="Browser origins allowed by CORS, e.g. http://localhost:3000 (repeat)."),
    ] = None,
    pooling: Annotated[
        str, typer.Option(help="/v1/embeddings: pool the final hidden states by mean or last.")
    ] = SERVE.pooling,
    max_context: Annotated[
        int | None, typer.Option(help="Context length in tokens (default: the model's).")
    ] = SERVE.max_context,
    chat_template: ChatTemplate = None,
    prompt_cache_dir: Annotated[
        Path | None, typer.Option(help="Keep the prompt cache in this folder, across restarts.")
    ] = SERVE.prompt_cache_dir,
    bits: HubBits = DEFAULT_BITS,
    quantize: HubQuantize = True,
    hf_token: HfToken = None,
    *,
    config: GenerationConfig,
) -> None:
    """Serve a model over the OpenAI HTTP API (/v1/chat/completions, /v1/completions,
    /v1/responses, /v1/embeddings, /v1/models) and Anthropic's (/v1/messages) until Ctrl-C;
    Prometheus metrics at /metrics. The sampling options are the defaults of requests that do
    not set them; a request's `prompt_lookup` field overrides --prompt-lookup and --draft-model."""
    from ..engine.chat_session import load_template
    from ..loader import load
    from ..server.run import serve

    if draft_model and config.prompt_lookup:
        raise GenerationError("give --prompt-lookup or --draft-model, not both")
    options = ServeOptions(
        host=host,
        port=port,
        api_key=api_key or None,
        max_batch=max_batch,
        max_queue=max_queue,
        max_context=max_context,
        template=load_template(chat_template) if chat_template else None,
        prompt_cache_bytes=prompt_cache_bytes,
        prompt_cache_dir=prompt_cache_dir,
        graceful_seconds=graceful_seconds,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_connections=max_connections,
        max_body_bytes=max_body_bytes,
        client_rate=client_rate,
        prefill_share=prefill_share,
        allowed_hosts=tuple(allowed_hosts or ()),
        allowed_origins=tuple(allowed_origins or ()),
        pooling=pooling,
        ttl=ttl,
        max_loaded=max_loaded,
    )
    options.validate()
    # by id, first named first (a model both given and in --models-dir is served once)
    ids = {served_id(n): n for n in reversed([*(model or ()), *_folders_in(models_dir)])}
    names = list(reversed(ids.values()))
    if not names:
        raise ServeError("give --model (repeatable) or --models-dir")
    if len(names) > 1 and (adapter or draft_model):
        raise ServeError("--adapter and --draft-model need a single --model")

    def loader(name: str):
        def load_it():
            path = ensure_model(name, quantize=quantize, bits=bits, token=hf_token)
            return load(path, adapter_path=adapter)

        return load_it

    try:
        if draft_model:
            draft_path = ensure_model(draft_model, quantize=quantize, bits=bits, token=hf_token)
            config = replace(config, draft_model=load(draft_path)[0])
        # config: the requests' defaults
        serve([(served_id(n), loader(n)) for n in names], config, options)
    except KeyboardInterrupt:  # while converting or loading
        raise typer.Exit(130) from None


def _folders_in(folder: Path | None) -> list[str]:
    """The model folders (holding a config.json) inside `folder`, by name."""
    if folder is None:
        return []
    if not folder.is_dir():
        raise ServeError(f"--models-dir {folder}: not a folder")
    found = sorted(str(p) for p in folder.iterdir() if (p / "config.json").is_file())
    if not found:
        raise ServeError(f"--models-dir {folder}: no model folder (with a config.json) inside")
    return found
