"""Every ```python block of README.md runs as written (in a fresh namespace, in an empty directory).

A block that needs real data or weights is marked in the README by a comment on the line before it,
``<!-- no-run: <reason> -->``; such a block is still compiled and its imports must resolve, so a renamed
module or function in it fails here too.
"""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_NO_RUN = re.compile(r"<!--\s*no-run:\s*(.+?)\s*-->\s*$")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, no_run_reason)`` of every ```python block; ``line`` is the 1-based line of its fence."""
    blocks = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = [s for s in text[:m.start()].splitlines() if s.strip()]
        marker = _NO_RUN.search(before[-1]) if before else None
        blocks.append((line, m.group(1), marker.group(1) if marker else None))
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_there_are_python_snippets():
    assert BLOCKS, "README.md has no ```python block"


def test_block_parser():
    text = "x\n```python\na = 1\n```\n\n<!-- no-run: needs UCF101 -->\n```python\nb = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n", None), (7, "b = 2\n", "needs UCF101")]


def _imports_resolve(code: str, where: str) -> None:
    for node in ast.walk(ast.parse(code, where)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert alias.name == "*" or hasattr(module, alias.name) or \
                    importlib.util.find_spec(f"{node.module}.{alias.name}") is not None, \
                    f"{where}: {node.module} has no {alias.name}"


@pytest.mark.parametrize("line, code, no_run", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_snippet_runs(line, code, no_run, tmp_path, monkeypatch):
    where = f"README.md:{line}"
    compiled = compile(code, where, "exec")
    if no_run is not None:
        _imports_resolve(code, where)
        return
    monkeypatch.chdir(tmp_path)
    exec(compiled, {"__name__": "__readme__"})
