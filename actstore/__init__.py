"""actstore: every self-attention activation of a latent diffusion model, as a data product.

The public API, importable from here so a notebook needs one import::

    import actstore
    view = actstore.open_store("runs/main/store.zarr")
    actstore.open_emergence("runs/main/store.zarr")

``import actstore`` stays light (no torch, no Prefect): each name is imported from its
stage's module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
SCHEMA_VERSION = 2  # 2: label commit records (docs/store-format.md); 1 still read

# public name -> the module that owns it
_API = {
    "open_store": "actstore.store.view",
    "materialize": "actstore.generation.materialize",
    "MaterializeSettings": "actstore.generation.materialize",
    "LabelSettings": "actstore.label.settings",
    "ProbeSettings": "actstore.probe.settings",
    "write_labels": "actstore.label.labels",
    "open_labels": "actstore.label.labels",
    "run_probes": "actstore.probe.runs",
    "load_probe": "actstore.probe.runs",
    "open_emergence": "actstore.probe.runs",
    "open_scores": "actstore.probe.runs",
    "run_interventions": "actstore.intervene.run",
    "InterventionSettings": "actstore.intervene.settings",
    "SweepSettings": "actstore.intervene.settings",
    "run_sweep": "actstore.intervene.sweep",
    "open_intervention": "actstore.intervene.results",
    "ActstoreError": "actstore.errors",
}

__all__ = [*_API, "__version__", "SCHEMA_VERSION"]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'actstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
