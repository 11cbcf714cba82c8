"""`elm eval` and the lm-eval model `elm`, against lm-eval's own `hf` model (transformers) on the
same tiny random Llama: the same log-likelihoods (within 1e-3), rolling log-likelihoods and
generations, and the same accuracies on local tasks. Also the command line in real processes,
`mlx.launch -n 2` against one process, adapters, and the bad-input messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import elm_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from elm_mlx.cli.main import app
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from oracles import free_port_pair
from tiny_data import EVAL_TASKS, write_eval_tasks
from tiny_tokenizers import CORPUS
from typer.testing import CliRunner

from elm_mlx import load
from elm_mlx.eval.lm_eval_model import ElmLM, run_tasks, task_manager
from elm_mlx.eval.loglikelihood import EvalConfig, owners
from elm_mlx.eval.perplexity import perplexity
from elm_mlx.lora import LoRAConfig, LoRALinear, apply_lora, save_adapters
from elm_mlx.train.fuse import fuse

runner = CliRunner()
TEXT = "\n".join(CORPUS * 3)


@pytest.fixture(scope="module")
def llama(tiny):
    """(HF folder, converted MLX folder) of the tiny Llama."""
    return tiny.hf("llama"), tiny.converted("llama")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_eval_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


def hf_lm(folder, **options) -> HFLM:
    return HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=4, **options)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


LOGLIKELIHOOD = [
    ("the quick brown fox", " jumps over"),
    ("the quick brown fox", " jumps over"),  # a duplicate: scored once, reported twice
    ("the quick brown fox", " sleeps"),
    ("the quick brown fox ", "jumps"),  # lm-eval moves the trailing space
    ("", "the capital of france is paris"),  # empty context: BOS stands in
    ("to be or not to be", " that is the question"),
    ("one", " two"),  # one-token context: nothing to prefill
    (" ".join(CORPUS), " alpha beta gamma"),  # longer than max_length=24 below: truncated
]


@pytest.mark.parametrize("max_length", [None, 24])
def test_loglikelihoods_equal_lm_eval_hf(llama, max_length):
    hf_dir, mlx_dir = llama
    options = {"max_length": max_length} if max_length else {}
    expected = hf_lm(hf_dir, **options).loglikelihood(requests("loglikelihood", LOGLIKELIHOOD))
    got = ElmLM(mlx_dir, batch_size=2, **options).loglikelihood(
        requests("loglikelihood", LOGLIKELIHOOD)
    )
    np.testing.assert_allclose([g[0] for g in got], [e[0] for e in expected], atol=1e-3)
    assert [g[1] for g in got] == [e[1] for e in expected]
    assert got[0] == got[1]
    assert len({round(g[0], 3) for g in got}) == len(got) - 1  # nothing else collapsed


def test_rolling_loglikelihoods_equal_lm_eval_hf(llama):
    """Windows of 16 tokens: every text spans several, the last with a full context."""
    hf_dir, mlx_dir = llama
    texts = [(t,) for t in (TEXT[:40], TEXT[:300], CORPUS[4], "")]
    expected = hf_lm(hf_dir, max_length=16).loglikelihood_rolling(
        requests("loglikelihood_rolling", texts)
    )
    got = ElmLM(mlx_dir, max_length=16).loglikelihood_rolling(
        requests("loglikelihood_rolling", texts)
    )
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert got[1] < got[0] < 0


def test_generate_until_equals_lm_eval_hf_and_stops(llama):
    hf_dir, mlx_dir = llama
    lm = ElmLM(mlx_dir)
    free = lm.generate_until(
        requests("generate_until", [("the capital of", {"until": [], "max_gen_toks": 12})])
    )[0]
    assert len(lm.tok_encode(free, add_special_tokens=False)) >= 10  # ran to max_gen_toks
    stop = free[len(free) // 2 : len(free) // 2 + 2]  # a string the free run produces
    assert stop.strip() and free.find(stop) > 0
    args = [
        ("the capital of", {"until": [stop], "max_gen_toks": 12}),
        ("the capital of", {"until": ["zzz"], "max_gen_toks": 3}),
        ("the quick brown", {"until": ["\n", " "], "max_gen_toks": 8, "do_sample": False}),
        ("one two three", {"until": "e", "max_gen_toks": 10}),
    ]
    got = lm.generate_until(requests("generate_until", args))
    assert got[0] == free[: free.find(stop)]
    assert free.startswith(got[1]) and 0 < len(got[1]) < len(free)  # cut at 3 tokens
    assert " " not in got[2] and "e" not in got[3]
    assert got == hf_lm(hf_dir).generate_until(requests("generate_until", args))


@pytest.fixture(scope="module")
def hf_results(llama, tasks):
    """lm-eval's `hf` model on the local tasks, samples logged."""
    manager = task_manager(tasks, EVAL_TASKS)
    return simple_evaluate(model=hf_lm(llama[0]), tasks=list(EVAL_TASKS), task_manager=manager)


