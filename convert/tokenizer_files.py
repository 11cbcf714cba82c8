"""Find the tokenizer a converted folder needs: the checkpoint's own, one named by the user, or
the family's known source for checkpoints that ship none (OpenELM)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .. import hub
from ..errors import ElmError, TokenizerError
from ..model_folder import has_tokenizer
from ..models import Family


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_tokenizer(
    source: Path,
    family: Family,
    tokenizer: str | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> Path:
    """The folder (or tokenizer.model file) whose tokenizer the converted model gets."""
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        if path.is_file() or (path.is_dir() and has_tokenizer(path)):
            return path
        if path.exists():
            raise TokenizerError(f"{path} holds no tokenizer.json or tokenizer.model")
        patterns = ["tokenizer*", "special_tokens_map.json", "*.jinja", "generation_config.json"]
        folder = hub.resolve(tokenizer, None, token, allow_patterns=patterns)
        if not has_tokenizer(folder):
            raise TokenizerError(f"{tokenizer} holds no tokenizer.json or tokenizer.model")
        return folder
    if has_tokenizer(source):
        return source
    known = family.tokenizer
    if known is None:
        raise TokenizerError(
            f"{source} has no tokenizer files; pass --tokenizer PATH_OR_REPO naming one"
        )
    tried = []
    for repo in known.repos:
        try:
            folder = hub.resolve(repo, None, token, allow_patterns=[known.filename])
        except ElmError as e:
            tried.append(f"{repo}: {e}")
            continue
        candidate = folder / known.filename
        if candidate.exists() and sha256(candidate) == known.sha256:
            return candidate
        tried.append(f"{repo}: {known.filename} missing or not the expected file")
    raise TokenizerError(
        f"{family.model_type} checkpoints ship no tokenizer and none of the known copies of "
        "theirs could be had:\n  " + "\n  ".join(tried) + "\nPass --tokenizer PATH_OR_REPO: a "
        f"folder or {known.filename} file of that tokenizer (sha256 {known.sha256})."
    )
