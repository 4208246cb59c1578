"""How the source is laid out where a reader checks an error message against the line
a user quotes: each message's continuation lines start under its first string."""

from __future__ import annotations

import ast

from conftest import REPO


def _misaligned(path) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")
    out = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", "").endswith("Error")
                and node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr))):
            continue
        message = node.args[0]
        for n in range(message.lineno + 1, message.end_lineno + 1):
            text = lines[n - 1]
            if (text.lstrip().startswith(('"', "f\"", "'", "f'"))
                    and len(text) - len(text.lstrip()) != message.col_offset):
                out.append(f"{path.relative_to(REPO)}:{n}")
    return out


def test_error_messages_continue_under_their_first_string():
    """Continuation lines of raise InputError(...)/ActstoreError(...) messages in
    actstore/intervene/plan.py and actstore/options.py sat 3 columns right of the
    string they continue (found in review, 2026-12-06)."""
    files = sorted((REPO / "actstore").rglob("*.py")) + sorted((REPO / "flows").glob("*.py"))
    assert [where for path in files for where in _misaligned(path)] == []
