"""The rooms of docs/architecture.md, checked on the import graph (lazy imports included).

core (`canaryflow/`, minus `canaryflow/app/`) never imports Prefect, `tasks`, `flows` or the app;
`tasks/` never import `flows/` or the app; `flows/` call tasks and read only the core's types and
its pure decision logic; only `canaryflow/app/` starts flows. Every `import` statement counts,
wherever it sits in a file: an import inside a function is an edge like any other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import canaryflow

ROOT = Path(__file__).resolve().parents[2]

# What flows/ may read from the core: contracts, errors, settings and pure decisions, no I/O.
FLOW_CORE_ALLOWED = (
    "canaryflow.contracts",
    "canaryflow.errors",
    "canaryflow.settings",
    "canaryflow.analysis.progress",
)


@dataclass(frozen=True)
class Edge:
    source: str  # file, relative to the project root
    line: int
    target: str  # the imported module

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.target}"


def _module_of(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_edges(root: Path, folders: tuple[str, ...]) -> list[Edge]:
    """Every import in every file under `folders`, relative imports resolved."""
    edges: list[Edge] = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            module = _module_of(path, root)
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    edges.extend(Edge(rel, node.lineno, alias.name) for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = package.split(".")[: len(package.split(".")) - node.level + 1]
                        target = ".".join([*base, node.module] if node.module else base)
                    else:
                        target = node.module or ""
                    # `from a.b import c` is an edge to a.b.c: c may be a module (`from
                    # canaryflow import app`) or a name in a.b, and both sit under a.b
                    edges.extend(
                        Edge(rel, node.lineno, f"{target}.{alias.name}".removesuffix(".*"))
                        for alias in node.names
                    )
    return edges


def _under(target: str, *prefixes: str) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def violations(root: Path) -> list[str]:
    """The layering rule over the project at `root`: one line per forbidden edge."""
    found: list[str] = []
    for edge in import_edges(root, ("canaryflow", "tasks", "flows")):
        src, target = edge.source, edge.target
        if src.startswith("canaryflow/app/") or "/data/" in src:
            continue
        if src.startswith("canaryflow/"):
            if _under(target, "prefect", "tasks", "flows", "canaryflow.app"):
                found.append(f"core: {edge}")
        elif src.startswith("tasks/"):
            if _under(target, "flows", "canaryflow.app"):
                found.append(f"task: {edge}")
        elif src.startswith("flows/") and target != "canaryflow":
            if _under(target, "canaryflow.app"):
                found.append(f"flow: {edge}")
            elif _under(target, "canaryflow") and not _under(target, *FLOW_CORE_ALLOWED):
                found.append(f"flow skips the task layer: {edge}")
    return sorted(set(found))


def test_the_project_holds_its_layers() -> None:
    assert violations(ROOT) == []


def _plant(tmp_path: Path, relative: str, source: str) -> Path:
    for folder in ("canaryflow/app", "canaryflow/analysis", "tasks", "flows"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "canaryflow" / "__init__.py").write_text("")
    target = tmp_path / relative
    target.write_text(source)
    return tmp_path


@pytest.mark.parametrize(
    ("relative", "source", "expected"),
    [
        ("canaryflow/analysis/x.py", "def f():\n    import prefect\n", "core:"),
        ("canaryflow/analysis/x.py", "from flows.release import release\n", "core:"),
        ("canaryflow/analysis/x.py", "from canaryflow.app import cli\n", "core:"),
        ("canaryflow/analysis/x.py", "from ..app.demo import run_demo\n", "core:"),
        ("canaryflow/analysis/x.py", "from canaryflow import app\n", "core:"),
        ("tasks/x.py", "def f():\n    from flows import release\n", "task:"),
        ("flows/x.py", "from canaryflow.runbook import preflight\n", "flow skips"),
        ("flows/x.py", "from canaryflow import connections\n", "flow skips"),
    ],
)
def test_a_planted_upward_import_is_found(
    tmp_path: Path, relative: str, source: str, expected: str
) -> None:
    root = _plant(tmp_path, relative, source)
    found = violations(root)
    assert len(found) >= 1 and found[0].startswith(expected), found


def test_allowed_imports_are_not_reported(tmp_path: Path) -> None:
    root = _plant(
        tmp_path,
        "flows/x.py",
        "from prefect import flow\nfrom canaryflow.contracts import Routes\n"
        "from canaryflow.analysis.progress import observe\nfrom tasks.x import y\n",
    )
    (root / "canaryflow/app/cli.py").write_text("from flows.release import release\n")
    assert violations(root) == []


def test_core_modules_do_not_load_prefect_or_mlflow_at_import_time() -> None:
    core = sorted(
        _module_of(p, ROOT)
        for p in (ROOT / "canaryflow").rglob("*.py")
        if "app" not in p.parts and p.name != "__main__.py" and "data" not in p.parts
    )
    script = (
        "import importlib, sys\n"
        f"for name in {core!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in ('prefect', 'mlflow') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_cli_help_is_fast_to_load() -> None:
    script = (
        "import sys, canaryflow.app.cli; print('prefect' in sys.modules, 'mlflow' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "False False"


def test_the_core_top_level_is_grouped() -> None:
    flat = sorted(p.name for p in Path(canaryflow.__file__).parent.glob("*.py"))
    assert len(flat) <= 14, flat


def room_graph(root: Path) -> dict[str, set[str]]:
    """Which rooms of the core (first-level packages and flat modules) import which."""
    graph: dict[str, set[str]] = {}
    for edge in import_edges(root, ("canaryflow",)):
        parts = edge.source.split("/")
        source = parts[1].removesuffix(".py")
        target = edge.target.split(".")
        if source in ("app", "data", "__init__") or target[0] != "canaryflow" or len(target) < 2:
            continue
        if target[1] != source:
            graph.setdefault(source, set()).add(target[1])
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                found.append([*path[path.index(nxt) :], nxt])
            elif len(path) < len(graph) + 1:
                walk(nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, [start])
    return found


def test_the_core_rooms_import_each_other_one_way() -> None:
    """e.g. dataplane may use quality's checkers, so quality must not reach into dataplane."""
    assert cycles(room_graph(ROOT)) == []


