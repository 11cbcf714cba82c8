"""The ASGI application (Starlette): OpenAI's /v1/models, /v1/chat/completions and
/v1/completions, and /health. Requests are checked here (protocol.py), answered by the worker,
and streamed as server-sent events (`data: {...}` chunks, then `data: [DONE]`)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..engine import scheduler as batch
from .protocol import DEFAULT_MODEL, APIError, Job, Served, chat_job, completion_job
from .responses import Kind, Shape, TokenText
from .worker import Failure, Ticket, Worker

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class AppSettings:
    api_key: str | None = None  # then every /v1 request needs `Authorization: Bearer KEY`
    max_body_bytes: int = 4 * 2**20
    on_ready: Callable[[], None] | None = None  # called once the worker runs


def error_response(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    if e.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


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


async def read_limited(request: Request, limit: int) -> bytes:
    too_large = APIError(
        413, f"the request body is over {limit} bytes", code="request_too_large"
    )  # fmt: skip
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(served: Served, worker: Worker, settings: AppSettings | None = None) -> Starlette:
    settings = settings or AppSettings()
    token_text = TokenText(served.tokenizer)
    card = {"id": served.model_id, "object": "model", "created": 0, "owned_by": "elm-mlx"}

    def api(handler: Handler) -> Handler:
        """Bearer auth, then the handler; an APIError becomes its JSON error."""

        async def wrapped(request: Request) -> Response:
            try:
                if settings.api_key is not None:
                    scheme, _, key = request.headers.get("authorization", "").partition(" ")
                    if scheme.lower() != "bearer" or not hmac.compare_digest(
                        key.strip().encode(), settings.api_key.encode()
                    ):
                        raise APIError(
                            401,
                            "a valid API key is required: Authorization: Bearer KEY",
                            code="invalid_api_key",
                        )
                return await handler(request)
            except APIError as e:
                return error_response(e)

        return wrapped

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": served.model_id, **worker.stats()})

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [card]})

    async def get_model(request: Request) -> Response:
        if request.path_params["model"] not in (served.model_id, DEFAULT_MODEL):
            raise APIError(404, f"the model {request.path_params['model']!r} does not exist",
                           "model", "model_not_found")  # fmt: skip
        return JSONResponse(card)

    async def answer(request: Request, kind: Kind) -> Response:
        raw = await read_limited(request, settings.max_body_bytes)
        job: Job = (chat_job if kind == "chat" else completion_job)(raw, served)
        ticket = worker.submit(batch.Request(job.prompt, job.config, job.logprobs))
        shape = Shape(kind, served.model_id, token_text, job.include_usage)
        if job.stream:
            return EventStream(stream(ticket, shape), on_close=lambda: worker.cancel(ticket))
        return await whole(request, ticket, shape)

    async def stream(ticket: Ticket, shape: Shape) -> AsyncIterator[str]:
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

    async def whole(request: Request, ticket: Ticket, shape: Shape) -> Response:
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

    async def chat_completions(request: Request) -> Response:
        return await answer(request, "chat")

    async def completions(request: Request) -> Response:
        return await answer(request, "completion")

    async def http_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path}: {e.detail}"
        return error_response(APIError(e.status_code, message, code=code))

    async def server_error(request: Request, e: Exception) -> Response:
        message = f"internal error: {type(e).__name__}: {e}"
        return error_response(APIError(500, message, kind="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker.start(asyncio.get_running_loop())
        if settings.on_ready is not None:
            settings.on_ready()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    routes = [
        Route("/health", health),
        Route("/v1/models", api(list_models)),
        Route("/v1/models/{model:path}", api(get_model)),
        Route("/v1/chat/completions", api(chat_completions), methods=["POST"]),
        Route("/v1/completions", api(completions), methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