def test_task_results_equal_lm_eval_hf(llama, tasks, hf_results):
    manager = task_manager(tasks, EVAL_TASKS)
    got = simple_evaluate(model=ElmLM(llama[1], batch_size=3), tasks=list(EVAL_TASKS),
                          task_manager=manager)  # fmt: skip
    for task in EVAL_TASKS:
        ours, theirs = got["samples"][task], hf_results["samples"][task]
        assert len(ours) == len(theirs) == 12
        for a, b in zip(ours, theirs, strict=True):
            assert a["doc_id"] == b["doc_id"]
            if task == "tiny_gen":
                assert a["resps"] == b["resps"]
                continue
            flat = [np.ravel(r[0]).astype(float) for r in (a["resps"], b["resps"])]
            np.testing.assert_allclose(*flat, atol=1e-3)
    for task, metrics in hf_results["results"].items():
        for key, value in metrics.items():
            if key.startswith("acc") and "stderr" not in key:
                assert got["results"][task][key] == value, (task, key)
            elif isinstance(value, float) and "stderr" not in key:
                assert got["results"][task][key] == pytest.approx(value, rel=1e-3), (task, key)
    assert 0 < got["results"]["tiny_mc"]["acc,none"] < 1  # not a degenerate comparison


def elm_eval(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["elm", "eval", *args], capture_output=True, text=True, timeout=600,
                          **kwargs)  # fmt: skip


