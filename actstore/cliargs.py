"""Command-line parsing shared by ``actstore`` and the library's ``python -m`` tools: usage
errors in one line, and number options checked by their type.

A bad number (``--images -1``, ``--strength nan``) is refused by argparse before it reaches
a store; the error names the option and the value, and points at ``--help`` instead of
printing the whole usage, so every failure a user sees is one line.
"""

from __future__ import annotations

import argparse
import math
from typing import NoReturn

EXIT_USER_ERROR = 2


class _Once(argparse._StoreAction):
    """An option's value, refused when given twice: argparse keeps the last one silently, so
    `--store a --store b` wrote to b and `--steps 0 1 --steps 4` probed step 4 alone."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = vars(namespace).get(self.dest, self.default)
        if any(n is namespace for n in self.seen):
            shown = [" ".join(map(str, v)) if isinstance(v, list) else str(v)
                     for v in (given, values)]
            more = "; name every value after one " + option_string if self.nargs else ""
            parser.error(f"{option_string} given twice ({shown[0]!r}, then {shown[1]!r}): "
                         f"give it once{more}")
        self.seen.append(namespace)
        super().__call__(parser, namespace, values, option_string)

    @property
    def seen(self) -> list:
        """The namespaces (one per parse) this option was given in, held so that no later
        parse's namespace can take a freed one's id."""
        return self.__dict__.setdefault("_seen", [])


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, pointing at --help instead of printing the usage (its
    subcommand parsers are of this class too); an option's value given twice is one."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", None, _Once)
        self.register("action", "store", _Once)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} "
                                   "--help)\n")

    def fail(self, error: Exception) -> NoReturn:
        """An error of the command's input found past parsing (an :class:`ActstoreError`):
        one line and exit 2, as a usage error."""
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {error}\n")


def _number(text: str, kind: type, lowest: float, strict: bool):
    try:
        value = kind(text)
    except ValueError:
        noun = "whole number" if kind is int else "number"
        raise argparse.ArgumentTypeError(f"must be a {noun}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if value < lowest or (strict and value == lowest):
        raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {lowest:g}, "
                                         f"got {text}")
    return value


def positive_int(text: str) -> int:
    """>= 1: counts (steps, images per block or batch, iterations, threads), sizes."""
    return _number(text, int, 1, strict=False)


def index(text: str) -> int:
    """>= 0: step indices and seeds."""
    return _number(text, int, 0, strict=False)


def positive_float(text: str) -> float:
    """> 0 and finite: learning rates, margins."""
    return _number(text, float, 0.0, strict=True)


def nonneg_float(text: str) -> float:
    """>= 0 and finite: guidance scales."""
    return _number(text, float, 0.0, strict=False)


def finite_float(text: str) -> float:
    """Any finite number: angles, offsets."""
    return _number(text, float, -math.inf, strict=False)