def test_a_planted_cycle_between_rooms_is_found(tmp_path: Path) -> None:
    root = _plant(tmp_path, "canaryflow/analysis/x.py", "from canaryflow.stats import y\n")
    (root / "canaryflow/stats").mkdir()
    (root / "canaryflow/stats/y.py").write_text("def f():\n    from canaryflow.analysis import x\n")
    assert ["analysis", "stats", "analysis"] in cycles(room_graph(root))


def environment_writes(root: Path) -> list[str]:
    """Writes to os.environ in the core outside a process's own `main` (an entry point)."""
    found: list[str] = []
    for path in sorted((root / "canaryflow").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("canaryflow/app/"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        mains = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "main"]
        in_main = {id(n) for m in mains for n in ast.walk(m)}
        for node in ast.walk(tree):
            if id(node) in in_main:
                continue
            text = ast.unparse(node) if isinstance(node, ast.Assign | ast.Call) else ""
            writes = isinstance(node, ast.Assign) and any(
                "os.environ[" in ast.unparse(t) for t in node.targets
            )
            calls = isinstance(node, ast.Call) and text.startswith(
                ("os.environ.setdefault", "os.environ.update", "os.putenv", "os.environ.pop")
            )
            if writes or calls:
                found.append(f"{rel}:{node.lineno} {text}")
    return found


def test_the_library_never_writes_the_environment() -> None:
    assert environment_writes(ROOT) == []


def test_a_planted_environment_write_is_found(tmp_path: Path) -> None:
    root = _plant(
        tmp_path, "canaryflow/analysis/x.py", "import os\n\ndef f():\n    os.environ['A'] = '1'\n"
    )
    assert len(environment_writes(root)) == 1
