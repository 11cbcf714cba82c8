"""Serve a loaded model: bind the socket (a taken port is an error before anything starts;
port 0 picks a free one), build the engine, worker and app, and run uvicorn until Ctrl-C or
SIGTERM. A stop with nothing in flight exits at once; otherwise new requests get 503 while
those in flight finish (for up to `graceful_seconds`), then it exits cleanly."""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn

from ..engine.config import GenerationConfig
from ..engine.prompt_cache import PromptCache
from ..engine.prompt_file import DiskPromptCache
from ..engine.prompt_prefill import PrefillPolicy
from ..engine.scheduler import BatchGenerator
from ..errors import ServeError
from ..models import CausalLM, context_length, vocab_size
from ..tokenizer import Tokenizer
from .app import AppSettings, create_app
from .connections import guarded_protocol
from .metrics import Metrics
from .options import ServeOptions, is_loopback
from .pool import Loaded, Pool, Slot
from .protocol import Served, longest_token_chars
from .responses import TokenText
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
    """uvicorn's server, which on Ctrl-C or SIGTERM first drains the worker: new requests get
    503 (the socket still accepts them), those in flight have `grace` seconds to finish before
    they get a 503 error too; uvicorn stops as soon as none is left, so at once when none
    runs. A second Ctrl-C or SIGTERM stops uvicorn without waiting."""

    def __init__(self, config: uvicorn.Config, pool: Pool, grace: float):
        super().__init__(config)
        self.pool, self.grace = pool, grace
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop = self.pool.loop
        if self.draining or loop is None or loop.is_closed():
            super().handle_exit(sig, frame)
            return
        self.draining = True
        # on the event loop, not in the signal handler; the worker ends uvicorn once drained
        loop.call_soon_threadsafe(self.pool.drain, self.grace, self._drained)

    def _drained(self) -> None:
        self.should_exit = True  # read by uvicorn's main loop on its next tick


def _say(text: str) -> None:
    print(text, flush=True)


Loader = Callable[[], tuple[CausalLM, Tokenizer]]


def build(
    model: CausalLM,
    tokenizer: Tokenizer,
    model_id: str,
    defaults: GenerationConfig,
    options: ServeOptions,
    metrics: Metrics,
) -> Loaded:
    """A loaded model as the server holds it: what requests are checked against, its worker."""
    limit = context_length(model)
    served = Served(
        model_id=model_id,
        tokenizer=tokenizer,
        model_type=model.model_type,
        context_length=min(options.max_context or limit, limit),
        vocab_size=vocab_size(model),
        defaults=defaults,
        template=options.template,
        max_token_chars=longest_token_chars(tokenizer),
        pooling=options.pooling,
    )
    cache = PromptCache(options.prompt_cache_bytes) if options.prompt_cache_bytes else None
    if cache is not None and options.prompt_cache_dir is not None:
        cache = DiskPromptCache(
            options.prompt_cache_dir,
            model_id,
            model,
            defaults.kv_config(),
            options.prompt_cache_bytes,
        )
        print(
            f"prompt cache: {len(cache)} entries from {options.prompt_cache_dir}", file=sys.stderr
        )
    engine = BatchGenerator(
        model,
        tokenizer,
        options.max_batch,
        prompt_cache=cache,
        kv=defaults.kv_config(),
        prefill=PrefillPolicy(options.prefill_share, bound_idle=True),
    )
    return Loaded(served, Worker(engine, options.max_queue, metrics), TokenText(tokenizer))


def serve(
    models: list[tuple[str, Loader]],
    defaults: GenerationConfig,
    options: ServeOptions,
    say: Callable[[str], None] = _say,
) -> None:
    """Serve `models` (id, loader): the first is loaded now, the others on their first
    request."""
    from transformers.utils import logging as hf_logging

    options.validate()
    # "sequence longer than the model's maximum": the server checks prompts against the context
    hf_logging.set_verbosity_error()
    metrics = Metrics()

    def slot(model_id: str, loader: Loader) -> Slot:
        return Slot(model_id, lambda: build(*loader(), model_id, defaults, options, metrics))

    slots = [slot(model_id, loader) for model_id, loader in models]
    first = slots[0].loaded = slots[0].load()
    if options.api_key is None and not is_loopback(options.host):
        print(
            f"warning: listening on {options.host} without --api-key: anyone who can reach "
            "this machine can use the model",
            file=sys.stderr,
        )
    sock = bind(options.host, options.port)
    pool = Pool(slots, options.ttl, options.max_loaded, metrics)
    others = f" (+{len(slots) - 1} loaded on demand)" if len(slots) > 1 else ""
    ready = (
        f"elm serve: {url_of(sock)} · model {first.served.model_id!r}{others} · context "
        f"{first.served.context_length} · batch {first.worker.engine.max_batch} (Ctrl-C stops)"
    )
    settings = AppSettings(
        api_key=options.api_key,
        max_body_bytes=options.max_body_bytes,
        body_timeout=options.body_timeout,
        client_rate=options.client_rate,
        on_ready=lambda: say(ready),
        loopback=is_loopback(options.host),
        allowed_hosts=options.allowed_hosts,
        allowed_origins=options.allowed_origins,
    )
    app = create_app(pool, settings)
    config = uvicorn.Config(
        app,
        http=guarded_protocol(options.header_timeout, options.max_connections),
        log_level="warning",
        access_log=False,
        timeout_keep_alive=5,  # idle connections between requests close after 5 s
        h11_max_incomplete_event_size=64 * 1024,  # the request line and headers: 64 KiB
        # a backstop: the worker fails what is left after graceful_seconds itself
        timeout_graceful_shutdown=int(options.graceful_seconds) + 5,
    )
    # uvicorn raises the signal that stopped it again once it has shut down; a handler that
    # does nothing lets the process end normally instead (exit code 0).
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
    try:
        DrainingServer(config, pool, options.graceful_seconds).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    say("elm serve: stopped")
