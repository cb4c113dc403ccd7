"""The dependency direction `flows -> tasks -> dmtp` (STYLE.md convention 1), and light imports.

dmtp runs every stage without Prefect, so it never imports prefect, tasks or flows; tasks never
import flows. Importing the flows (what `prefect deploy` and a worker do first) must not pull in
torch, transformers or zarr: those load inside task bodies, on the host that runs the stage.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "dmtp": {"prefect", "tasks", "flows"},
    "tasks": {"flows"},
    "flows": set(),
}


def imported_roots(path: Path) -> set[str]:
    """Top-level package of every import in a file, at any depth (inside functions too)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_direction(package):
    files = sorted((REPO_ROOT / package).rglob("*.py"))
    assert files, f"no Python files in {package}/"
    violations = [
        f"{path.relative_to(REPO_ROOT)} imports {sorted(imported_roots(path) & FORBIDDEN[package])}"
        for path in files
        if imported_roots(path) & FORBIDDEN[package]
    ]
    assert not violations, "\n".join(violations)


def test_the_checker_sees_nested_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from prefect import flow\n    import tasks.collect\n")
    assert imported_roots(sample) == {"prefect", "tasks"}


def test_importing_the_flows_loads_no_heavy_library():
    heavy = ["torch", "transformers", "zarr", "mlflow", "accelerate"]
    code = (
        "import sys, flows.collect_and_train, tasks\n"
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    assert result.stdout.strip() == "", f"importing the flows loaded {result.stdout.strip()}"
