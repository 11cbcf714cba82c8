"""Session-wide fixtures: tiny tokenizers and a cache of tiny checkpoints and conversions."""

from __future__ import annotations

import os

# No test may reach the network: an accidental hub lookup must fail fast, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import elm_mlx  # noqa: F401  (OpenBLAS before mlx, torch and transformers)

# isort: split
import pytest
from tiny_checkpoints import TinyModels
from tiny_tokenizers import train_bpe_tokenizer, train_spm_tokenizer

FAMILIES = ("llama", "olmo", "openelm")


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory):
    """Folder with a Llama-style SentencePiece tokenizer.model + tokenizer_config.json."""
    return train_spm_tokenizer(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    """Folder with an OLMo-style byte-level BPE tokenizer.json + tokenizer_config.json."""
    return train_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, spm_tokenizer, bpe_tokenizer):
    """The session's `TinyModels`: each checkpoint and conversion is built once."""
    return TinyModels(tmp_path_factory.mktemp("tiny"), spm_tokenizer, bpe_tokenizer)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
