"""Safe defaults for a server on the user's own machine, as ASGI middleware in front of every
route:

- On a loopback bind, a request whose Host is not a loopback name or address (nor one of
  `--allowed-hosts`) is refused (403): a web page the user opens could otherwise reach the
  server through DNS rebinding (its own name resolving to 127.0.0.1).
- A request body must be `application/json` (415 otherwise): a cross-site form or `text/plain`
  POST is a "simple request" that browsers send without asking first.
- CORS is off unless `--allowed-origins` names origins; those get Starlette's CORS answers
  (preflights included).
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from . import anthropic
from .options import is_loopback
from .protocol import APIError


def refusal(e: APIError, scope: Scope, headers: dict[str, str] | None = None) -> JSONResponse:
    """The refusal in the shape of the route's API (OpenAI's, or Anthropic's on /v1/messages)."""
    body = anthropic.error_body(e) if scope["path"].startswith(anthropic.PATH) else e.body()
    return JSONResponse(body, status_code=e.status, headers=headers)


def _error(status: int, message: str, code: str, scope: Scope) -> JSONResponse:
    return refusal(APIError(status, message, code=code), scope)


def host_name(host: str) -> str:
    """The name or address of a Host header, without its port ("[::1]:8080" -> "::1")."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostCheck:
    """Refuse a Host that is neither loopback nor allowed (only on loopback binds)."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...] = ()):
        self.app = app
        self.allowed = {h.lower() for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host")
            name = host_name(host).lower() if host is not None else None
            if name is not None and not is_loopback(name) and name not in self.allowed:
                message = (
                    f"the Host {host!r} is not this server's: a loopback server answers "
                    "localhost, 127.0.0.1 and ::1 (add others with --allowed-hosts)"
                )
                await _error(403, message, "host_not_allowed", scope)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class JsonBodies:
    """Refuse a request with a body that is not declared `application/json`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            kind = Headers(scope=scope).get("content-type", "")
            if kind.split(";")[0].strip().lower() != "application/json":
                message = (
                    f"the request body must be JSON with Content-Type: application/json, "
                    f"got {kind or 'no Content-Type'!r}"
                )
                await _error(415, message, "unsupported_media_type", scope)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def guards(loopback: bool, allowed_hosts: tuple[str, ...], origins: tuple[str, ...]) -> list:
    """The middleware, outermost first: Host, then CORS (preflights), then the body's type."""
    out = [Middleware(HostCheck, allowed=allowed_hosts)] if loopback else []
    if origins:
        out.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=[
                    "Authorization",
                    "Content-Type",
                    "X-Api-Key",
                    "Anthropic-Version",
                    "Anthropic-Beta",
                ],
                max_age=600,
            )
        )
    out.append(Middleware(JsonBodies))
    return out
