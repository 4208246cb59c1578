"""Every command line of the guides parses with its command's own argparse parser.

The guides are ``docs/*.md``, ``benchmarks/README.md`` and ``models/*/README.md`` (the
README's lines run for real in tests/test_readme.py). A command line is a line of a
```` ```bash ```` block, continuations joined and ``# comments`` cut, or an inline ```code```
span (it may wrap across lines), that starts with ``actstore ``, ``python -m actstore.``,
``python -m flows.`` or ``python benchmarks/`` (``.venv/bin/python`` counts as ``python``).
Each is parsed by the parser its command builds (``flows.cli.build_parser`` for
``actstore``, each module's or script's ``build_parser()``), never run: no store, path or
model need exist, and the check takes seconds. Options must exist, typed values convert,
choices hold, and no option is given twice where the command refuses that (`actstore`).

How written forms that are not literal commands are read:

* Bash-block lines are the lines a reader copies and runs: parsed in full, required options
  included. So are inline spans that give ``--store``: a whole command written in prose
  (``python -m actstore.intervene.reach --store runs/camft2/store.zarr ...``).
* Other inline spans mention a command inside a sentence whose context supplies the store
  (``actstore probe --target T``, ``actstore sweep ... --workers N``): their options and
  values are checked, not the options they leave to the context (required ones).
* Placeholders (``<those>``, ``…``, ``...``, metavariables in capitals: ``S``, ``N``,
  ``A:B``) stand for a value when they follow an option that takes one (filled with a value
  that option accepts); anywhere else they stand for elided options and are dropped.
  ``[--opt V]`` is read as given; ``--a X | --b Y`` as one line per alternative, as is a
  value ``cond|both``.
* A span whose command itself is a placeholder is not a command (``actstore <command>:
  interrupted ...`` quotes a message; ``python benchmarks/...`` names the folder): skipped,
  as is a span quoting what a command prints (``actstore intervene: note: ...``: its
  name followed by a colon).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO

GUIDES = [*sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md",
          *sorted((REPO / "models").glob("*/README.md"))]
START = re.compile(r"(?:\.venv/bin/)?(actstore |python -m (?:actstore|flows)\.|"
                   r"python benchmarks/)")
MESSAGE = re.compile(r"actstore [a-z-]+: ")   # what a command prints, quoted in prose
ELIDED = "\0"       # one placeholder token, after `<...>` groups are made single words


@dataclass(frozen=True)
class DocLine:
    guide: str
    text: str
    whole: bool     # required options are checked too

    def __str__(self) -> str:
        return f"{self.guide}: {self.text}"


def doc_lines(guide: Path) -> list[DocLine]:
    """The guide's command lines, in order (see the module docstring)."""
    text, name = guide.read_text(), str(guide.relative_to(REPO))
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())
            if START.match(line):
                out.append(DocLine(name, line, True))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        line = " ".join(span.split())
        if START.match(line) and not MESSAGE.match(line):
            out.append(DocLine(name, line, " --store " in f" {line} "))
    return out


ALL = [line for guide in GUIDES for line in doc_lines(guide)]


def _is_placeholder(token: str) -> bool:
    return (token == ELIDED or "…" in token or "..." in token
            or re.fullmatch(r"[A-Z]+(:[A-Z]+)?", token) is not None)


def variants(text: str) -> list[list[str]]:
    """The argument lists a written line stands for: alternatives spelled out, placeholders
    still in (filled or dropped once the parser is known), the command words first."""
    text = re.sub(r"<[^>]*>", ELIDED, text)
    text = re.sub(r"\[(-[^\]]*)\]", r"\1", text)
    tokens = shlex.split(text.replace("\0", " \0 "))
    lines = []
    alternatives = " ".join(tokens).split(" | ")
    head = alternatives[0].split()
    lines.append(head)
    last_option = max((i for i, t in enumerate(head) if t.startswith("-")), default=len(head))
    lines += [head[:last_option] + alt.split() for alt in alternatives[1:]]
    out = []
    for line in lines:
        choices = [t.split("|") if "|" in t and not t.startswith("-") else [t] for t in line]
        out += [list(v) for v in itertools.product(*choices)]
    return out


class DocParseError(Exception):
    pass


