"""The options of `elm serve` and their defaults (light: the CLI imports it to show them)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ..engine.prompt_prefill import PrefillPolicy
from ..errors import OptionError, ServeError


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_batch: int = 8  # requests decoded together
    max_queue: int = 64  # requests waiting for a slot beyond those; more get 429
    max_context: int | None = None  # default: the model's
    template: str | None = None  # a Jinja chat template instead of the tokenizer's
    max_body_bytes: int = 4 * 2**20
    graceful_seconds: float = 10.0  # how long a stop waits for requests in flight
    prompt_cache_bytes: int = 2**30  # KV entries of past requests kept for reuse (0: none)
    prompt_cache_dir: Path | None = None  # keep them there too, across restarts
    # slow or idle clients: a connection must send its request line and headers within
    # header_timeout and its body within body_timeout; past max_connections open at once, a
    # new one closes the oldest that has not finished its headers (or is refused)
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 512
    # requests a second each client (remote address) may send to /v1, twice that at once; a
    # body counts once more per 16 KiB (0: no limit). Past it a request waits (1 s at most),
    # then gets 429 before its body is read (server/client_rate.py)
    client_rate: float = 100.0
    # while requests decode, prompt prefill takes at most this share of their time (0.5: they
    # slow by at most 1.5x however long a newcomer's prompt is; engine/prompt_prefill.py)
    prefill_share: float = PrefillPolicy.share
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides loopback ones
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed by CORS (none: CORS off)
    ttl: float = 600.0  # seconds a model may stay idle before it is unloaded (0: kept)
    max_loaded: int | None = None  # models loaded at once at most (then the LRU idle goes)
    pooling: str = "mean"  # /v1/embeddings: "mean" or "last" of the final hidden states

    def validate(self) -> None:
        for name in (
            "max_batch",
            "max_queue",
            "max_context",
            "max_body_bytes",
            "max_connections",
            "max_loaded",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ServeError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        for name in (
            "graceful_seconds",
            "header_timeout",
            "body_timeout",
            "prompt_cache_bytes",
            "ttl",
            "client_rate",
        ):
            if getattr(self, name) < 0:
                raise ServeError(
                    f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}"
                )
        try:
            PrefillPolicy(self.prefill_share).validate()
        except OptionError as e:
            raise ServeError(f"--prefill-share {e.problem}") from e
        if self.pooling not in ("mean", "last"):
            raise ServeError(f"--pooling must be mean or last, got {self.pooling!r}")
        if not 0 <= self.port < 65536:
            raise ServeError(f"--port must be in [0, 65535], got {self.port}")
        for origin in self.allowed_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ServeError(
                    f"--allowed-origins takes origins such as http://localhost:3000 (or *), "
                    f"got {origin!r}"
                )


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
