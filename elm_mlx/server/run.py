"""Serve a loaded model: bind the socket (a taken port is an error before anything starts;
port 0 picks a free one), build the engine, worker and app, and run uvicorn until Ctrl-C or
SIGTERM, which finish the requests in flight (for up to `graceful_seconds`) and exit cleanly."""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn

from ..engine.config import GenerationConfig
from ..engine.prompt_cache import PromptCache
from ..engine.scheduler import BatchGenerator
from ..errors import ServeError
from ..models import CausalLM, context_length, vocab_size
from ..tokenizer import Tokenizer
from .app import AppSettings, create_app
from .options import ServeOptions, is_loopback
from .protocol import Served
from .worker import Worker


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on Ctrl-C or SIGTERM also drains the worker: new requests get
    503, those in flight have `grace` seconds to finish before they get a 503 error too."""

    def __init__(self, config: uvicorn.Config, worker: Worker, grace: float):
        super().__init__(config)
        self.worker, self.grace = worker, grace

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self.worker.loop is not None:  # on the event loop: not in a signal handler
            self.worker.loop.call_soon_threadsafe(self.worker.drain, self.grace)


def _say(text: str) -> None:
    print(text, flush=True)


def serve(
    model: CausalLM,
    tokenizer: Tokenizer,
    model_id: str,
    defaults: GenerationConfig,
    options: ServeOptions,
    say: Callable[[str], None] = _say,
) -> None:
    from transformers.utils import logging as hf_logging

    options.validate()
    # "sequence longer than the model's maximum": the server checks prompts against the context
    hf_logging.set_verbosity_error()
    limit = context_length(model)
    served = Served(
        model_id=model_id,
        tokenizer=tokenizer,
        model_type=model.model_type,
        context_length=min(options.max_context or limit, limit),
        vocab_size=vocab_size(model),
        defaults=defaults,
        template=options.template,
    )
    if options.api_key is None and not is_loopback(options.host):
        print(
            f"warning: listening on {options.host} without --api-key: anyone who can reach "
            "this machine can use the model",
            file=sys.stderr,
        )
    sock = bind(options.host, options.port)
    engine = BatchGenerator(model, tokenizer, options.max_batch, prompt_cache=PromptCache())
    worker = Worker(engine, options.max_queue)
    ready = (
        f"elm serve: {url_of(sock)} · model {model_id!r} · context {served.context_length} · "
        f"batch {engine.max_batch} (Ctrl-C stops)"
    )
    settings = AppSettings(
        api_key=options.api_key,
        max_body_bytes=options.max_body_bytes,
        on_ready=lambda: say(ready),
    )
    app = create_app(served, worker, settings)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        # a backstop: the worker fails what is left after graceful_seconds itself
        timeout_graceful_shutdown=int(options.graceful_seconds) + 5,
    )
    # uvicorn raises the signal that stopped it again once it has shut down; a handler that
    # does nothing lets the process end normally instead (exit code 0).
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
    try:
        DrainingServer(config, worker, options.graceful_seconds).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    say("elm serve: stopped")
