"""`elm serve` with several models: each loads on its first request while the others answer,
an idle one is unloaded after --ttl (its memory given back: the process's resident set falls)
and reloaded on its next request, --max-loaded unloads the least recently used. A real server
process; the oracles are the models run in this process. It exits cleanly on SIGTERM even
when its threads end late (tests/thread_exit_delay)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlx.core as mx
import psutil
import pytest
from mlx.utils import tree_flatten
from serving import TIMEOUT, Server, write_serving_model
from tiny_models import _write_mlx_folder

from elm_mlx import generate, load
from elm_mlx.loader import build_model
from elm_mlx.tokenizer import encode_prompt, render_chat

WIDE = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}  # fmt: skip  (about 60M float32 parameters: 240 MB, well above the noise of RSS)
WIDE_BYTES = 200 * 2**20
QUESTION = [{"role": "user", "content": "hello there"}]
# the server's threads end late, after the interpreter began to shut down (sitecustomize.py)
LATE_THREAD_EXIT = {
    "PYTHONPATH": os.pathsep.join(
        p
        for p in (str(Path(__file__).parent / "thread_exit_delay"), os.environ.get("PYTHONPATH"))
        if p
    ),
    "ELM_TEST_THREAD_EXIT_DELAY": "0.05",
}


def write_wide_model(small: Path, folder: Path) -> Path:
    """The small model's tokenizer with a wide random model."""
    shutil.copytree(small, folder)
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if k != "head_dim"} | WIDE
    mx.random.seed(1)
    model = build_model(dict(config))
    _write_mlx_folder(folder, dict(tree_flatten(model.parameters())), config)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    small = write_serving_model(root / "small", 1024)
    return small, write_wide_model(small, root / "wide")


def oracle(folder: Path, max_tokens: int) -> str:
    model, tokenizer = load(folder)
    prompt = encode_prompt(tokenizer, render_chat(tokenizer, QUESTION, model.model_type))
    return generate(model, tokenizer, prompt, max_tokens=max_tokens)


def ask(server: Server, model: str) -> str:
    r = httpx.post(
        f"{server.url}/chat/completions",
        json={"model": model, "messages": QUESTION, "max_tokens": 6},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == (model if model != "default" else "small")
    return r.json()["choices"][0]["message"]["content"]


def loaded(server: Server) -> dict[str, bool]:
    data = httpx.get(f"{server.url}/models", timeout=TIMEOUT).json()["data"]
    return {card["id"]: card["loaded"] for card in data}


def rss(server: Server) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


def wait_for(server: Server, want: dict[str, bool], tries: int = 240) -> dict[str, bool]:
    """Poll /v1/models (at most `tries` times, 0.25 s apart) until it shows `want`."""
    for _ in range(tries):
        state = loaded(server)
        if state == want:
            return state
        time.sleep(0.25)
    return state


def test_two_models_idle_unload_and_reload(folders, tmp_path):
    small, wide = folders
    expected = {"small": oracle(small, 6), "wide": oracle(wide, 6)}
    late = LATE_THREAD_EXIT if sys.platform == "linux" else None
    server = Server(small, tmp_path / "serve.txt", "--model", str(wide), "--ttl", "2", env=late)
    try:
        assert loaded(server) == {"small": True, "wide": False}
        before = rss(server)
        with ThreadPoolExecutor(2) as pool:  # the wide one loads while the small one answers
            answers = dict(zip(expected, pool.map(lambda m: ask(server, m), expected), strict=True))
        assert answers == expected
        assert ask(server, "default") == expected["small"]  # "default": the first model
        assert loaded(server) == {"small": True, "wide": True}
        with_wide = rss(server)
        assert with_wide > before + WIDE_BYTES
        assert wait_for(server, {"small": False, "wide": False}) == {"small": False, "wide": False}
        assert rss(server) < with_wide - WIDE_BYTES  # its memory went back to the system
        assert ask(server, "wide") == expected["wide"]  # reloaded on its next request
        assert loaded(server)["wide"]
        r = httpx.post(
            f"{server.url}/chat/completions", json={"model": "nope", "messages": QUESTION}
        )
        assert r.status_code == 404 and "'small', 'wide'" in r.json()["error"]["message"]
    finally:
        code, _ = server.stop(signal.SIGTERM)
    # the loading thread and the workers release MLX's state for them as they end: with it
    # left for their late destructors the process aborts ("terminate called without an
    # active exception", -6) or crashes
    assert code == 0, server.log.read_text()


def test_max_loaded_unloads_the_least_recently_used(folders, tmp_path):
    small, _ = folders
    models = small.parent
    server = Server(small, tmp_path / "serve.txt", "--models-dir", str(models), "--ttl", "0",
                    "--max-loaded", "1")  # fmt: skip
    try:
        # -m small and the folder's two: small is listed once by id, the first
        assert loaded(server) == {"small": True, "wide": False}
        ask(server, "wide")
        assert loaded(server) == {"small": False, "wide": True}
        ask(server, "small")
        assert loaded(server) == {"small": True, "wide": False}
        stats = httpx.get(f"{server.root}/metrics", timeout=TIMEOUT).text
        assert "elm_models_loaded 1.0" in stats
    finally:
        code, _ = server.stop(signal.SIGTERM)
    assert code == 0, server.log.read_text()


RELEASED = """
import threading
import time

import elm_mlx  # noqa: F401
import mlx.core as mx
from elm_mlx.engine.reference import release_thread

ready = threading.Event()


def work():
    mx.eval(mx.random.uniform(shape=(4,)))  # this thread's random key
    release_thread()
    ready.set()
    while True:  # still running as the interpreter shuts down: ended then
        time.sleep(0)


threading.Thread(target=work, daemon=True).start()
ready.wait()
"""


def test_a_released_thread_can_end_as_the_interpreter_shuts_down():
    """After `release_thread` a thread that used MLX leaves its C++ destructors nothing that
    needs the GIL: without it this process aborts every time (MLX 0.32)."""
    result = subprocess.run(
        [sys.executable, "-c", RELEASED], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
