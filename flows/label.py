"""Prefect flow: write probe targets (labels) into a store.

Thin: one task calls the library; several targets share one pass of the label provider.
"""

from __future__ import annotations

from prefect import flow, task

from actstore.label.labels import write_labels


@task(name="label")
def label_task(store: str, provider: str, target: str | list[str], *,
               overwrite: bool = False, on_x0: bool = True, device: str = "cpu") -> dict:
    """Several targets in one task: the provider runs once over the images for all of them."""
    return write_labels(store, provider, target, overwrite=overwrite, on_x0=on_x0,
                        device=device)


@flow(name="label")
def label_flow(store: str, provider: str, target: str | list[str], *,
               overwrite: bool = False, on_x0: bool = True, device: str = "cpu") -> dict:
    """Label the store's final images (and per-step x0 images) for one or several targets."""
    return label_task(store, provider, target, overwrite=overwrite, on_x0=on_x0,
                      device=device)