def test_cli_in_a_real_process(llama, tasks, text_file, tmp_path):
    mlx_dir = llama[1]
    out = tmp_path / "results.json"
    done = elm_eval(
        ["-m", str(mlx_dir), "--perplexity", str(text_file), "--perplexity", "-",
         "--window", "64", "--stride", "32", "--tasks", "tiny_mc,tiny_rolling",
         "--include-path", str(tasks), "--limit", "8", "--output", str(out)],
        input=CORPUS[0] * 40,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"{text_file}: " in done.stdout and "-: " in done.stdout
    assert "tiny_mc" in done.stdout and "acc" in done.stdout
    report = json.loads(out.read_text())
    model, tokenizer = load(mlx_dir)
    for entry, text in zip(report["perplexity"], (TEXT, CORPUS[0] * 40), strict=True):
        expected = perplexity(model, tokenizer, text, window=64, stride=32)
        assert entry["tokens"] == expected.tokens
        assert entry["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
        assert entry["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
        assert f"{expected.tokens} tokens, perplexity {expected.perplexity:.4f}" in done.stdout
    lm = ElmLM(mlx_dir)
    expected = run_tasks(lm, ["tiny_mc", "tiny_rolling"], task_manager(tasks, EVAL_TASKS), limit=8)
    assert report["tasks"]["results"] == json.loads(json.dumps(expected["results"]))
    assert report["tasks"]["n-samples"]["tiny_mc"]["effective"] == 8


def test_two_processes_give_the_results_of_one(llama, tasks, text_file, tmp_path):
    launch = shutil.which("mlx.launch")
    assert launch, "mlx.launch comes with mlx"
    options = ["-m", str(llama[1]), "--perplexity", str(text_file), "--window", "48",
               "--tasks", ",".join(EVAL_TASKS), "--include-path", str(tasks), "--batch-size", "3"]  # fmt: skip
    one = elm_eval([*options, "--output", str(tmp_path / "one.json")])
    assert one.returncode == 0, one.stderr
    command = [launch, "-n", "2", "--backend", "ring", "--starting-port", str(free_port_pair()),
               "--", shutil.which("elm"), "eval", *options, "--output", str(tmp_path / "two.json")]  # fmt: skip
    two = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "evaluating on 2 processes" in two.stdout
    assert two.stdout.count("tiny_rolling") == 1  # one table: only the first process prints
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["perplexity"][0]["tokens"] == b["perplexity"][0]["tokens"]
    assert a["perplexity"][0]["perplexity"] == pytest.approx(b["perplexity"][0]["perplexity"],
                                                             rel=1e-5)  # fmt: skip
    for task in EVAL_TASKS:
        for key, value in a["tasks"]["results"][task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert b["tasks"]["results"][task][key] == pytest.approx(value, rel=1e-4), key


@pytest.fixture(scope="module")
def adapter(llama, tmp_path_factory):
    """A random (as if trained) LoRA adapter on the tiny Llama, and the fused model."""
    root = tmp_path_factory.mktemp("adapter")
    model, _ = load(llama[1])
    mx.random.seed(3)
    config = LoRAConfig(rank=4, alpha=8)
    apply_lora(model, config)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = 0.2 * mx.random.normal(m.lora_b.shape)
    save_adapters(model, root / "adapter", config)
    return root / "adapter", fuse(llama[1], root / "adapter", root / "fused")


def test_adapter_without_fusing_equals_the_fused_model(llama, tasks, text_file, adapter,
                                                       tmp_path):  # fmt: skip
    adapter_dir, fused_dir = adapter
    out = tmp_path / "adapter.json"
    done = elm_eval(["-m", str(llama[1]), "--adapter", str(adapter_dir), "--perplexity",
                     str(text_file), "--tasks", "tiny_ll", "--include-path", str(tasks),
                     "--output", str(out)])  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    base, fused = load(llama[1]), load(fused_dir)
    with_adapter = report["perplexity"][0]["perplexity"]
    assert with_adapter == pytest.approx(perplexity(*fused, TEXT).perplexity, rel=1e-4)
    assert abs(with_adapter / perplexity(*base, TEXT).perplexity - 1) > 0.01
    manager = task_manager(tasks, ["tiny_ll"])
    expected = run_tasks(ElmLM(fused_dir), ["tiny_ll"], manager)["results"]["tiny_ll"]
    unadapted = run_tasks(ElmLM(llama[1]), ["tiny_ll"], manager)["results"]["tiny_ll"]
    got = report["tasks"]["results"]["tiny_ll"]
    assert got["perplexity,none"] == pytest.approx(expected["perplexity,none"], rel=1e-3)
    assert got["perplexity,none"] != pytest.approx(unadapted["perplexity,none"], rel=1e-2)


def test_lm_eval_command_line_runs_elm(llama, tasks):
    """lm-eval's own CLI with `--model elm`; installed lm-eval releases that read entry points
    find the class from the `lm_eval.models` entry point this package declares."""
    from importlib.metadata import entry_points

    (point,) = [ep for ep in entry_points(group="lm_eval.models") if ep.name == "elm"]
    assert point.load() is ElmLM
    done = subprocess.run(
        [sys.executable, "-m", "elm_mlx.eval.lm_eval_cli", "--model", "elm", "--model_args",
         f"model={llama[1]}", "--batch_size", "2", "--tasks", "tiny_mc", "--include_path",
         str(tasks), "--limit", "4"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "tiny_mc" in done.stdout and "acc" in done.stdout


def test_work_is_split_evenly_and_the_same_everywhere():
    costs = [5, 1, 9, 3, 3, 7, 2, 8]
    owner = owners(costs, 2)
    assert owner == owners(costs, 2) and set(owner) == {0, 1}
    loads = [sum(c for c, o in zip(costs, owner, strict=True) if o == r) for r in (0, 1)]
    assert abs(loads[0] - loads[1]) <= 1
    assert owners(costs, 1) == [0] * len(costs)


def test_help_shows_the_options_and_their_defaults():
    result = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in ("--perplexity", "--window", "--stride", "--tasks", "--include-path",
                   "--limit", "--num-fewshot", "--batch-size", "--output", "--adapter"):  # fmt: skip
        assert option in result.stdout
    assert f"[default: {EvalConfig().batch_size}]" in result.stdout


# ---------------------------------------------------------------------------- bad input


def invoke(args: list[str], **kwargs):
    result = runner.invoke(app, ["eval", *args], **kwargs)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ")
    return result.stderr


def test_unknown_task_names_close_matches(llama, tasks):
    message = invoke(["-m", str(llama[1]), "--tasks", "tiny_mcc", "--include-path", str(tasks)])
    assert "unknown task 'tiny_mcc'; close matches: tiny_mc" in message
    message = invoke(["-m", str(llama[1]), "--tasks", "hellaswg"])
    assert "unknown task 'hellaswg'; close matches: hellaswag" in message


def test_perplexity_bad_input(llama, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    message = invoke(["-m", str(llama[1]), "--perplexity", str(empty)])
    assert f"{empty} has 1 token: perplexity needs at least 2" in message
    message = invoke(["-m", str(llama[1]), "--perplexity", str(tmp_path / "missing.txt")])
    assert "cannot read --perplexity" in message and "missing.txt" in message
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    message = invoke(["-m", str(llama[1]), "--perplexity", str(text), "--window", "8",
                      "--stride", "9"])  # fmt: skip
    assert message.startswith("error: --stride must be between 1 and the window (8)")
    assert "nothing to evaluate" in invoke(["-m", str(llama[1])])
    message = invoke(["-m", str(llama[1]), "--tasks", "x", "--include-path", str(empty)])
    assert "is not a folder of task YAMLs" in message


def test_lm_eval_missing_says_how_to_install(llama):
    """lm-eval made unimportable in a real process (as if not installed)."""
    code = ("import sys; sys.modules['lm_eval'] = None; "
            "from elm_mlx.cli.main import main; sys.argv[0] = 'elm'; main()")  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", code, "eval", "-m", str(llama[1]), "--tasks", "arc_easy"],
        capture_output=True, text=True, timeout=300, env={**os.environ},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "lm-evaluation-harness, which is not installed: pip install 'elm-mlx[eval]'" in (
        done.stderr
    )
