"""Resolve a local folder or a Hugging Face hub id to a local folder."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFoundError

MODEL_FILE_PATTERNS = [
    "*.json",
    "*.safetensors",
    "pytorch_model*.bin",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]


def looks_like_repo_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def resolve(
    path_or_repo: str | os.PathLike,
    revision: str | None = None,
    token: str | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """A local folder as is; a hub id downloaded (or taken from the HF cache)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file; give the model's folder")
        return path
    name = str(path_or_repo)
    if not looks_like_repo_id(name):
        raise ModelNotFoundError(f"{name}: no such folder, and not a hub id of the form owner/name")
    return download(name, revision, token, allow_patterns or MODEL_FILE_PATTERNS)


def download(repo_id: str, revision: str | None, token: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = token or os.environ.get("HF_TOKEN")
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns)
        )
    except GatedRepoError as e:
        raise ModelNotFoundError(
            f"{repo_id} is gated: accept its license on huggingface.co, then pass "
            "--hf-token or set HF_TOKEN"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"{repo_id}: no such repository on the hub (or it is private: pass --hf-token)"
        ) from e
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(f"{repo_id}: revision {revision!r} does not exist") from e
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"{repo_id}: the hub cannot be reached and the model is not in the local cache; "
            "check the network, or download it elsewhere and pass its folder"
        ) from e
    except HFValidationError as e:
        raise ModelNotFoundError(f"{repo_id}: not a valid hub id ({e})") from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"{repo_id}: download failed: {e}") from e
