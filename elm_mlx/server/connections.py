"""HTTP connections that a slow or hostile client cannot pile up: uvicorn's h11 protocol with a
deadline for each request's line and headers, a cap on open connections, and the errors that
the HTTP layer answers itself (a malformed request line or header, a bad Content-Length, no
Host) in the API's JSON error shape instead of plain text.

uvicorn's own options cover the rest: `timeout_keep_alive` closes idle connections between
requests, `h11_max_incomplete_event_size` bounds the header block, and the app bounds the time
a body may take (`AppSettings.body_timeout`). uvicorn's `limit_concurrency` is not used: it
answers in plain text and keeps the connection, where a cap must free the socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("elm_mlx.server")


def error_bytes(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 response holding one error (the connection closes after it)."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    body = json.dumps({"error": error}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """A connection of `elm serve`; `guarded_protocol` sets the limits on a subclass."""

    header_timeout: float = 10.0
    max_connections: int = 512

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.awaiting_request = True  # no request line and headers yet, or idle between
        self.since = 0.0
        self._deadline: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ the deadline

    def _await_request(self) -> None:
        self.awaiting_request = True
        self.since = self.loop.time()
        self._cancel_deadline()
        self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        """No whole request line and headers in time: a 408 if some of them came (a slow
        sender), else (an idle connection) just close."""
        self._deadline = None
        if not self.awaiting_request or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:
            message = (
                f"the request line and headers did not arrive within {self.header_timeout:g} s"
            )
            self.transport.write(error_bytes(408, "Request Timeout", message, "request_timeout"))
        self.transport.close()

    # ------------------------------------------------------------------ uvicorn's hooks

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_request()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def _make_room(self) -> None:
        """Over the cap: close the oldest connection still waiting for its request (a slow
        sender, or one idle between requests), else refuse this one."""
        waiting = [c for c in self.connections if c is not self and _awaiting(c)]
        if waiting:
            oldest = min(waiting, key=lambda c: c.since)
            oldest.transport.close()
            return
        log.warning("refused a connection: %d are open", len(self.connections))
        message = f"the server has {self.max_connections} connections open; retry later"
        self.transport.write(
            error_bytes(503, "Service Unavailable", message, "too_many_connections")
        )
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's line and headers arrived
            self.awaiting_request = False
            self._cancel_deadline()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._await_request()  # the next request on this connection has its own deadline
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request (malformed line or header, bad Content-Length, no Host):
        answer in the API's error shape."""
        error = {
            "message": "invalid HTTP request: a malformed request line or header, a bad "
            "Content-Length or no Host header",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_http",
        }
        body = json.dumps({"error": error}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body)):
            self.transport.write(self.conn.send(event))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


def _awaiting(connection: Any) -> bool:
    return getattr(connection, "awaiting_request", False) and not connection.transport.is_closing()


def guarded_protocol(header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """The protocol class to give uvicorn (`Config(http=...)`), with these limits."""
    return type(
        "ElmH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )
