"""The ASGI application (Starlette): OpenAI's /v1/models, /v1/chat/completions and
/v1/completions, and /health. A request's body is read (bounded in size and time), checked and
tokenized off the event loop (protocol.py, in a thread: a long prompt stalls nobody), answered
by the worker, and streamed as server-sent events (`data: {...}` chunks, then `data: [DONE]`).
In front of every route: the per-client rate limit (client_rate.py) and the guards (guards.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..engine import scheduler as batch
from ..engine.embeddings import embed
from . import anthropic
from .client_rate import ClientRate, RateLimit
from .embeddings_api import embedding_job, embedding_response
from .guards import guards
from .metrics import CountRequests
from .options import ServeOptions
from .pool import Loaded, Pool
from .protocol import APIError, Job, Served, chat_job, completion_job, parse_json
from .responses import Kind, Shape
from .responses_api import ResponseShape, ResponsesJob, ResponseStore, responses_job
from .tool_calls import ToolShape
from .worker import Failure, Ticket, Worker

Handler = Callable[[Request], Awaitable[Response]]
EventShape = anthropic.MessageShape | ResponseShape
AnyShape = Shape | EventShape


@dataclass(frozen=True)
class AppSettings:
    api_key: str | None = None  # then every /v1 request needs `Authorization: Bearer KEY`
    max_body_bytes: int = ServeOptions.max_body_bytes
    body_timeout: float = ServeOptions.body_timeout  # seconds a request body may take to arrive
    client_rate: float = ServeOptions.client_rate  # requests a second per client (0: no limit)
    on_ready: Callable[[], None] | None = None  # called once the worker runs
    loopback: bool = True  # bound to a loopback address: Host headers are checked
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    prepare_threads: int = 2  # threads that check and tokenize requests


def error_response(e: APIError, path: str = "") -> JSONResponse:
    """The error in the shape of the API that `path` belongs to (OpenAI's or Anthropic's)."""
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    if e.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    body = anthropic.error_body(e) if path.startswith(anthropic.PATH) else e.body()
    return JSONResponse(body, status_code=e.status, headers=headers)


def sse(data: dict[str, Any] | str) -> str:
    text = (
        data
        if isinstance(data, str)
        else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {text}\n\n"


class EventStream(StreamingResponse):
    """A server-sent event stream that runs `on_close` however it ends: finished, client gone
    (Starlette cancels the body on http.disconnect), or never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def read_limited(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refused when over `limit` bytes (413) or slower than `timeout` seconds (408)."""
    too_large = APIError(
        413, f"the request body is over {limit} bytes", code="request_too_large"
    )  # fmt: skip
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError as e:  # not yet the builtin TimeoutError on Python 3.10
        message = f"the request body did not arrive within {timeout:g} s"
        raise APIError(408, message, code="request_timeout") from e


def _key_of(request: Request) -> str | None:
    """The API key sent as `Authorization: Bearer KEY` or (Anthropic's way) `x-api-key: KEY`."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return key.strip()
    return request.headers.get("x-api-key")


def authorized(handler: Handler, api_key: str | None) -> Handler:
    """Key check (when there is a key), then the handler; an APIError becomes its JSON."""

    async def wrapped(request: Request) -> Response:
        try:
            if api_key is not None:
                key = _key_of(request)
                if key is None or not hmac.compare_digest(key.encode(), api_key.encode()):
                    raise APIError(
                        401,
                        "a valid API key is required: Authorization: Bearer KEY "
                        "(or x-api-key: KEY)",
                        code="invalid_api_key",
                    )
            return await handler(request)
        except APIError as e:
            return error_response(e, request.url.path)

    return wrapped


async def stream_events(ticket: Ticket, shape: Shape) -> AsyncIterator[str]:
    """A request's events as server-sent event chunks, ending with [DONE]."""
    if (first := shape.first_chunk()) is not None:
        yield sse(first)
    while True:
        item = await ticket.events.get()
        if isinstance(item, Failure):
            yield sse(item.error.body())
            break
        for chunk in shape.chunks(item):
            yield sse(chunk)
        if item.finish_reason is not None:
            break
    yield sse("[DONE]")


async def stream_named_events(ticket: Ticket, shape: EventShape) -> AsyncIterator[str]:
    """A request's events as a stream of named events (Anthropic's, OpenAI Responses'): the
    shape's opening events, then each event's, or the shape's failure event."""
    for chunk in shape.opening():
        yield chunk
    while True:
        item = await ticket.events.get()
        if isinstance(item, Failure):
            yield shape.failure(item.error)
            return
        for chunk in shape.chunks(item):
            yield chunk
        if item.finish_reason is not None:
            return


async def whole_answer(
    request: Request, worker: Worker, ticket: Ticket, shape: AnyShape
) -> Response:
    """Wait for the whole answer; a client that leaves meanwhile cancels it."""

    async def until_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(until_disconnect())
    events: list[batch.Event] = []
    try:
        while True:
            getter = asyncio.ensure_future(ticket.events.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return Response(status_code=499)  # nobody reads it
            item = getter.result()
            if isinstance(item, Failure):
                raise item.error
            events.append(item)
            if item.finish_reason is not None:
                return JSONResponse(shape.whole(events))
    finally:
        watcher.cancel()
        worker.cancel(ticket)


def _model_of(data: dict[str, Any]) -> str | None:
    """The model a body names, if it names one (the job checks the rest)."""
    model = data.get("model")
    return model if isinstance(model, str) else None


class Routes:
    """The handlers of the routes, over the pool of served models."""

    def __init__(self, pool: Pool, settings: AppSettings):
        self.pool, self.settings = pool, settings
        # checking, templating and tokenizing happen here, off the event loop
        self.prepare = ThreadPoolExecutor(settings.prepare_threads, "elm-serve-prepare")
        self.preparing = 0  # requests being checked and tokenized now
        self.metrics = pool.metrics
        self.stored = ResponseStore()  # past responses, for previous_response_id
        self.metrics.watch(pool.stats, lambda: len(pool.loaded()))

    def routes(self) -> list[Route]:
        api = self.settings.api_key
        return [
            Route("/health", self.health),
            Route("/metrics", authorized(self.metrics.endpoint, api)),
            Route("/v1/models", authorized(self.list_models, api)),
            Route("/v1/models/{model:path}", authorized(self.get_model, api)),
            Route("/v1/chat/completions", authorized(self.chat, api), methods=["POST"]),
            Route("/v1/completions", authorized(self.completions, api), methods=["POST"]),
            Route("/v1/embeddings", authorized(self.embeddings, api), methods=["POST"]),
            Route("/v1/responses", authorized(self.responses, api), methods=["POST"]),
            Route("/v1/messages", authorized(self.messages, api), methods=["POST"]),
            Route(
                "/v1/messages/count_tokens", authorized(self.count_tokens, api), methods=["POST"]
            ),
        ]

    async def health(self, request: Request) -> Response:
        closed = self.pool.closed
        stats = {**self.pool.stats(), "preparing": self.preparing}
        loaded = [s.model_id for s in self.pool.loaded()]
        body = {"status": "draining" if closed else "ok", "model": self.pool.slots[0].model_id,
                "loaded": loaded, **stats}  # fmt: skip
        return JSONResponse(body, status_code=503 if closed else 200)

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": self.pool.cards()})

    async def get_model(self, request: Request) -> Response:
        slot = self.pool.find(request.path_params["model"])
        return JSONResponse(next(c for c in self.pool.cards() if c["id"] == slot.model_id))

    async def chat(self, request: Request) -> Response:
        return await self.answer(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self.answer(request, "completion")

    async def prepared(
        self, request: Request, make_job: Callable[[dict[str, Any], Served], Any]
    ) -> tuple[Loaded, Any]:
        """The model the request names (loaded), and the request's body read, parsed,
        checked and tokenized (off the event loop) by `make_job`."""
        raw = await read_limited(request, self.settings.max_body_bytes, self.settings.body_timeout)
        if self.pool.closed:  # not worth tokenizing
            raise APIError(503, "the server is shutting down", kind="server_error")
        loop = asyncio.get_running_loop()
        self.preparing += 1
        try:
            data = await loop.run_in_executor(self.prepare, parse_json, raw)
            model = await self.pool.acquire(_model_of(data))
            return model, await loop.run_in_executor(self.prepare, make_job, data, model.served)
        finally:
            self.preparing -= 1

    async def embeddings(self, request: Request) -> Response:
        model, job = await self.prepared(request, embedding_job)
        lm, pooling = model.worker.engine.model, model.served.pooling

        def run() -> Any:
            return np.array(embed(lm, job.texts, pooling))  # (N, D) float32

        vectors = await model.worker.call(run)
        return JSONResponse(embedding_response(job, vectors, model.served.model_id))

    async def messages(self, request: Request) -> Response:
        model, job = await self.prepared(request, anthropic.messages_job)
        shape = anthropic.MessageShape(model.served.model_id, job, model.served.tokenizer)
        return await self.run(request, model, job, shape)

    async def responses(self, request: Request) -> Response:
        def make_job(data: dict[str, Any], served: Served) -> ResponsesJob:
            return responses_job(data, served, self.stored)

        model, prepared = await self.prepared(request, make_job)
        shape = ResponseShape(model.served.model_id, prepared, self.stored)
        return await self.run(request, model, prepared.job, shape)

    async def count_tokens(self, request: Request) -> Response:
        return JSONResponse((await self.prepared(request, anthropic.count_tokens))[1])

    async def answer(self, request: Request, kind: Kind) -> Response:
        model, job = await self.prepared(request, chat_job if kind == "chat" else completion_job)
        shape = Shape(kind, model.served.model_id, model.token_text, job.include_usage)
        if job.tools is not None:
            shape = ToolShape(shape, job.tools)
        return await self.run(request, model, job, shape)

    async def run(self, request: Request, model: Loaded, job: Job, shape: AnyShape) -> Response:
        """Generate a job's answer, streamed in the shape's way or whole."""
        worker, model_id = model.worker, model.served.model_id
        ticket = worker.submit(batch.Request(job.prompt, job.config, job.logprobs))

        def done() -> None:
            worker.cancel(ticket)
            self.pool.touch(model_id)  # its idle time starts when its last answer ends

        if job.stream:
            if isinstance(shape, Shape):
                stream = stream_events(ticket, shape)
            else:
                stream = stream_named_events(ticket, shape)
            return EventStream(stream, on_close=done)
        try:
            return await whole_answer(request, worker, ticket, shape)
        finally:
            self.pool.touch(model_id)


async def http_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    message = f"{request.method} {request.url.path}: {e.detail}"
    return error_response(APIError(e.status_code, message, code=code), request.url.path)


async def server_error(request: Request, e: Exception) -> Response:
    message = f"internal error: {type(e).__name__}: {e}"
    return error_response(APIError(500, message, kind="server_error"), request.url.path)


def lifespan(routes: Routes, on_ready: Callable[[], None] | None):
    """Start the workers with the server; stop them and the tokenizing threads after."""

    @contextlib.asynccontextmanager
    async def span(app: Starlette) -> AsyncIterator[None]:
        routes.pool.start(asyncio.get_running_loop())
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            routes.prepare.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(routes.pool.stop)

    return span


def create_app(pool: Pool, settings: AppSettings | None = None) -> Starlette:
    settings = settings or AppSettings()
    routes = Routes(pool, settings)
    table = routes.routes()
    counted = Middleware(CountRequests, metrics=routes.metrics, routes=table)
    rate = settings.client_rate
    # a burst of two seconds' worth, and at least one request
    limited = [Middleware(RateLimit, limit=ClientRate(rate, max(2 * rate, 1)))] if rate else []
    return Starlette(
        routes=table,
        middleware=[
            counted,
            *limited,  # before the guards: a flood is refused at the least cost
            *guards(settings.loopback, settings.allowed_hosts, settings.allowed_origins),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan(routes, settings.on_ready),
    )
