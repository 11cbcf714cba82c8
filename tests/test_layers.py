"""The house, one way down, by folder: models <- the base <- engine <- training and evaluation <-
server and cli, with quantize and convert beside the engine. Checked on the import graph read from the source (imports inside functions
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
# The folders are the layers. The neutral base sits below everything but the models.
BASE = tuple(
    f"elm_mlx.{m}"
    for m in ("errors", "_blas", "hub", "model_folder", "tokenizer", "lora", "dequantize", "loader")
)
ABOVE_MODELS = (
    "elm_mlx.engine",
    "elm_mlx.train",
    "elm_mlx.eval",
    "elm_mlx.server",
    "elm_mlx.cli",
    "elm_mlx.convert",
    "elm_mlx.quantize",
    *(b for b in BASE if b != "elm_mlx.errors"),
)
# a module under the key imports nothing under these prefixes
FORBIDDEN = {
    "elm_mlx.models": ABOVE_MODELS,
    BASE: ("elm_mlx.engine", "elm_mlx.train", "elm_mlx.eval", "elm_mlx.server", "elm_mlx.cli"),
    "elm_mlx.quantize": ("elm_mlx.engine", "elm_mlx.train", "elm_mlx.eval", "elm_mlx.server"),
    "elm_mlx.engine": ("elm_mlx.train", "elm_mlx.eval", "elm_mlx.server", "elm_mlx.convert"),
    "elm_mlx.train": ("elm_mlx.eval", "elm_mlx.server", "elm_mlx.convert"),
    "elm_mlx.eval": ("elm_mlx.train", "elm_mlx.server", "elm_mlx.convert"),
    "elm_mlx.server": ("elm_mlx.train", "elm_mlx.convert"),
    "elm_mlx.convert": ("elm_mlx.engine", "elm_mlx.train", "elm_mlx.server"),
}
# what converting a checkpoint may load at all: the base, the models, quantization, and the
# perplexity report of a calibrated conversion
CONVERT_REACHES = ("elm_mlx.convert", "elm_mlx.models", "elm_mlx.quantize", *BASE)
CONVERT_ALSO = {"elm_mlx", "elm_mlx.eval", "elm_mlx.eval.perplexity"}
MAX_FLAT_MODULES = 14


def under(name: str, prefixes: str | tuple[str, ...]) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


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
    assert "elm_mlx.engine.scheduler" in graph["elm_mlx.server.worker"]
    assert {"elm_mlx.models.base", "elm_mlx.models"} & graph["elm_mlx.models.llama"]


def test_no_import_cycles():
    graph = import_graph()
    assert sorted(name for name in graph if name in reachable(graph, name)) == []


@pytest.mark.parametrize("layer", list(FORBIDDEN), ids=str)
def test_each_layer_imports_only_below_it(layer):
    """Rules over folders: a new module is covered by where it lives."""
    graph = import_graph()
    members = [name for name in graph if under(name, layer)]
    assert members, layer
    for name in members:
        bad = sorted(e for e in graph[name] if under(e, FORBIDDEN[layer]))
        assert not bad, f"{name} imports {bad}"


def test_nothing_imports_the_cli():
    graph = import_graph()
    for name, edges in graph.items():
        if not under(name, "elm_mlx.cli"):
            assert not {e for e in edges if under(e, "elm_mlx.cli")}, name


def test_convert_reaches_only_the_base_models_quantize_and_perplexity():
    graph = import_graph()
    for name in graph:
        if under(name, "elm_mlx.convert"):
            beyond = {
                m for m in reachable(graph, name) if not under(m, CONVERT_REACHES)
            } - CONVERT_ALSO
            assert not beyond, f"{name} reaches {sorted(beyond)}"


def test_the_package_root_stays_small():
    flat = [p for p in PACKAGES["elm_mlx"].glob("*.py") if p.name != "__init__.py"]
    assert len(flat) <= MAX_FLAT_MODULES, sorted(p.name for p in flat)


def test_no_two_modules_share_a_name():
    """A name says what a module holds: the same file name in two folders would be two jobs
    under one name (package __init__ files aside; the CLI's modules are named after the
    commands they implement)."""
    names = [
        path.name
        for name, path in modules().items()
        if path.name != "__init__.py" and not under(name, "elm_mlx.cli")
    ]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_importing_convert_loads_no_engine_or_training():
    loaded = run("import sys, elm_mlx.convert; print(' '.join(sorted(sys.modules)))").split()
    assert not [m for m in loaded if under(m, ("elm_mlx.engine", "elm_mlx.train"))]
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
