"""`GET /metrics`: the server's counters in Prometheus' text format (prometheus-client).

One registry per app (not the library's global one: two apps in one process, as in tests, keep
their own counts). Requests are counted by route and status in ASGI middleware outside the
guards, so refused requests count too; tokens, latencies, batch sizes, prompt-cache and
speculation counts come from the worker thread as it delivers events.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine.scheduler import Event

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "elm_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "elm_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generated_tokens = Counter(
            "elm_generated_tokens", "Tokens generated for finished requests", registry=r
        )
        self.ttft = Histogram(
            "elm_time_to_first_token_seconds",
            "From a request's submission to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "elm_time_per_output_token_seconds",
            "Time between a request's tokens after the first",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "elm_batch_size", "Requests decoded together per step", buckets=BATCH_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.cache_hits = Counter(
            "elm_prompt_cache_hits", "Requests that reused prompt-cache entries", registry=r
        )
        self.cache_hit_tokens = Counter(
            "elm_prompt_cache_hit_tokens", "Prompt tokens taken from the prompt cache", registry=r
        )
        self.spec_proposed = Counter(
            "elm_speculative_proposed_tokens", "Draft tokens proposed", registry=r
        )
        self.spec_accepted = Counter(
            "elm_speculative_accepted_tokens", "Draft tokens the model accepted", registry=r
        )
        self.running = Gauge("elm_requests_running", "Requests being decoded", registry=r)
        self.waiting = Gauge("elm_requests_waiting", "Requests waiting for a slot", registry=r)
        self.cache_bytes = Gauge("elm_prompt_cache_bytes", "Bytes held by the prompt cache",
                                 registry=r)  # fmt: skip
        self.models_loaded = Gauge("elm_models_loaded", "Models loaded in memory", registry=r)

    def watch(self, stats: Callable[[], dict[str, int]], models_loaded: Callable[[], int]) -> None:
        """Gauges read when scraped: the worker's stats and the loaded models."""
        self.running.set_function(lambda: stats()["active"])
        self.waiting.set_function(lambda: stats()["queued"])
        self.cache_bytes.set_function(lambda: stats()["prompt_cache_bytes"])
        self.models_loaded.set_function(models_loaded)

    # ------------------------------------------------------------------ worker thread

    def step(self, batch: int, deliveries: Sequence[tuple[Any, Event]]) -> None:
        """One engine step of `batch` requests and the events it gave them (ticket, event):
        a ticket carries `submitted_at` and `last_token_at` (perf_counter seconds)."""
        now = time.perf_counter()
        self.batch_size.observe(batch)
        per_ticket: dict[int, tuple[Any, list[Event]]] = {}
        for ticket, event in deliveries:
            per_ticket.setdefault(id(ticket), (ticket, []))[1].append(event)
        for ticket, events in per_ticket.values():
            if ticket.last_token_at is None:
                self.ttft.observe(now - ticket.submitted_at)
            else:
                gap = (now - ticket.last_token_at) / len(events)  # speculation: several at once
                for _ in events:
                    self.per_token.observe(gap)
            ticket.last_token_at = now
            for event in events:
                if event.finish_reason is not None:
                    self.finished(event)

    def finished(self, event: Event) -> None:
        usage = event.usage
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.generated_tokens.inc(usage.completion_tokens)
        if usage.cached_tokens:
            self.cache_hits.inc()
            self.cache_hit_tokens.inc(usage.cached_tokens)
        if event.speculative is not None:
            self.spec_proposed.inc(event.speculative.proposed)
            self.spec_accepted.inc(event.speculative.accepted)

    # ------------------------------------------------------------------ HTTP

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class CountRequests:
    """ASGI middleware: count each HTTP request by its route's path template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]):
        self.app, self.metrics, self.routes = app, metrics, routes

    def route_of(self, scope: Scope) -> str:
        for route in self.routes:
            if route.matches(scope)[0] is Match.FULL:
                return getattr(route, "path", "other")
        return "other"  # unknown paths share one label: their number stays bounded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.requests.labels(self.route_of(scope), str(status)).inc()
