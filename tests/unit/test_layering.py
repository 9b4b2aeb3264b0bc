"""The rooms of DESIGN.md: the core never imports Prefect, and stays cheap to import."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import canaryflow

CORE = sorted(
    m.name
    for m in pkgutil.walk_packages(canaryflow.__path__, "canaryflow.")
    if not m.name.endswith("__main__") and m.name != "canaryflow.data.build_suites"
)


def test_no_core_module_imports_prefect_or_mlflow_at_import_time() -> None:
    script = (
        "import importlib, sys\n"
        f"for name in {CORE!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in ('prefect', 'mlflow') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_core_sources_never_name_prefect() -> None:
    root = Path(canaryflow.__file__).parent
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "cli.py"
        and ("import prefect" in path.read_text() or "from prefect" in path.read_text())
    ]
    assert offenders == []


def test_cli_help_is_fast_to_load() -> None:
    script = "import sys, canaryflow.cli; print('prefect' in sys.modules, 'mlflow' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False False"
