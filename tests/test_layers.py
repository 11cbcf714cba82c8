"""The house, one way down: models <- engine <- training and evaluation <- cli, with convert
beside the engine. Checked on the import graph read from the source (imports inside functions
included) and on what real processes load."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "elm_mlx": ROOT / "elm_mlx",
    "elm_mlx.convert": ROOT / "convert",
    "elm_mlx.cli": ROOT / "cli",
}
ENGINE = {
    "elm_mlx.engine.generation",
    "elm_mlx.engine.config",
    "elm_mlx.engine.reference",
    "elm_mlx.engine.speculative",
    "elm_mlx.engine.draft",
    "elm_mlx.engine.sampling",
    "elm_mlx.engine.chat_session",
    "elm_mlx.engine.scheduler",
    "elm_mlx.engine.batch_kv",
    "elm_mlx.engine.prompt_prefill",
    "elm_mlx.engine.spec_budget",
    "elm_mlx.engine.rows",
    "elm_mlx.engine.prompt_cache",
}
TRAINING = {
    "elm_mlx.train.trainer",
    "elm_mlx.train.finetune",
    "elm_mlx.train.dataset",
    "elm_mlx.train.losses",
}
BELOW_ENGINE = ("elm_mlx.models", "elm_mlx.convert", "elm_mlx.quantize")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its source."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import mod` imports the submodule when there is one
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_graph_is_read():
    graph = import_graph()
    assert "elm_mlx.engine.generation" in graph["elm_mlx.engine.chat_session"]
    assert "elm_mlx.engine.reference" in graph["elm_mlx.engine.speculative"]
    assert {"elm_mlx.models.base", "elm_mlx.models"} & graph["elm_mlx.models.llama"]


def test_no_import_cycles():
    graph = import_graph()
    assert sorted(name for name in graph if name in reachable(graph, name)) == []


def test_the_server_sits_above_the_engine():
    """Only the CLI imports the server; the server imports the engine (batch.py)."""
    graph = import_graph()
    assert "elm_mlx.engine.scheduler" in graph["elm_mlx.server.worker"]
    for name, edges in graph.items():
        if not name.startswith(("elm_mlx.server", "elm_mlx.cli")):
            assert not {e for e in edges if e.startswith("elm_mlx.server")}, name


def test_nothing_imports_the_cli():
    graph = import_graph()
    for name, edges in graph.items():
        if not name.startswith("elm_mlx.cli"):
            assert not {e for e in edges if e.startswith("elm_mlx.cli")}, name


def test_models_convert_and_quantize_stay_below_the_engine():
    graph = import_graph()
    for name in graph:
        if name.startswith(BELOW_ENGINE) or name == "elm_mlx.model_folder":
            above = reachable(graph, name) & (ENGINE | TRAINING)
            assert not above, f"{name} reaches {sorted(above)}"


def run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_importing_convert_loads_no_engine_or_training():
    loaded = run("import sys, elm_mlx.convert; print(' '.join(sorted(sys.modules)))").split()
    assert not set(loaded) & (ENGINE | TRAINING)
    assert "elm_mlx.convert.convert" in loaded


@pytest.mark.parametrize("module", ["elm_mlx.engine.lookup", "elm_mlx.engine.stops"])
def test_pure_python_modules_load_without_mlx(module):
    loaded = run(f"import sys, {module}; print(' '.join(sorted(sys.modules)))").split()
    assert module in loaded and "mlx" not in loaded and "mlx.core" not in loaded


def test_public_names_resolve_lazily():
    out = run(
        "import sys, elm_mlx; before = 'elm_mlx.engine.generation' in sys.modules; "
        "from elm_mlx import generate, load, GenerationConfig; "
        "print(before, callable(generate), generate.__module__, load.__module__)"
    )
    assert out.split() == ["False", "True", "elm_mlx.engine.generation", "elm_mlx.loader"]
