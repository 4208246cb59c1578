"""Writing a model variant's or an experiment's finished image blocks (see :mod:`.core`).

A block's arrays go out in a background thread while the next block is generated, so
compression and disk I/O overlap the UNet instead of adding to it; a block becomes visible
to readers only when its completion record is written, after all of its arrays.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr
from zarr.core.sync import sync

from actstore.store import commit, io
from actstore.store.layout import ACTIVATION


class BlockWriter:
    """Writes finished blocks in the background while the next block is generated.

    Compression and disk I/O then overlap the UNet instead of adding to it. At most one
    block is in flight (so the host holds at most two blocks), array handles are opened
    once (not per block: each open re-reads metadata), and a block's completion record is
    written only after all of its arrays, in the writer thread. An error in the writer
    surfaces at the next :meth:`submit` or at :meth:`close`, and that block stays
    unrecorded, so a rerun redoes it.
    """

    def __init__(self, uri: str, group: str, on_written=None):
        self.uri, self.group = uri, group
        self._arrays: dict[str, zarr.Array] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="actstore-writer")
        self._pending = None
        self._on_written = on_written
        self.bytes = 0

    def _array(self, path: str) -> zarr.Array:
        if path not in self._arrays:  # whole blocks: skip zarr's scan for all-fill chunks
            self._arrays[path] = io.open_array(self.uri, f"{self.group}/{path}", mode="r+") \
                .with_config({"write_empty_chunks": True})
        return self._arrays[path]

    def submit(self, start: int, stop: int, arrays: dict[str, np.ndarray], record: dict,
               *, prepare: Callable[[], dict[str, np.ndarray]] | None = None,
               rows: tuple[int, int] | None = None, records: tuple[str, ...] = ("",)) -> None:
        """Queue ``arrays`` (array path under the group → this block's rows) and then the
        completion record of store block ``start:stop``; waits for the previous block
        first. ``rows`` is where the arrays go when it is not ``start:stop`` (an
        experiment holding a subset of the store's images). ``prepare`` runs in the writer
        before anything is written and returns more arrays (work moved off the caller's
        critical path); if it raises, the block is not stored. ``records``: the groups,
        relative to the writer's (``""`` is its own), whose completion records of this block
        are written, in order, after the arrays (capture kinds added to a variant keep their
        own)."""
        self.wait()
        self._pending = self._pool.submit(self._write, start, stop, arrays, record, prepare,
                                          rows or (start, stop), records)

    def _write(self, start: int, stop: int, arrays: dict[str, np.ndarray], record: dict,
               prepare: Callable[[], dict[str, np.ndarray]] | None, rows: tuple[int, int],
               records: tuple[str, ...] = ("",)):
        if prepare is not None:
            arrays = {**arrays, **prepare()}
        handles = {path: self._array(path) for path in arrays}

        async def put_all() -> None:  # every array of the block concurrently, one event loop
            await asyncio.gather(*(handles[p].async_array.setitem(slice(*rows), data)
                                   for p, data in arrays.items()))

        sync(put_all())
        nbytes = sum(data.nbytes for data in arrays.values())
        for sub in records:
            commit.write_block_record(self.uri, f"{self.group}/{sub}".rstrip("/"), start, stop,
                                      {**record, "bytes": nbytes})
        self.bytes += nbytes
        if self._on_written is not None:
            self._on_written(stop - start, nbytes)
        return nbytes

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> int:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
        return self.bytes


def block_arrays(activations: dict[str, np.ndarray], final_images: np.ndarray | None,
                 uncond: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A materialized block as {array path under the variant: rows} (x0 images come from
    the writer's ``prepare``)."""
    out = {f"layers/{layer}/{ACTIVATION}": data for layer, data in activations.items()}
    out.update({f"layers/{layer}/activation_uncond": data
                for layer, data in (uncond or {}).items()})
    if final_images is not None:
        out["final_image"] = final_images
    return out
