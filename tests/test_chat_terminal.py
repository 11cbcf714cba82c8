"""`elm chat` driven as a person drives it: the real program in a pseudo-terminal (pexpect),
talking to the real SmolLM2-135M-Instruct (8-bit, greedy), typing, pasting and pressing Ctrl-C
and Ctrl-D. What is checked is what the person sees on the screen and what /save writes."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "smollm2.py"
TIMEOUT = 300  # seconds for one answer on a slow, shared 2-core machine
# A prompt being drawn: prompt_toolkit turns bracketed paste on whenever it starts reading a line
# (and redraws the line as it is edited, so ">>>" alone also shows up before an answer).
PROMPT = r"\x1b\[\?2004h.*?>>>"
STATS = r"\[(\d+) tokens, [\d.]+ tok/s · prompt (\d+) new \+ (\d+) cached tokens[^\]]*\]"
# the numbers of an answer that was not interrupted
FINISHED = (
    r"\[(\d+) tokens, [\d.]+ tok/s · prompt (\d+) new \+ (\d+) cached tokens, [\d.]+ s"
    r"(?: · max_tokens reached)?\]"
)
# a prompt after a Ctrl-C: at most one more token of the answer, then its numbers and the prompt
AFTER_CTRL_C = 120
# The answer's live tokens/s is drawn after the text between save/restore-cursor escapes.
LIVE_RATE = re.compile(r"\x1b7.*?\x1b8")
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """SmolLM2 converted to 8 bits in the cache scripts/demo.sh uses (built once, reused)."""
    from elm_mlx.convert import ConvertOptions, convert

    from elm_mlx.errors import OutputError

    spec = importlib.util.spec_from_file_location("smollm2_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    smollm2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smollm2)
    hf = smollm2.build_hf_folder(smollm2.default_cache_dir())
    out = hf.parent / "smollm2-135m-instruct-8bit"
    if not (out / "config.json").exists():
        try:
            convert(hf, out, ConvertOptions(quantize=True, bits=8), progress=False)
        except OutputError:  # another process converted it meanwhile
            assert (out / "config.json").exists()
    return out


def screen(text: str) -> str:
    """What the terminal shows, without colours and the transient tokens/s label."""
    return ESCAPE.sub("", LIVE_RATE.sub("", text)).replace("\r", "")


class Person:
    """Types into `elm chat` and reads the screen."""

    def __init__(self, model_dir: Path, home: Path, *options: str):
        env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
        # ELM_MLX_CACHE: the input history goes there, not into the user's
        env.update(TERM="xterm-256color", HF_HUB_OFFLINE="1", ELM_MLX_CACHE=str(home))
        env["PROMPT_TOOLKIT_NO_CPR"] = "1"  # pexpect answers no cursor position requests
        args = ["-m", "elm_mlx.cli.main", "chat", "-m", str(model_dir), *options]
        self.child = pexpect.spawn(
            sys.executable, args, env=env, encoding="utf-8", timeout=TIMEOUT, dimensions=(50, 200)
        )
        self.child.expect(PROMPT)

    def say(self, text: str) -> tuple[str, re.Match]:
        """Send a message; return the answer as shown and the match of its numbers line."""
        self.child.sendline(text)
        self.child.expect(STATS)
        shown = screen(self.child.before)
        numbers = self.child.match
        self.child.expect(PROMPT)
        return shown.rsplit(text, 1)[-1].strip(), numbers  # after the line's last redraw

    def command(self, text: str) -> str:
        self.child.sendline(text)
        self.child.expect(PROMPT)
        return screen(self.child.before)

    def leave(self) -> None:
        self.child.sendeof()  # Ctrl-D
        self.child.expect(pexpect.EOF)
        self.child.close()
        assert self.child.exitstatus == 0


def messages(path: Path) -> list[dict[str, str]]:
    return json.loads(path.read_text())["messages"]


def test_context_is_kept_reset_forgets_save_load_restores(model_dir, tmp_path):
    person = Person(model_dir, tmp_path, "--max-tokens", "24")
    person.say("Remember the word: banana.")
    answer, numbers = person.say("Which word did I ask you to remember?")
    assert "banana" in answer.lower()
    # the second turn fed only its own tokens: the first turn came from the cache
    new, cached = int(numbers.group(2)), int(numbers.group(3))
    assert cached > new > 0
    saved = tmp_path / "banana.json"
    assert "saved 4 messages" in person.command(f"/save {saved}")

    assert "conversation cleared" in person.command("/reset")
    answer, numbers = person.say("Which word did I ask you to remember?")
    assert "banana" not in answer.lower()

    assert "loaded 4 messages" in person.command(f"/load {saved}")
    answer, _ = person.say("Which word did I ask you to remember?")
    assert "banana" in answer.lower()
    stats = person.command("/stats")
    assert re.search(r"cache: \d+ tokens, [\d.]+ MB", stats)
    assert re.search(r"memory: [\d.]+ GB in use", stats)
    assert "cache:" in person.command("\x1b[A")  # arrow up: the previous line (/stats) again
    person.leave()
    assert "Remember the word: banana." in (tmp_path / "chat_history").read_text()
    assert [m["role"] for m in messages(saved)] == ["user", "assistant"] * 2
    assert "banana" in messages(saved)[3]["content"].lower()


def test_ctrl_c_stops_the_answer_and_keeps_the_session(model_dir, tmp_path):
    person = Person(model_dir, tmp_path, "--max-tokens", "400")
    child = person.child
    child.sendline("Tell me a long story about a dragon.")
    child.expect("tok/s")  # the answer is streaming, with its live speed
    child.expect("tok/s")
    child.sendintr()  # Ctrl-C
    child.expect(r"\[\d+ tokens[^\]]* · interrupted\]")
    child.expect(PROMPT)

    child.sendintr()  # Ctrl-C at the prompt only clears the line
    child.expect(PROMPT)
    # a paste of two lines (no bracketed-paste mode here) is one message
    child.send("What was the story about?\rAnswer in one sentence.")
    child.sendline("")
    child.expect(STATS)
    numbers = child.match
    child.expect(PROMPT)
    assert int(numbers.group(3)) > 0  # the interrupted turn's tokens were reused

    saved = tmp_path / "story.json"
    person.command(f"/save {saved}")
    person.leave()
    story, follow_up = messages(saved)[1], messages(saved)[2]
    assert story["role"] == "assistant" and story["content"]  # the partial answer was kept
    assert follow_up["content"] == "What was the story about?\nAnswer in one sentence."


@contextlib.contextmanager
def busy_machine() -> Iterator[None]:
    """Every core spinning in another process, so that `elm chat` is descheduled at any moment."""
    spin = [sys.executable, "-c", "while True: pass"]
    hogs = [subprocess.Popen(spin) for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


# The prompt of `elm chat` alone, echoing each message it reads.
ECHO_PROMPT = """
import sys
from pathlib import Path
from elm_mlx.cli.terminal import Interrupts, LineReader
with Interrupts() as interrupts:
    reader = LineReader(Path(sys.argv[1]), ["/help"], True, interrupts.prompt_drawn)
    while True:
        try:
            print(f"read {reader.read()!r}")
        except KeyboardInterrupt:
            continue
        except EOFError:
            break
