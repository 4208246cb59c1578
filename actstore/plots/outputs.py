"""Where a command writes its figures, checked before it does any work.

A figure is drawn after the store work it shows, so an output path that cannot be written
used to fail only then: after minutes of generation, with the experiment or probe run
already stored (the store changed by a command that then reported an error), and a
``--figure`` naming a folder or a name without ``.png`` made matplotlib write
``<name>.png`` beside it while the command reported ``<name>``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from actstore.errors import ActstoreError


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(path: str, option: str, *, png: bool,
                 local: str = "figures are written to a local path; give one") -> None:
    """Refuse, in one line, a PNG file (``png``) or a folder of figures that cannot be
    written at ``path``: a URL (figures go to a local path), a PNG path that is a folder or
    does not end in .png, a folder path that is a file, or a location whose nearest
    existing folder does not take a new file (tried with a temporary file, removed)."""
    if "://" in str(path):
        raise ActstoreError(f"{option} {path}: {local}")
    p = Path(path).expanduser()
    if png and p.is_dir():
        raise ActstoreError(f"{option} {path}: is a folder; name a .png file (in it)")
    if png and p.suffix.lower() != ".png":
        raise ActstoreError(f"{option} {path}: name a .png file (the figure is a PNG)")
    if not png and p.exists() and not p.is_dir():
        raise ActstoreError(f"{option} {path}: is a file; name a folder for the figures")
    base = _existing_ancestor(p.parent if png else p)
    if not base.is_dir():
        raise ActstoreError(f"{option} {path}: {base} is a file, not a folder; choose "
                            "another path")
    try:
        tempfile.TemporaryFile(dir=base).close()
    except OSError as exc:
        raise ActstoreError(f"{option} {path}: can't write in {base} "
                            f"({exc.strerror or type(exc).__name__}); choose a writable "
                            "folder") from None
