"""The layout of the tests: no test module imports another (shared helpers live in plain modules beside them and
shared fixtures in conftest.py), so a test module can be renamed, split or deleted without breaking others."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_test_modules(path: Path) -> list[str]:
    """'line N: module' for every import of a test_* module in `path`, at any depth (functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):  # relative: `from . import test_x`, `from .test_x import y`
            names = [node.module] if node.module else [alias.name for alias in node.names]
        else:
            continue
        found += [f"line {node.lineno}: {name}" for name in names
                  if name.split(".")[-1].startswith("test_") or name.split(".")[0].startswith("test_")]
    return found


def test_no_test_module_imports_another():
    offenders = [f"tests/{path.name} {site}" for path in sorted(TESTS.glob("*.py"))
                 for site in imported_test_modules(path)]
    assert not offenders, ("test modules import other test modules; move the shared code into a helper module or a "
                           "conftest.py fixture:\n" + "\n".join(offenders))
