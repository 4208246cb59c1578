"""What the stages' frozen settings objects share: a copy with flat options, where an option
given as None keeps its value (a command-line option not given is None, so its default is
the one written in the settings class, never a second one in the parser)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields, replace
from typing import Any, Self

from actstore.errors import InputError


class Options:
    """Mixin for a frozen settings dataclass."""

    def with_options(self, **options: Any) -> Self:
        """A copy with the ``options`` given (None: keep); an unknown name is a TypeError."""
        unknown = sorted(set(options) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"{type(self).__name__} has no option {unknown[0]!r}")
        return replace(self, **{k: v for k, v in options.items() if v is not None})


def named_once(option: str, what: str, values: Iterable[object], sep: str = " ") -> None:
    """Refuse a value given twice in one option, naming it: a probe run stored with a
    repeated coordinate can't be aligned with any other (it broke the store's emergence
    table), and an intervention option silently dropped the repeat. ``sep``: how the
    option's values were given (``--capture attn1,block``: a comma)."""
    values = list(values)
    twice = next((i for i, v in enumerate(values) if v in values[:i]), None)
    if twice is not None:
        shown = [f"{v:g}" if isinstance(v, float) else str(v) for v in values]
        raise InputError(f"{option} {sep.join(shown)}: {what} {shown[twice]} is named "
                         "twice; name each once")


def start_stop(text: str, n: int, *, expected: str, holder: str) -> tuple[int, int]:
    """``"A:B"`` (either end may be left out) → (A, B) with 0 <= A < B <= n: the one way
    `--images` names a range of rows, whether of a prompt table or of a store."""
    try:
        a_text, b_text = text.split(":")
        a = int(a_text) if a_text else 0
        b = int(b_text) if b_text else n
    except ValueError:
        raise InputError(f"--images {text!r}: expected {expected}, e.g. 0:{n}") from None
    if not 0 <= a < b <= n:
        raise InputError(f"--images {text}: out of range; {holder} has {n} images, so use "
                         f"START:STOP with 0 <= START < STOP <= {n}")
    return a, b