"""


def test_ctrl_c_at_the_prompt_comes_in_order_with_the_keys(tmp_path):
    """Ctrl-C the moment a prompt is drawn, then a line typed at once, hundreds of times on a
    loaded machine: every Ctrl-C gives a fresh prompt and every line after it is read (a Ctrl-C
    that waited, as Python's readline lets one wait, would take the next line with it)."""
    env = {**os.environ, "TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(
        sys.executable, ["-c", ECHO_PROMPT, str(tmp_path / "history")],
        env=env, encoding="utf-8", timeout=TIMEOUT, dimensions=(50, 200),
    )  # fmt: skip
    child.delaybeforesend = None
    child.expect(PROMPT)
    with busy_machine():
        for i in range(300):
            child.sendintr()
            child.sendline(f"line {i}")
            child.expect(PROMPT)  # the fresh line after Ctrl-C
            child.expect(f"read 'line {i}'")
            child.expect(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)


def test_a_second_ctrl_c_is_never_lost(model_dir, tmp_path):
    """A Ctrl-C at many moments after a first one stopped an answer (while the answer stops and
    its cache is trimmed, while its numbers print, while the prompt is drawn, at the prompt), on
    a quiet and on a loaded machine: each time the chat is at a prompt that takes the next line,
    and afterwards a plain turn answers with the whole conversation kept."""
    person = Person(model_dir, tmp_path, "--max-tokens", "400")
    child = person.child
    child.delaybeforesend = None  # the delays below are the only ones between two keys
    delays = [0.0, 0.002, 0.01, 0.03, 0.1, 0.3]
    rounds = 0
    for machine in (contextlib.nullcontext, busy_machine):
        with machine():
            for delay in delays:
                child.sendline(f"Tell me a long story about dragon number {rounds + 1}.")
                child.expect("tok/s")  # streaming
                child.expect("tok/s")
                child.sendintr()
                time.sleep(delay)  # the moment under test, not a wait for the program
                child.sendintr()
                rounds += 1
                # a command typed now is read and run: the second Ctrl-C was not held back
                child.sendline("/stats")
                child.expect(rf"conversation: {2 * rounds} messages;", timeout=AFTER_CTRL_C)
                child.expect(PROMPT)

    person.command("/set max_tokens 30")
    child.sendline("What was the first story about? Answer in one sentence.")
    child.expect(FINISHED)
    numbers = child.match
    child.expect(PROMPT)
    assert int(numbers.group(3)) > int(numbers.group(2)) > 0  # the conversation came from the cache
    saved = tmp_path / "dragons.json"
    person.command(f"/save {saved}")
    person.leave()
    kept = messages(saved)
    assert [m["role"] for m in kept] == ["user", "assistant"] * (rounds + 1)
    assert all(m["content"] for m in kept)  # every stopped answer kept what it had said
    assert kept[0]["content"] == "Tell me a long story about dragon number 1."


def test_context_overflow_drops_old_turns(model_dir, tmp_path):
    system = "You are a helpful assistant."
    person = Person(
        model_dir, tmp_path, "--max-context", "100", "--max-tokens", "24", "--system", system
    )
    questions = [
        "What is the capital of France?",
        "What is the capital of Italy?",
        "What is the capital of Spain?",
        "What is the capital of Germany?",
        "What is the capital of Japan?",
    ]
    notices = 0
    for q in questions:
        person.child.sendline(q)
        index = person.child.expect([r"context full: dropped the \d+ oldest messages", STATS])
        if index == 0:
            notices += 1
            person.child.expect(STATS)
        person.child.expect(PROMPT)
    saved = tmp_path / "overflow.json"
    person.command(f"/save {saved}")
    person.leave()
    assert notices > 0
    kept = messages(saved)
    assert kept[0] == {"role": "system", "content": system}
    users = [m["content"] for m in kept if m["role"] == "user"]
    assert users == questions[-len(users) :] and len(users) < len(questions)
