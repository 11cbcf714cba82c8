"""A rate limit per client, as nginx's `limit_req` keyed by the remote address sets one: each
client may send `rate` requests a second on average and `burst` at once; a request past that is
held until it is within the rate (nginx's delay: a client that sends one request after another
is slowed down, not refused) for at most `MAX_DELAY` seconds; a request that would wait longer
gets 429 with Retry-After, before its body is read, itself held `MAX_DELAY` (a few at a time
per client), so that a client ignoring Retry-After cannot make the server spin on refusals
(nor on reading and dropping the bodies it sends with them). Other clients are served as
before. A request also counts once more for every
`UNIT_BYTES` of body it sends (parsing, tokenizing and prefilling it cost more than a small
request), so a client sending megabyte bodies gets a few a second, not `rate`. /health and
/metrics are not limited.

The limit is the generic cell rate algorithm (GCRA, a token bucket that keeps one time per
client): a client's `due` time moves on by 1/rate for each unit it is charged, and a request
runs once `due` is at most burst/rate seconds ahead of now. Clients are told apart by address:
behind a reverse proxy they all have the proxy's, so limit there instead.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .guards import refusal
from .protocol import APIError

UNIT_BYTES = 16 * 1024  # body bytes that count as one more request (~4,000 prompt tokens)
MAX_DELAY = 1.0  # seconds a request may be held to keep its client within the rate
HELD_REFUSALS = 4  # a client's refusals held MAX_DELAY at once; more are answered at once
MAX_CLIENTS = 4096  # clients remembered before those that owe nothing are forgotten


class ClientRate:
    """The GCRA state of every client that owes time (`due` ahead of now)."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst = rate, burst
        self.interval = 1.0 / rate  # seconds one unit costs
        self.tolerance = burst * self.interval  # how far ahead of now `due` may be
        self.due: dict[str, float] = {}
        self.clock = clock
        self._pruned = -math.inf  # when the clients that owe nothing were last forgotten

    def admit(self, client: str) -> tuple[bool, float]:
        """Charge one request to `client`: (True, s) when it may run after s seconds (0: at
        once), (False, s) when it is refused and s seconds must pass before one runs at once
        (nothing is charged for a refused request)."""
        now = self.clock()
        due = max(self.due.get(client, now), now) + self.interval
        wait = due - now - self.tolerance
        if wait > MAX_DELAY:
            return False, wait
        if len(self.due) >= MAX_CLIENTS and now - self._pruned >= 1.0:  # once a second at most
            self.due, self._pruned = {c: t for c, t in self.due.items() if t > now}, now
        self.due[client] = due
        return True, max(wait, 0.0)

    def charge(self, client: str, units: float) -> None:
        """Charge an admitted request's further units (its body): the client may go into debt
        (a body over the burst is still read once), paid back before its next request."""
        now = self.clock()
        self.due[client] = max(self.due.get(client, now), now) + units * self.interval


class RateLimit:
    """ASGI middleware: the client's rate checked (and the request held or refused) before a
    /v1 request runs, its body's bytes charged as they arrive."""

    def __init__(self, app: ASGIApp, limit: ClientRate) -> None:
        self.app, self.limit = app, limit
        self.held: dict[str, int] = {}  # refusals being held, by client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        client = scope["client"][0] if scope.get("client") else ""
        admitted, wait = self.limit.admit(client)
        if not admitted:
            await self.refuse(client, wait, scope, receive, send)
            return
        if wait > 0:
            await asyncio.sleep(wait)

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request" and message.get("body"):
                self.limit.charge(client, len(message["body"]) / UNIT_BYTES)
            return message

        await self.app(scope, counted, send)

    async def refuse(
        self, client: str, wait: float, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """429 with Retry-After, held MAX_DELAY first (a few at a time per client)."""
        if self.held.get(client, 0) < HELD_REFUSALS:
            self.held[client] = self.held.get(client, 0) + 1
            try:
                await asyncio.sleep(MAX_DELAY)
                wait -= MAX_DELAY
            finally:
                self.held[client] -= 1
                if not self.held[client]:
                    del self.held[client]
        retry = max(math.ceil(wait), 1)
        message = (
            f"too many requests from {client}: a client may send {self.limit.rate:g} a second "
            f"({self.limit.burst:g} at once; each {UNIT_BYTES // 1024} KiB of body counts as "
            f"one more); retry after {retry} s"
        )
        error = APIError(429, message, code="rate_limit_exceeded", kind="requests")
        await refusal(error, scope, {"Retry-After": str(retry)})(scope, receive, send)
