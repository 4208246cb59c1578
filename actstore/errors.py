"""One exception type for everything a user can get wrong.

The CLI turns an :class:`ActstoreError` into a single line on stderr and exit code 2, so
every message must say what is wrong, where, and how to fix it, in one sentence.
"""


class ActstoreError(Exception):
    """A user-facing error: bad input, a mismatched store, a missing model."""


class InputError(ActstoreError):
    """An error in what the user typed (an option's syntax, a range past the store's end):
    every process finds it the same, so a fan-out task that meets it on a Dask worker does
    not name the worker (:func:`actstore.cluster.names_worker`), which would send the user
    to look at that worker's environment instead of the command line."""


class Displaced(ActstoreError):
    """A writer's mark is no longer its own: another command took it for gone (frozen, or
    its host cut off from the store longer than the staleness window) and removed or took
    over what it was writing. The writer stops at once, writing and removing nothing more."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of ``exc``'s message, at most ``limit`` characters (its type's name
    when it says nothing): how another library's error is quoted inside actstore's
    one-line errors, since those messages often run to many lines."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
