"""One exception type for everything a user can get wrong.

The CLI turns an :class:`ActstoreError` into a single line on stderr and exit code 2, so
every message must say what is wrong, where, and how to fix it, in one sentence.
"""


class ActstoreError(Exception):
    """A user-facing error: bad input, a mismatched store, a missing model."""
