"""The core does no I/O: it imports nothing but a few pure stdlib modules."""

from __future__ import annotations

import ast
from pathlib import Path

import psycopg_pool._core

ALLOWED = {"__future__", "collections", "itertools", "random", "typing", "math"}
CORE = Path(psycopg_pool._core.__file__).parent


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            assert node.module is not None
            names.add(node.module.split(".")[0])
    return names


def test_core_imports_only_pure_modules() -> None:
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 4
    for path in files:
        extra = imports_of(path) - ALLOWED
        assert not extra, f"{path.name} imports {extra}"


def test_core_calls_no_io_builtin() -> None:
    banned = {"open", "print", "input", "__import__", "exec", "eval"}
    for path in CORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in banned, f"{path.name} calls {node.func.id}()"
