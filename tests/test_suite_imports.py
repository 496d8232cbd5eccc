"""The suite's own structure: a helper two test modules share lives in a support module
(tests/support.py and the focused ones beside it), never in one test module imported by another."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def _imported_modules(tree: ast.Module) -> set[str]:
    """Every module an import statement names, anywhere in the module (functions included)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "tests" if node.level else (node.module or "")
            module = f"{base}.{node.module}" if node.level and node.module else base
            found.add(module)
            if module == "tests":  # `from tests import test_x` names the test module itself
                found.update(f"tests.{alias.name}" for alias in node.names)
    return found


def test_no_test_module_imports_another() -> None:
    offenders = [
        f"{path.name} imports {module}"
        for path in sorted(TESTS.glob("test_*.py"))
        for module in sorted(_imported_modules(ast.parse(path.read_text(), filename=str(path))))
        if module.startswith("tests.test_")
    ]
    assert offenders == [], "move the shared helpers to tests/support.py: " + "; ".join(offenders)
