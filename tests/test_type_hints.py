"""Type hints on public functions (the project's code standard), read from the source:
every public top-level function of actstore/ and flows/, and every public method of a
public top-level class, annotates its parameters (``self``/``cls`` aside, ``*args`` and
``**kwargs`` included) and its return."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("actstore", "flows")
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _unannotated(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    params = [p for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)
              if p.arg not in ("self", "cls")]
    params += [p for p in (a.vararg, a.kwarg) if p is not None]
    missing = [p.arg for p in params if p.annotation is None]
    return missing + (["return"] if fn.returns is None else [])


def public_functions(path: Path) -> list[tuple[int, str, ast.FunctionDef]]:
    """(line, name, node) of the public functions and public classes' public methods."""
    out = []
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, FUNCTIONS) and not node.name.startswith("_"):
            out.append((node.lineno, node.name, node))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            out += [(sub.lineno, f"{node.name}.{sub.name}", sub) for sub in node.body
                    if isinstance(sub, FUNCTIONS) and not sub.name.startswith("_")]
    return out


def offenders(root: Path = REPO) -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for line, name, fn in public_functions(path):
                missing = _unannotated(fn)
                if missing:
                    found.append(f"{path.relative_to(root)}:{line} {name} "
                                 f"(no hint: {', '.join(missing)})")
    return found


def test_public_functions_have_type_hints():
    found = offenders()
    assert not found, f"{len(found)} public functions lack type hints:\n" + "\n".join(found)


def test_scan_sees_what_it_checks(tmp_path):
    """The scan itself: a missing hint anywhere it looks is named; private names, private
    classes' methods, nested functions and ``self`` are not its business."""
    pkg = tmp_path / "actstore"
    pkg.mkdir()
    (tmp_path / "flows").mkdir()
    (pkg / "m.py").write_text(
        "def ok(a: int, *args: str, **kw: float) -> None:\n"
        "    def inner(x):\n        return x\n"
        "def _private(x):\n    pass\n"
        "def bare(a, *args: int, **kw) -> int:\n    return a\n"
        "def noret(a: int):\n    pass\n"
        "class Pub:\n"
        "    def m(self, x: int) -> int:\n        return x\n"
        "    @classmethod\n    def c(cls, y) -> None:\n        pass\n"
        "    def _p(self, z):\n        pass\n"
        "class _Priv:\n    def m(self, x):\n        pass\n")
    assert offenders(tmp_path) == [
        "actstore/m.py:6 bare (no hint: a, kw)",
        "actstore/m.py:8 noret (no hint: return)",
        "actstore/m.py:14 Pub.c (no hint: y)"]
