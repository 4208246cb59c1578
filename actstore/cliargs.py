"""Command-line parsing shared by ``actstore`` and the library's ``python -m`` tools: usage
errors in one line, and number options checked by their type.

A bad number (``--images -1``, ``--strength nan``) is refused by argparse before it reaches
a store; the error names the option and the value, and points at ``--help`` instead of
printing the whole usage, so every failure a user sees is one line.
"""

from __future__ import annotations

import argparse
import math

EXIT_USER_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, pointing at --help instead of printing the usage (its
    subcommand parsers are of this class too)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} "
                                   "--help)\n")

    def fail(self, error: Exception):
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
