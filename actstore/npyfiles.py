"""Reading user NumPy files (.npy/.npz of labels or intervention targets) without pickles.

``np.load(allow_pickle=False)`` refuses object arrays, but with NumPy's ValueError advising
to load the file unsafely, and a torn ``.npz`` raises ``BadZipFile``, a text file a pickle
error: each was an unexpected error (exit 1) or that advice. Here each is one line naming
the file, and an array of strings, which float conversion fails on later (after a label
run had begun writing), is refused with them.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import numpy.typing as npt

from actstore.errors import ActstoreError

UNREADABLE = (ValueError, OSError, EOFError, zipfile.BadZipFile)


def load_plain(path: str | Path, what: str,
               keys: list[str] | None = None) -> np.ndarray | dict[str, np.ndarray]:
    """The array of a ``.npy``, or the arrays of a ``.npz`` (those named ``keys``, else
    all), read without pickles; ``what`` names the file in the one-line error."""
    try:
        if str(path).endswith(".npy"):
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in (z.files if keys is None else keys) if k in z.files}
    except UNREADABLE:
        raise ActstoreError(f"{what}: {Path(path).name} is not a NumPy file of plain arrays "
                            "(read without pickle: objects are never loaded); save it with "
                            "np.save or np.savez, ids as np.array(ids, dtype=str)") from None


def check_numeric(array: npt.ArrayLike, what: str) -> None:
    """Numbers or booleans only: labels and targets are maps, never text."""
    dtype = array.dtype if hasattr(array, "dtype") else np.asarray(array).dtype
    if not (np.issubdtype(dtype, np.number) or dtype == bool):
        raise ActstoreError(f"{what} holds {dtype} values; give numbers or 0/1 masks")
