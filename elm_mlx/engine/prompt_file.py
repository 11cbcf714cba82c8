"""Prompt caches on disk: a prompt's keys and values, computed once, kept in a safetensors file
(`layers.{i}.keys`, `layers.{i}.values`, (1, H, n, D) each, full precision as a `KVCache` holds
them; zeros where a windowed layer dropped positions, and then `start` names the shortest
prefix a continuation may take) whose metadata names what they depend on: the model (its name
and a hash of its arguments), the KV settings they were computed under, and the n tokens. A
run that loads the file with another model or other settings is refused with a message naming
both; the entry goes into a `PromptCache`, so generation continues after the prompt without
processing it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx

from ..errors import PromptCacheError, PromptCacheMismatch
from ..models import PREFILL_STEP_SIZE, CausalLM
from .batch_kv import KVConfig, one_row_cache, row_cache
from .prompt_cache import PromptCache

FORMAT = "elm-prompt-cache/1"


def model_hash(model: CausalLM) -> str:
    """A short hash of the model's arguments (its config.json as the family reads it)."""
    text = json.dumps(model.args.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _identity(name: str, model: CausalLM, kv: KVConfig) -> dict[str, str]:
    return {"model": name, "config_sha256": model_hash(model), "kv": json.dumps(asdict(kv))}


def _describe(meta: dict[str, str]) -> str:
    return f"model {meta.get('model')!r} (config {meta.get('config_sha256')}), KV {meta.get('kv')}"


def prefill(
    model: CausalLM,
    tokens: Sequence[int],
    kv: KVConfig | None = None,
    chunk: int = PREFILL_STEP_SIZE,
) -> tuple[list[tuple[mx.array, mx.array]], int]:
    """The keys and values of every token of `tokens` under `kv`, fed in chunks as generation
    feeds a prompt, per layer (1, H, n, D) each; and the shortest prefix of them a continuation
    may take (0 unless a windowed layer dropped positions, which are zeros)."""
    cache = one_row_cache(model, kv)
    for start in range(0, len(tokens), chunk):
        model(mx.array(list(tokens[start : start + chunk]), mx.uint32)[None], cache=cache)
        mx.eval([c.state for c in cache])
    entry = row_cache(cache, 0, len(tokens))
    assert entry is not None  # all the tokens: every window's positions are held
    mx.eval(entry[0])
    return entry


def save(
    path: Path,
    tokens: Sequence[int],
    layers: list[tuple[mx.array, mx.array]],
    name: str,
    model: CausalLM,
    kv: KVConfig | None = None,
    start: int = 0,
) -> Path:
    """Write the file atomically (a temporary file in the same folder, then renamed)."""
    path = Path(path)
    tensors = {}
    for i, (keys, values) in enumerate(layers):
        tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"] = keys, values
    meta = {
        "format": FORMAT,
        "tokens": json.dumps(list(tokens)),
        "start": str(start),
        **_identity(name, model, kv or KVConfig()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        mx.save_safetensors(tmp, tensors, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(
    path: Path, name: str, model: CausalLM, kv: KVConfig | None = None
) -> tuple[list[int], list[tuple[mx.array, mx.array]], int]:
    """(tokens, per layer keys and values, the shortest prefix a continuation may take) of a
    file made for this model and these settings."""
    path = Path(path)
    try:
        tensors, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # MLX raises bare RuntimeError/ValueError for unreadable files
        raise PromptCacheError(f"{path}: not a readable prompt cache file ({e})") from e
    if meta.get("format") != FORMAT:
        raise PromptCacheError(f"{path}: not an elm prompt cache (make one with elm cache-prompt)")
    want = _identity(name, model, kv or KVConfig())
    if any(meta.get(k) != v for k, v in want.items()):
        raise PromptCacheMismatch(
            f"{path} was made with {_describe(meta)}; this run uses {_describe(want)}: make it "
            "again with elm cache-prompt for this model and these settings"
        )
    try:
        tokens = [int(t) for t in json.loads(meta["tokens"])]
        start = int(meta.get("start", 0))
        layers = [
            (tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"])
            for i in range(len(model.layers))
        ]
    except (KeyError, ValueError, TypeError) as e:
        raise PromptCacheError(f"{path}: incomplete prompt cache ({e})") from e
    if any(k.shape[2] != len(tokens) or v.shape[2] != len(tokens) for k, v in layers):
        raise PromptCacheError(f"{path}: its tensors do not hold its {len(tokens)} tokens")
    if not 0 <= start <= len(tokens):
        raise PromptCacheError(f"{path}: its start {start} is not within its tokens")
    mx.eval(layers)  # read now, in this thread (a lazy load is bound to this thread's stream)
    return tokens, layers, start


class DiskPromptCache(PromptCache):
    """A `PromptCache` whose entries are also files in `folder` (one prompt-cache file each,
    written atomically), so that it outlives the process within the same `max_bytes`. At start
    the files made for this model and settings are loaded (oldest first); files for others are
    left alone, damaged ones deleted, each with a warning: never served."""

    def __init__(
        self,
        folder: Path,
        name: str,
        model: CausalLM,
        kv: KVConfig | None = None,
        max_bytes: int = 1 << 30,
        warn: Callable[[str], None] = lambda text: print(f"warning: {text}", file=sys.stderr),
    ):
        super().__init__(max_bytes)
        self.folder, self.name, self.model, self.kv = Path(folder), name, model, kv or KVConfig()
        self.files: dict[int, Path] = {}
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
            try:
                tokens, layers, start = load(path, name, model, self.kv)
            except PromptCacheMismatch as e:
                warn(f"prompt cache {path} not used: {e}")
                continue
            except PromptCacheError as e:
                warn(f"prompt cache {path} dropped: {e}")
                path.unlink(missing_ok=True)
                continue
            self._remember(tokens, layers, self.kv, start, path)

    def _remember(
        self, tokens: list[int], layers: list, kv: KVConfig, start: int, path: Path | None
    ) -> None:
        """Insert as `PromptCache` does; a new entry gets `path` (None: a new file, when made
        under this cache's KV settings; under others it stays in memory only)."""
        known = set(self.entries)
        super().insert(tokens, layers, kv, start)
        for key in set(self.entries) - known:
            if path is None and kv == self.kv:
                digest = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:24]
                path = self.folder / f"{digest}.safetensors"
                save(path, tokens, layers, self.name, self.model, self.kv, start)
            if path is not None:
                self.files[key] = path

    def insert(
        self,
        tokens: Sequence[int],
        layers: list[tuple[mx.array, mx.array]],
        kv: KVConfig | None = None,
        start: int = 0,
    ) -> None:
        self._remember(list(tokens), layers, kv or KVConfig(), start, None)

    def _drop(self, key: int) -> None:
        super()._drop(key)
        if (path := self.files.pop(key, None)) is not None:
            path.unlink(missing_ok=True)

    def clear(self) -> None:
        for key in list(self.entries):
            self._drop(key)
