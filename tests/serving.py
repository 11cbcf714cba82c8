"""`elm serve` in a process of its own, for the tests that talk to it over HTTP."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from tiny_models import load_smollm2_example, write_tiny_chat_model

STARTUP = 180  # seconds for a server to load its model on a busy 2-core machine
TIMEOUT = 300  # seconds for one answer


class Server:
    """`elm serve ... --port 0` in a process of its own; `url` once it says it is ready."""

    def __init__(self, model_dir: Path, log: Path, *options: str, env: dict | None = None):
        args = ["-m", "elm_mlx.cli.main", "serve", "-m", str(model_dir), "--port", "0"]
        environ = {k: v for k, v in os.environ.items() if k != "ELM_API_KEY"}
        environ.update(HF_HUB_OFFLINE="1", **(env or {}))
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, *args, *options],
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env=environ,
        )
        line = self._line(STARTUP)
        assert line.startswith("elm serve: http://127.0.0.1:"), line
        self.url = line.split()[2]  # http://127.0.0.1:PORT/v1
        self.root = self.url.removesuffix("/v1")

    def _line(self, timeout: float) -> str:
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.proc.kill()
                pytest.fail(f"no output from elm serve in {timeout} s: {self.log.read_text()}")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(TIMEOUT)
            pytest.fail(f"elm serve exited ({self.proc.returncode}): {self.log.read_text()}")
        return line.strip()

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=TIMEOUT)

    def health(self) -> dict:
        return httpx.get(f"{self.root}/health", timeout=TIMEOUT).json()

    def wait_health(self, done, tries: int = 200) -> dict:
        """Poll /health until `done(stats)` (at most `tries` polls, 0.05 s apart)."""
        for _ in range(tries):
            stats = self.health()
            if done(stats):
                return stats
            time.sleep(0.05)
        return stats

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, out


def write_serving_model(folder: Path, context: int) -> Path:
    """The tiny ChatML model (tests/tiny_models.py) with room for `context` tokens."""
    write_tiny_chat_model(folder, "chatml")
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = context  # room for a request that outlives the test
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_endless_model(model_dir: Path, folder: Path) -> Path:
    """A copy of a model with its EOS id outside its vocabulary: a request runs to max_tokens
    (thousands of tokens), so it is still running whenever a test acts on it."""
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = config["vocab_size"]
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["eos_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def smollm2_8bit() -> Path:
    """SmolLM2 converted to 8 bits where `elm chat`'s tests keep it (built once, reused)."""
    from elm_mlx.convert import ConvertOptions, convert

    from elm_mlx.errors import OutputError

    example = load_smollm2_example()
    hf = example.build_hf_folder(example.default_cache_dir())
    out = hf.parent / "smollm2-135m-instruct-8bit"
    if not (out / "config.json").exists():
        try:
            convert(hf, out, ConvertOptions(quantize=True, bits=8), progress=False)
        except OutputError:  # another process converted it meanwhile
            assert (out / "config.json").exists()
    return out
