"""Every choice a probe run makes besides store and target, with its default written once.

One frozen object travels whole from the command line through the flow to the library, so
a default can differ nowhere. Where the grid runs (a Dask scheduler) is not a setting: it
changes how fast a run is, never its probes.
"""

from __future__ import annotations

from dataclasses import dataclass

from actstore.errors import ActstoreError
from actstore.options import Options, named_once


@dataclass(frozen=True, kw_only=True)
class ProbeSettings(Options):
    """The grid's extent (``models``, ``layers``, ``steps``; None: all the store has), the
    cross-validation folds that choose each cell's λ, and ``label_spearman``: Spearman
    also at label resolution (costly: see :func:`actstore.probe.scoring.metric_names`)."""

    models: tuple[str, ...] | None = None
    layers: tuple[str, ...] | None = None
    steps: tuple[int, ...] | None = None
    n_folds: int = 5
    label_spearman: bool = False

    def __post_init__(self) -> None:
        for name in ("models", "layers", "steps"):
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                value = (value,)
            if value is not None:
                value = tuple(int(v) for v in value) if name == "steps" else \
                    tuple(str(v) for v in value)
                named_once(f"--{name}", name[:-1], value)
                if name == "steps":   # emergence reads a run's last step as its last entry
                    value = tuple(sorted(value))
                object.__setattr__(self, name, value)
        if self.n_folds < 2:
            raise ActstoreError(f"n_folds {self.n_folds}: cross-validation needs at least 2 "
                                "folds")
