"""How the source is laid out where a reader checks an error message against the line
a user quotes: each message's continuation lines start under its first string."""

from __future__ import annotations

import ast

from conftest import REPO


def _name(func: ast.expr) -> str:
    """A call's own name: ``InputError`` of ``InputError(...)`` and of
    ``errors.InputError(...)`` alike (the dotted form went unchecked until 2026-12-06)."""
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _misaligned_lines(source: str) -> list[int]:
    lines = source.split("\n")
    out = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and _name(node.func).endswith("Error")
                and node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr))):
            continue
        message = node.args[0]
        for n in range(message.lineno + 1, message.end_lineno + 1):
            text = lines[n - 1]
            if (text.lstrip().startswith(('"', "f\"", "'", "f'"))
                    and len(text) - len(text.lstrip()) != message.col_offset):
                out.append(n)
    return out


def _misaligned(path) -> list[str]:
    return [f"{path.relative_to(REPO)}:{n}"
            for n in _misaligned_lines(path.read_text(encoding="utf-8"))]


def test_error_messages_continue_under_their_first_string():
    """Continuation lines of raise InputError(...)/ActstoreError(...) messages in
    actstore/intervene/plan.py and actstore/options.py sat 3 columns right of the
    string they continue (found in review, 2026-12-06)."""
    files = sorted((REPO / "actstore").rglob("*.py")) + sorted((REPO / "flows").glob("*.py"))
    assert [where for path in files for where in _misaligned(path)] == []


def test_the_check_sees_plain_and_dotted_names():
    """Its own oracle: a message continued 3 columns right is found whether the error is
    named bare or through its module, and one continued under its string is not."""
    source = (
        "raise InputError(f\"a {x}\"\n"
        "                    \"b\")\n"
        "raise errors.InputError(f\"a {x}\"\n"
        "                           \"b\")\n"
        "raise argparse.ArgumentTypeError(\"a \"\n"
        "                                 \"b\")\n")
    assert _misaligned_lines(source) == [2, 4]
