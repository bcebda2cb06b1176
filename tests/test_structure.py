"""The import picture runs one way: cli -> serving -> pipelines -> tasks -> bmoe (and storage
beside them). Read from the source with ast, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
# package -> the project packages it must never import
FORBIDDEN = {
    "bmoe": {"tasks", "pipelines", "serving", "cli", "storage", "ray", "mlflow"},  # the method: torch, numpy, scipy
    "storage": {"bmoe", "tasks", "pipelines", "serving", "cli"},
    "tasks": {"pipelines", "serving", "cli"},
    "pipelines": {"serving", "cli"},
    "serving": {"cli"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_back_up(package):
    wrong = {f"{path.relative_to(PROJECT)} imports {', '.join(sorted(imported_roots(path) & FORBIDDEN[package]))}"
             for path in (PROJECT / package).rglob("*.py") if imported_roots(path) & FORBIDDEN[package]}
    assert not wrong, sorted(wrong)