def _raise(message: str):
    raise DocParseError(message)


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _load(name: str):
    """A module (dotted name) or benchmark script (path), its import-time settings
    (sys.path, os.environ: e.g. ACTSTORE_THREADS=1) undone so that they reach no other test."""
    env, syspath = dict(os.environ), list(sys.path)
    try:
        if not name.endswith(".py"):
            return importlib.import_module(name)
        sys.path.insert(0, str((REPO / name).parent))     # as `python benchmarks/x.py` has it
        spec = importlib.util.spec_from_file_location(f"_doc_{Path(name).stem}", REPO / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:   # only what changed: a clear() empties, for a moment, the environment that
        # another thread of this process (Prefect's, Dask's) may be starting a process with
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update({k: v for k, v in env.items() if os.environ.get(k) != v})
        sys.path[:] = syspath


def command_parser(words: list[str]) -> tuple[argparse.ArgumentParser, int]:
    """The parser of the command a line starts with, and how many words name the command
    (``actstore`` keeps its subcommand as the parser's first argument)."""
    if words[0] == "actstore":
        from flows.cli import build_parser

        return build_parser(), 1
    if words[1] == "-m":
        return _load(words[2]).build_parser(), 3
    return _load(words[1]).build_parser(), 2


def _sample(action: argparse.Action) -> str:
    """A value ``action`` accepts, to stand for a placeholder."""
    if action.choices:
        return str(next(iter(action.choices)))
    for candidate in ("1", "0:1", "x"):
        try:
            (action.type or str)(candidate)
            return candidate
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            continue
    raise AssertionError(f"no sample value for {action.option_strings}")


def _filled(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with each placeholder filled (after an option taking a value) or dropped;
    the options are looked up in the subcommand's parser where ``argv`` names one."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subs and argv and argv[0] in subs[0].choices:
        parser = subs[0].choices[argv[0]]
    out = []
    for token in argv:
        action = parser._option_string_actions.get(out[-1]) if out else None
        if not _is_placeholder(token):
            out.append(token)
        elif action is not None and action.nargs != 0:
            out.append(_sample(action))
    return out


def check(line: str, whole: bool) -> None:
    """Parse every variant of ``line``; raise :class:`DocParseError` on the first that the
    command refuses."""
    words = line.split()
    words = ["python", *words[1:]] if words[0].endswith("/python") else words
    if re.search(r"<|\.\.\.|…", words[2] if words[1] == "-m" else words[1]):
        return      # the command itself is elided
    for argv in variants(" ".join(words)):
        parser, n = command_parser(argv)
        for p in _parsers(parser):
            p.error = _raise
            for action in p._actions:
                if not whole and not isinstance(action, argparse._SubParsersAction):
                    action.required = False
        args = _filled(parser, argv[n:])
        try:
            parser.parse_args(args)
        except SystemExit as exc:       # a parser's own exit (OneLineParser.fail, --help)
            raise DocParseError(f"exit {exc.code} on {args}") from None


def test_every_guide_has_its_lines_found():
    """The extraction finds the guides' commands, so an empty pass cannot look green."""
    found = {line.guide for line in ALL}
    assert {"docs/interventions.md", "docs/scale.md", "docs/capture-points.md",
            "benchmarks/README.md", "models/toy-ldm/README.md"} <= found, found
    assert sum(line.whole for line in ALL) >= 30 and len(ALL) >= 80, len(ALL)


@pytest.mark.parametrize("line", ALL, ids=str)
def test_documented_command_parses(line: DocLine):
    try:
        check(line.text, line.whole)
    except DocParseError as exc:
        pytest.fail(f"{line.guide}: `{line.text}` does not parse: {exc}", pytrace=False)


@pytest.mark.parametrize("line, whole", [
    ("actstore probe --store S --target depth --made-up 3", True),          # no such option
    ("actstore materialize --store S --dtype float64", True),               # not a choice
    ("actstore intervene --probe-run R --strength 1", True),                # no --store
    ("actstore sweep ... --workers many", False),                           # not a number
    ("actstore nosuchcommand --store S", True),
    ("python -m actstore.intervene.reach --store S --renders -1", True),
    ("python -m actstore.toyworld.train --stage nosuch", True),
    ("python benchmarks/bench_probe_run.py --shapes xl", True),
])
def test_a_wrong_line_is_refused(line, whole):
    """The check can fail: each line is wrong in one way (the comment says which)."""
    with pytest.raises(DocParseError):
        check(line, whole)


@pytest.mark.parametrize("line, argvs", [
    ("actstore label ... --workers N | --cluster ADDRESS",
     [["actstore", "label", "...", "--workers", "N"],
      ["actstore", "label", "...", "--cluster", "ADDRESS"]]),
    ("actstore intervene --layers <9 points> --halves cond|both",
     [["actstore", "intervene", "--layers", ELIDED, "--halves", "cond"],
      ["actstore", "intervene", "--layers", ELIDED, "--halves", "both"]]),
    ("actstore verify --store S [--images A:B]",
     [["actstore", "verify", "--store", "S", "--images", "A:B"]]),
])
def test_written_forms_are_read_as_the_docstring_says(line, argvs):
    assert variants(line) == argvs
