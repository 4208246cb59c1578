"""Checks of the arguments a notebook passes to the public readers, shared so every reader
refuses the same mistake with the same line: Python takes any object where a flag or a
name is meant, and ``complete_only="no"`` (a non-empty string, so true) or a target of
``None`` passed silently, giving the opposite of what was asked or an empty answer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from actstore.errors import ActstoreError


def check_flag(value: Any, name: str, where: str) -> bool:
    """``value`` if it is a bool (numpy's too, as a reduction gives), else one line saying
    so: a string such as ``"no"`` is true to Python, the opposite of what it says."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ActstoreError(f"{where}: {name}={value!r} is not True or False; pass {name}=True "
                        f"or {name}=False")


def check_name(value: Any, what: str, where: str, have: Iterable[str]) -> str:
    """``value`` if it is a non-empty string, else one line naming the ones there are: a
    reader looking ``None`` or ``""`` up answered as for a name it has nothing of."""
    if isinstance(value, str) and value:
        return value
    names = ", ".join(sorted(set(have)))
    raise ActstoreError(f"{where}: {what} {value!r} is no name; give one"
                        f"{f' of {names}' if names else ''} as a string")
