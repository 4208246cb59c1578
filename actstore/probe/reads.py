"""What the probe grid's tasks read from the store where they run: a block's activations
and labels, and what a process keeps of them from task to task (array metadata, a layer's
token-resolution labels, test blocks' label summaries), so hundreds of block tasks per
layer do not reread them."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import zarr

from actstore.kinds import BINARY
from actstore.probe.scoring import LabelSide, label_side
from actstore.store import io

if TYPE_CHECKING:
    from actstore.probe.grid import LayerSource


@lru_cache(maxsize=256)
def stored_array(uri: str, path: str) -> zarr.Array:
    """Opened once per process: opening reads metadata, and a run's hundreds of block tasks
    per layer would otherwise reread it for every block. Only metadata is kept (the arrays
    read here are immutable once their blocks are complete); chunks are read fresh."""
    return io.open_array(uri, path)


def read_images(uri: str, path: str, rows: slice | np.ndarray,
                steps: np.ndarray | None = None) -> np.ndarray:
    """Images ``rows`` (slice or positions) of an array, optionally at ``steps`` only."""
    arr = stored_array(uri, path)
    if steps is None:
        return arr.get_orthogonal_selection((rows,))
    if isinstance(rows, slice) and np.array_equal(steps, np.arange(arr.shape[1])):
        return arr[rows]
    return arr.get_orthogonal_selection((rows, steps))


def read_labels(src: LayerSource, path: str, rows: slice | np.ndarray) -> np.ndarray:
    y = read_images(src.uri, path, rows)
    return (y > 0.5).astype(np.float32) if src.kind == BINARY else y


def token_labels(src: LayerSource) -> np.ndarray:
    """A layer's token-resolution labels, every image: small (images × h × w), and wanted by
    every block task of every model, so read once per process, not once per block (keyed by
    the label set's creation time, so a relabelled target is read anew)."""
    return _cached_labels(src.uri, src.tokens, src.kind, src.labels_created)


@lru_cache(maxsize=8)
def _cached_labels(uri: str, path: str, kind: str, created: str) -> np.ndarray:
    y = read_images(uri, path, slice(None))
    return (y > 0.5).astype(np.float32) if kind == BINARY else y


LABEL_SIDE_BLOCKS = 512   # test blocks whose label summaries a process keeps (see below)


def block_label_side(src: LayerSource, a: int, b: int, grid: tuple[int, int]) -> LabelSide:
    """What scoring needs of the block's labels at image resolution, for every token grid of
    the run at once: made on the first layer's visit, then reused by every layer and model
    (a 512×512 label read and centred once per run, not once per layer and model)."""
    grids = tuple(sorted(set(src.grids) | {grid}))
    return _cached_side(src.uri, src.full, src.kind, src.labels_created, a, b, grids)


@lru_cache(maxsize=LABEL_SIDE_BLOCKS)
def _cached_side(uri: str, path: str, kind: str, created: str, a: int, b: int,
                 grids: tuple) -> LabelSide:
    return label_side(read_images(uri, path, slice(a, b)), grids, kind == BINARY)


def block_tokens(x: np.ndarray) -> np.ndarray:
    """(b, S, h, w, C) block → (S, b·h·w, C) tokens."""
    b, s, h, w, c = x.shape
    return x.transpose(1, 0, 2, 3, 4).reshape(s, b * h * w, c)
