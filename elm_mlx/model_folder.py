"""Model folders on disk, read and written the way mlx-lm lays them out: config.json, weights in
safetensors shards with an index, tokenizer files. Shared by the loader, `elm convert` and
`elm fuse`; a folder being written lives in a hidden staging folder until it is complete.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx

from .errors import ConfigError, OutputError, WeightsError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)
# What a bare tokenizer.model needs to load as a Llama-style SentencePiece tokenizer.
SPM_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "legacy": False,
}


# ---------------------------------------------------------------------------- reading


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"{path} is missing: is {model_dir} a model folder?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); re-download or re-convert") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return config


def quantization_of(config: dict[str, Any]) -> dict[str, Any] | None:
    return config.get("quantization") or config.get("quantization_config") or None


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightsError(
            f"{model_dir} holds no *.safetensors weights; convert the checkpoint with `elm convert`"
        )
    return files


def read_weights(model_dir: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in weight_files(model_dir):
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError, OSError) as e:
            raise WeightsError(f"{f} cannot be read ({e}); the file is corrupt or truncated") from e
    return weights


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists()


# ---------------------------------------------------------------------------- writing


def check_output(out: Path, force: bool, source: Path | None = None) -> None:
    """Refuse to write over an existing folder unless `force`, and never over `source`."""
    if source is not None and out.exists() and out.resolve() == source.resolve():
        raise OutputError(f"-o {out} is the input model's folder; write the new one elsewhere")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputError(f"{out} already exists; choose another -o or pass --force")


@contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A hidden temporary sibling of `out` to write into; renamed to `out` when the block
    succeeds, removed when it fails, so a half-written model folder never appears. Made with a
    plain mkdir, not mkdtemp (mode 0700), so the model gets the usual permissions the umask
    allows and other users or a service account can read it."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
        tmp.mkdir()
    except OSError as e:
        raise OutputError(
            f"cannot create {out}: {e.strerror or e} ({e.filename or out.parent}); "
            "choose another output folder with -o"
        ) from e
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def replaced_file(path: Path) -> Iterator[Path]:
    """A hidden temporary sibling of the file `path` (same suffix, for writers that add one)
    that replaces `path` when the block succeeds: a crash never leaves a torn file."""
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ShardWriter:
    """Writes tensors in arrival order into safetensors shards of at most `max_bytes`, then
    names them as mlx-lm does and writes the index."""

    def __init__(self, folder: Path, max_bytes: int = 5 << 30):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: mx.array) -> None:
        if self.pending and self.pending_bytes + tensor.nbytes > self.max_bytes:
            self.flush()
        mx.eval(tensor)
        self.pending[name] = tensor
        self.pending_bytes += tensor.nbytes
        self.total += tensor.nbytes

    def flush(self) -> None:
        path = self.folder / f"shard-{len(self.shards)}.safetensors"
        mx.save_safetensors(str(path), self.pending, metadata={"format": "mlx"})
        self.shards.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"shard-{i}.safetensors", self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {
            "metadata": {"total_size": self.total},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=4))


def write_config(folder: Path, config: dict[str, Any]) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def copy_tokenizer(found: Path, out_dir: Path) -> None:
    """Copy tokenizer files from a folder (or a bare tokenizer.model file); a bare SentencePiece
    model gets a Llama tokenizer_config.json."""
    if found.is_file():
        shutil.copyfile(found, out_dir / "tokenizer.model")
    else:
        for name in TOKENIZER_FILES:
            if (found / name).exists():
                shutil.copyfile(found / name, out_dir / name)
    if (out_dir / "tokenizer.model").exists() and not (out_dir / "tokenizer_config.json").exists():
        (out_dir / "tokenizer_config.json").write_text(json.dumps(SPM_TOKENIZER_CONFIG, indent=2))
