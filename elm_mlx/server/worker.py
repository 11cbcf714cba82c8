"""The worker thread: the only thread that touches the `BatchGenerator` (and so MLX).

The event loop submits `Ticket`s and cancels them through an inbox; the worker hands waiting
requests to the generator as slots free up (at most `max_batch` at once), steps it and passes
each event to its ticket's asyncio queue. Admission counts every request not yet finished, so
`max_batch + max_queue` of them are taken at once (a burst fills the free slots, then the
queue) and the next one is refused (429). An exception fails the requests it touched, never
the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine.reference import release_thread, wired_limit
from ..engine.scheduler import BatchGenerator, Event, Request
from ..errors import ElmError, OptionError
from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger("elm_mlx.server")


@dataclass(frozen=True)
class Failure:
    """What a ticket gets instead of events when its request cannot go on."""

    error: APIError


@dataclass(eq=False)
class Ticket:
    request: Request
    events: asyncio.Queue[Event | Failure] = field(default_factory=asyncio.Queue)
    uid: int | None = None  # the generator's request id, once admitted
    done: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None  # when its latest token came (for /metrics)


_STOP = object()


class Worker:
    def __init__(self, engine: BatchGenerator, max_queue: int, metrics: Metrics | None = None):
        self.engine, self.max_queue = engine, max_queue
        self.metrics = metrics or Metrics()
        self.counts: Counter[str] = Counter()  # completed, cancelled, failed
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._outstanding = 0  # submitted, not yet finished (running or waiting)
        self._active = 0
        self._closed = False
        self._on_drained: Callable[[], None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, once started
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ event-loop side

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread = threading.Thread(target=self._run, name="elm-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Fail what is left (503) and end the thread."""
        with self._lock:
            self._closed = True
        self._inbox.put((_STOP, None))
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self, seconds: float, on_drained: Callable[[], None] | None = None) -> None:
        """Refuse new requests (503) now, fail those still running after `seconds`, and end the
        thread then, or as soon as none is left (at once when none runs), calling `on_drained`
        (on the worker thread)."""
        with self._lock:
            self._closed = True
        self._on_drained = on_drained
        self._inbox.put(("drain", None))  # wakes an idle worker to see that nothing runs
        timer = threading.Timer(seconds, self._inbox.put, args=((_STOP, None),))
        timer.daemon = True
        timer.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, request: Request) -> Ticket:
        """Queue a request (called on the event loop); a full queue is a 429."""
        with self._lock:
            if self._closed:
                raise APIError(503, "the server is shutting down", kind="server_error")
            if self._outstanding >= self.engine.max_batch + self.max_queue:
                raise APIError(
                    429,
                    f"the server is busy: {self._active} requests running and "
                    f"{self._outstanding - self._active} waiting; retry later",
                    code="queue_full",
                    kind="rate_limit_error",
                )
            self._outstanding += 1
        ticket = Ticket(request)
        self._inbox.put(("add", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop a request now (its client left); nothing happens if it is done."""
        if not ticket.done:
            self._inbox.put(("cancel", ticket))

    def call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run `fn` on the worker thread between two steps (MLX work that is not generation,
        such as embeddings); its result or exception comes back in the future."""
        with self._lock:
            if self._closed:
                raise APIError(503, "the server is shutting down", kind="server_error")
        assert self.loop is not None
        future = self.loop.create_future()
        self._inbox.put(("call", (fn, future)))
        return future

    def stats(self) -> dict[str, int]:
        cache = self.engine.prompt_cache
        return {
            "active": self._active,
            "queued": max(self._outstanding - self._active, 0),
            "max_batch": self.engine.max_batch,
            **{k: self.counts[k] for k in ("completed", "cancelled", "failed")},
            "prompt_cache_entries": len(cache) if cache is not None else 0,
            "prompt_cache_bytes": cache.nbytes if cache is not None else 0,
        }

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        try:
            with wired_limit(self.engine.model):
                self._loop()
        finally:
            release_thread()  # before `on_drained`, after which the process may exit
        if self._on_drained is not None:
            self._on_drained()

    def _loop(self) -> None:
        waiting: deque[Ticket] = deque()
        active: dict[int, Ticket] = {}
        while True:
            messages = [self._inbox.get()] if not waiting and not active else []
            with contextlib.suppress(queue.Empty):
                while True:
                    messages.append(self._inbox.get_nowait())
            for kind, ticket in messages:
                if kind is _STOP:
                    closing = APIError(503, "the server is shutting down", kind="server_error")
                    self._fail([*waiting, *active.values()], closing)
                    self._active = 0
                    return
                self._take(kind, ticket, waiting, active)
            self._admit(waiting, active)
            self._active = len(active)
            if active:
                self._step(active)
                self._active = len(active)
            if self._closed and self._on_drained is not None and not waiting and not active:
                return  # draining, and nothing is left

    def _take(
        self, kind: str, ticket: Ticket, waiting: deque[Ticket], active: dict[int, Ticket]
    ) -> None:
        """An inbox message: a request to add or to cancel, a function to call ("drain" only
        wakes the loop)."""
        if kind == "call":
            self._call(*ticket)
        elif kind == "add":
            waiting.append(ticket)
        elif kind != "cancel" or ticket.done:
            return
        elif ticket in waiting:
            waiting.remove(ticket)
            self._retire(ticket, "cancelled")
        elif ticket.uid in active:
            del active[ticket.uid]
            self._retire(ticket, "cancelled")
            self._engine_cancel(ticket)

    def _call(self, fn: Callable[[], Any], future: asyncio.Future) -> None:
        try:
            result, error = fn(), None
        except Exception as e:
            log.exception("a call on the worker failed")
            result, error = None, e
        assert self.loop is not None

        def settle() -> None:
            if future.done():  # its caller left
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            self.loop.call_soon_threadsafe(settle)

    def _admit(self, waiting: deque[Ticket], active: dict[int, Ticket]) -> None:
        while waiting and len(active) < self.engine.max_batch:
            ticket = waiting.popleft()
            try:
                ticket.uid = self.engine.add(ticket.request)
            except OptionError as e:  # the engine's own checks: the request's fault
                error = APIError(400, f"{e.option} {e.problem}", e.option)
            except ElmError as e:
                error = APIError(400, str(e))
            except Exception as e:
                log.exception("a request could not start")
                error = _internal(e)
            else:
                active[ticket.uid] = ticket
                continue
            self._fail([ticket], error)

    def _step(self, active: dict[int, Ticket]) -> None:
        try:
            events = self.engine.step()
        except Exception as e:  # the requests of this step fail; the worker goes on
            log.exception("a generation step failed")
            failed = list(active.values())
            active.clear()
            self._fail(failed, _internal(e))
            for ticket in failed:
                self._engine_cancel(ticket)
            return
        batch = len(active)
        deliveries = []
        for event in events:
            ticket = active.get(event.request_id)
            if ticket is None:  # cancelled meanwhile
                continue
            deliveries.append((ticket, event))
            if event.finish_reason is not None:
                del active[event.request_id]
                self._retire(ticket, "completed")
        self.metrics.step(batch, deliveries)
        self._deliver(deliveries)

    def _engine_cancel(self, ticket: Ticket) -> None:
        try:
            if ticket.uid is not None:
                self.engine.cancel(ticket.uid)
        except Exception:
            log.exception("cancelling a request failed")

    def _retire(self, ticket: Ticket, outcome: str) -> None:
        ticket.done = True
        self.counts[outcome] += 1
        with self._lock:
            self._outstanding -= 1

    def _fail(self, tickets: list[Ticket], error: APIError) -> None:
        for ticket in tickets:
            self._retire(ticket, "failed")
        self._deliver([(t, Failure(error)) for t in tickets])

    def _deliver(self, deliveries: list[tuple[Ticket, Event | Failure]]) -> None:
        if not deliveries or self.loop is None:
            return

        def put_all() -> None:
            for ticket, item in deliveries:
                ticket.events.put_nowait(item)

        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            self.loop.call_soon_threadsafe(put_all)


def out_of_memory(e: BaseException) -> bool:
    """Whether an error is the allocator's (Python's MemoryError, MLX's malloc errors)."""
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and any(w in str(e).lower() for w in ("memory", "alloc"))
    )


def _internal(e: Exception) -> APIError:
    if out_of_memory(e):  # this request's fault as little as the server's: retry later
        return APIError(503, f"out of memory while generating: {e}", code="out_of_memory",
                        kind="server_error")  # fmt: skip
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")
