"""Several models behind one server. Each served model is a `Slot`: its id and how to load it.
A model loads on its first request (in a thread: requests to the others go on meanwhile; the
requests for it wait for the one load), gets a worker of its own, and is unloaded (worker
stopped, arrays freed, MLX's buffer cache cleared) once idle for `ttl` seconds, or, when
`max_loaded` are loaded and another is asked for, the least recently used idle one first.
Running out of memory while loading answers 503; the server stays up."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import mlx.core as mx

from ..engine.reference import release_thread
from .metrics import Metrics
from .protocol import DEFAULT_MODEL, APIError, Served
from .responses import TokenText
from .worker import Worker, out_of_memory

log = logging.getLogger("elm_mlx.server")
T = TypeVar("T")


@dataclass(frozen=True)
class Loaded:
    served: Served
    worker: Worker
    token_text: TokenText


@dataclass(eq=False)
class Slot:
    model_id: str
    load: Callable[[], Loaded]  # runs in a thread of its own; the worker is not started yet
    loaded: Loaded | None = None
    loading: asyncio.Future | None = None
    unloading: asyncio.Future | None = None  # set while its memory is being given back
    last_used: float = 0.0  # time.monotonic() of its latest request


class Pool:
    def __init__(self, slots: list[Slot], ttl: float, max_loaded: int | None, metrics: Metrics):
        self.slots, self.ttl, self.max_loaded, self.metrics = slots, ttl, max_loaded, metrics
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self._reaper: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifetime

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the workers of the models loaded already, and the idle reaper."""
        self.loop = loop
        for slot in self.slots:
            if slot.loaded is not None:
                slot.loaded.worker.start(loop)
                slot.last_used = time.monotonic()
        if self.ttl > 0:
            self._reaper = loop.create_task(self._reap())

    def stop(self) -> None:
        self.closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        for worker in self.workers():
            worker.stop()

    def drain(self, seconds: float, on_drained: Callable[[], None]) -> None:
        """Drain every loaded worker; `on_drained` once all are."""
        self.closed = True
        workers = self.workers()
        left = [len(workers)]

        def one_drained() -> None:
            left[0] -= 1
            if left[0] == 0:
                on_drained()

        if not workers:
            on_drained()
        for worker in workers:
            worker.drain(seconds, one_drained)

    # ------------------------------------------------------------------ requests

    def find(self, name: str | None) -> Slot:
        if name in (None, DEFAULT_MODEL):
            return self.slots[0]
        for slot in self.slots:
            if slot.model_id == name:
                return slot
        served = ", ".join(repr(s.model_id) for s in self.slots)
        raise APIError(
            404,
            f"the model {name!r} does not exist: this server serves {served} "
            f"({DEFAULT_MODEL!r} is the first)",
            "model",
            "model_not_found",
        )

    def touch(self, model_id: str) -> None:
        """Mark a model used now."""
        self.find(model_id).last_used = time.monotonic()

    async def acquire(self, name: str | None) -> Loaded:
        """The model a request names, loaded (loading it first if need be)."""
        slot = self.find(name)
        slot.last_used = time.monotonic()
        if slot.loaded is not None:
            return slot.loaded
        if self.closed:
            raise APIError(503, "the server is shutting down", kind="server_error")
        if slot.loading is None:
            slot.loading = asyncio.ensure_future(self._load(slot))
        return await asyncio.shield(slot.loading)

    async def _load(self, slot: Slot) -> Loaded:
        try:
            if slot.unloading is not None:  # never two copies at once
                await slot.unloading
            await self._make_room()
            log.info("loading %s", slot.model_id)
            loaded = await in_own_thread(slot.load)
        except APIError:
            raise
        except Exception as e:
            gc.collect()
            mx.clear_cache()
            if out_of_memory(e):
                raise APIError(
                    503,
                    f"out of memory while loading the model {slot.model_id!r}: {e}; unload "
                    "others (--max-loaded, --ttl) or serve a smaller model",
                    "model",
                    "out_of_memory",
                    "server_error",
                ) from e
            raise APIError(500, f"the model {slot.model_id!r} could not load: {e}",
                           "model", kind="server_error") from e  # fmt: skip
        finally:
            slot.loading = None
        assert self.loop is not None
        loaded.worker.start(self.loop)
        slot.loaded, slot.last_used = loaded, time.monotonic()
        return loaded

    async def _make_room(self) -> None:
        """Unload least recently used idle models until one more fits under max_loaded."""
        while self.max_loaded is not None and len(self.loaded()) >= self.max_loaded:
            idle = [s for s in self.loaded() if self._idle(s)]
            if not idle:
                raise APIError(
                    503,
                    f"{self.max_loaded} models are loaded (--max-loaded) and all are busy; "
                    "retry later",
                    "model",
                    "too_many_models",
                    "server_error",
                )
            await self.unload(min(idle, key=lambda s: s.last_used))

    async def unload(self, slot: Slot) -> None:
        loaded, slot.loaded = slot.loaded, None  # new requests load it again
        if loaded is None:
            return
        log.info("unloading %s", slot.model_id)
        slot.unloading = asyncio.get_running_loop().create_future()
        try:
            await asyncio.to_thread(loaded.worker.stop)
            del loaded
            gc.collect()
            mx.clear_cache()  # freed arrays go back to the system, not to MLX's buffer cache
        finally:
            slot.unloading.set_result(None)
            slot.unloading = None

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(self.ttl / 4, 5.0))
            now = time.monotonic()
            for slot in self.loaded():
                if self._idle(slot) and now - slot.last_used >= self.ttl:
                    with contextlib.suppress(Exception):
                        await self.unload(slot)

    # ------------------------------------------------------------------ state

    @staticmethod
    def _idle(slot: Slot) -> bool:
        if slot.loaded is None or slot.loading is not None:
            return False
        stats = slot.loaded.worker.stats()
        return stats["active"] + stats["queued"] == 0

    def loaded(self) -> list[Slot]:
        return [s for s in self.slots if s.loaded is not None]

    def workers(self) -> list[Worker]:
        return [s.loaded.worker for s in self.loaded() if s.loaded is not None]

    def stats(self) -> dict[str, int]:
        """The loaded workers' stats, summed."""
        total: dict[str, int] = {}
        for worker in self.workers():
            for key, value in worker.stats().items():
                total[key] = total.get(key, 0) + value
        keys = ("active", "queued", "max_batch", "completed", "cancelled", "failed",
                "prompt_cache_entries", "prompt_cache_bytes")  # fmt: skip
        return {k: total.get(k, 0) for k in keys}

    def cards(self) -> list[dict[str, Any]]:
        return [
            {
                "id": s.model_id,
                "object": "model",
                "created": 0,
                "owned_by": "elm-mlx",
                "loaded": s.loaded is not None or s.unloading is not None,
            }
            for s in self.slots
        ]


async def in_own_thread(fn: Callable[[], T]) -> T:
    """`fn()` on a new thread, which releases MLX's state for itself when done
    (`release_thread`); not on a pool's thread, which would run more work after that and end
    only as the interpreter shuts down. It is joined before the process exits, as a pool's."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="elm-serve-load")
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, _released, fn)
    finally:
        executor.shutdown(wait=False)


def _released(fn: Callable[[], T]) -> T:
    try:
        return fn()
    finally:
        release_thread()
