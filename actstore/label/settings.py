"""Every choice a label run makes besides store, provider and targets, with its default
written once.

One frozen object travels whole from the command line through the flow (and to every
worker of a fan-out) to the library, so a default can differ nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from actstore.errors import ActstoreError
from actstore.options import Options


@dataclass(frozen=True, kw_only=True)
class LabelSettings(Options):
    """``source_model``: whose final images are labelled (labels serve every variant, the
    randomized control included). ``on_x0``: also label each step's decoded x0 image.
    ``overwrite``: replace committed labels of the same name. ``batch_size`` images go
    through the provider at once, on ``device``: ``auto`` (a GPU if there is one) as
    materialize, since 2026-12-06 (before, ``cpu``: a GPU user's labels ran on the CPU).
    Where they ran is no part of a label version's id, so a run resumes on any device."""

    source_model: str = "trained"
    overwrite: bool = False
    on_x0: bool = True
    batch_size: int = 16
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ActstoreError(f"--batch-size {self.batch_size}: must be at least 1")
