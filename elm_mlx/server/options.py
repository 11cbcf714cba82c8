"""The options of `elm serve` and their defaults (light: the CLI imports it to show them)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import ServeError


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_batch: int = 8  # requests decoded together
    max_queue: int = 64  # requests waiting for a slot; more get 429
    max_context: int | None = None  # default: the model's
    template: str | None = None  # a Jinja chat template instead of the tokenizer's
    max_body_bytes: int = 4 * 2**20
    graceful_seconds: float = 10.0  # how long a stop waits for requests in flight

    def validate(self) -> None:
        for name in ("max_batch", "max_queue", "max_context", "max_body_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ServeError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not 0 <= self.port < 65536:
            raise ServeError(f"--port must be in [0, 65535], got {self.port}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
