"""Checking a provider's output and shaping labels, all targets of one provider call at once.

A provider such as the toy-world labeler makes several targets in one forward pass, and
labelling is dominated by that pass (final images plus every step's x0 image), so each
batch of images goes through the provider once and every requested target is picked from
the output. The targets are still checked, normalized and written separately, each into its
own version (see :mod:`actstore.label.blocks`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from actstore.cluster import stop_if_cancelled
from actstore.errors import ActstoreError
from actstore.kinds import BINARY
from actstore.metrics import pool


def resolution_name(h: int, w: int) -> str:
    return f"r{h}" if h == w else f"r{h}x{w}"


def by_size(resolutions: dict[str, list[int]]) -> list[str]:
    """Resolution names (``{"r16": [16, 16], ...}``) smallest grid first: in text order a
    label summary read "r16, r2, r4, r8"."""
    return sorted(resolutions, key=lambda name: tuple(resolutions[name]))


class PassContext:
    """What every pass needs to know to check a provider's output and name culprits."""

    def __init__(self, kinds: dict[str, str], spec, prov, ids, hw, block, batch_size):
        self.kinds, self.spec, self.prov = kinds, spec, prov     # kinds: target -> kind, in order
        self.ids, self.hw, self.block, self.batch_size = ids, hw, block, batch_size

    def run(self, images: np.ndarray, done: Callable[[int], None] | None = None
            ) -> dict[str, np.ndarray]:
        """The provider in batches, once per batch for all targets; float32 (n, H, W) each.
        A Dask task whose command was interrupted stops before its next batch. ``done``
        hears each batch's image count: a block of SD x0 images (blocks × steps) is
        minutes of labelling, which a bar counting blocks showed as one jump."""
        parts: dict[str, list] = {t: [] for t in self.kinds}
        for i in range(0, len(images), self.batch_size):
            stop_if_cancelled()
            n = min(self.batch_size, len(images) - i)
            out = self.pick(self.prov(images[i:i + self.batch_size]), n)
            for t, arr in out.items():
                parts[t].append(arr)
            if done is not None:
                done(n)
        return {t: np.concatenate(p) for t, p in parts.items()}

    def pick(self, out: dict, n: int) -> dict[str, np.ndarray]:
        return {t: self._pick_one(out, t, n) for t in self.kinds}

    def _pick_one(self, out: dict, target: str, n: int) -> np.ndarray:
        if target not in out:
            raise ActstoreError(f"provider {self.spec} returned no {target!r} (returned "
                                f"{', '.join(out)}); fix the provider")
        arr = np.asarray(out[target])
        if arr.shape != (n, *self.hw):
            raise ActstoreError(f"provider {self.spec}: {target!r} labels have shape "
                                f"{arr.shape}, expected {(n, *self.hw)} (images × the store's "
                                f"image size); resize them to {self.hw[0]}x{self.hw[1]}")
        return arr.astype(np.float32, copy=False)

    def validate(self, target: str, arr: np.ndarray, a: int, step: int | None = None) -> None:
        """Non-finite or non-0/1 binary values: an error naming the first image (and step)."""
        flat = arr.reshape(arr.shape[0], -1)
        where = "" if step is None else f" on the step-{step} x0 image"
        bad = ~np.isfinite(flat).all(axis=1)
        if bad.any():
            raise ActstoreError(f"provider {self.spec}: {target!r} labels contain NaN/inf "
                                f"for image {self.ids[a + int(np.argmax(bad))]!r}{where} "
                                f"({int(bad.sum())} images in its block); fix the labels")
        if self.kinds[target] == BINARY:
            off = ~np.isin(flat, (0.0, 1.0)).all(axis=1)
            if off.any():
                raise ActstoreError(f"provider {self.spec}: binary target {target!r} "
                                    f"has values other than 0/1 for image "
                                    f"{self.ids[a + int(np.argmax(off))]!r}{where}; threshold "
                                    "the labels")


def normalize(raw: np.ndarray, mean: float | None, std: float | None) -> np.ndarray:
    """z-score with the train constants in float64 (binary targets: unchanged)."""
    if mean is None:
        return raw
    return ((raw.astype(np.float64) - mean) / std).astype(np.float32)


def pool_block(full: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Area means over a layer's token grid (binary targets: the salient fraction)."""
    return pool(full, grid).astype(np.float32)
