"""The Zarr v3 store: layout, creation, block writes, completion records.

Layout (every array carries ``dimension_names`` so plain ``xr.open_zarr`` understands it)::

    <store>/                           attrs["actstore"]: schema, images, block size, prompts hash
      images/{image_id,prompt,seed,split}          (image,)
      models/<variant>/                attrs["actstore_model"]: fingerprint + provenance
        timestep, sigma                (step,)
        final_image                    (image, y, x, rgb) uint8
        x0_image                       (image, step, y, x, rgb) uint8: decoded x0 per step
        layers/<layer>/activation      (image, step, y, x, channel) float16
        _blocks/<start>-<stop>/        completion records: empty groups, written last

The image axis is cut into blocks of ``block_size`` images; a block is the unit of work and
of storage: one shard holds one block × all steps of one layer, so every write covers whole
shards (no read-modify-write) and workers filling disjoint blocks never touch the same
object. A block is visible to readers only once its completion record exists.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pandas as pd
import zarr
from zarr.core.sync import sync
from zarr.errors import ContainsArrayError, ContainsGroupError

import actstore
from actstore.store.codecs import codec_chain
from actstore.errors import ActstoreError

ROOT_KEY = "actstore"
MODEL_KEY = "actstore_model"
ACTIVATION = "activation"
DEFAULT_BLOCK_SIZE = 4
# Inner chunks of at least 4 MiB: zarr spends about 1 ms of CPU per chunk written, which cost
# SD-sized layers a third of the write throughput at 1 MiB chunks (side by side, / numpy.save:
# 1 MiB 0.27, 4 MiB 0.33, whole shards 0.42, no zarr 0.44; see README). A reader of one
# image × one step then fetches at most 2 images of the biggest layers.
TARGET_CHUNK_BYTES = 4 << 20
# Chunk keys "c.0.3.0.0.0" (flat, one directory per array) instead of zarr's default
# nested "c/0/3/0/0/0": a new block otherwise creates a directory per key level, and on
# ext4 those mkdirs cost more system time than writing the chunk's bytes.
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}


def model_path(variant: str) -> str:
    return f"models/{variant}"


def layer_path(variant: str, layer: str) -> str:
    return f"models/{variant}/layers/{layer}/{ACTIVATION}"


def _fs(uri: str):
    return fsspec.core.url_to_fs(uri)


def _open(uri: str, path: str = "", mode: str = "r") -> zarr.Group:
    return zarr.open_group(uri, path=path or None, mode=mode, zarr_format=3)


def read_root_attrs(uri: str) -> dict:
    """The store's identity, or a one-line error if ``uri`` is not an actstore store."""
    fs, path = _fs(uri)
    if not fs.exists(path):
        raise ActstoreError(f"store {uri}: does not exist; create it with `actstore materialize`")
    try:
        attrs = dict(_open(uri).attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError) as exc:
        raise ActstoreError(f"store {uri}: exists but is not an actstore store (no Zarr v3 "
                            "group there); choose a new --store path") from exc
    if ROOT_KEY not in attrs:
        raise ActstoreError(f"store {uri}: is a Zarr group but not an actstore store (no "
                            f"'{ROOT_KEY}' attribute); choose a new --store path")
    return attrs[ROOT_KEY]


def create_or_check_root(uri: str, prompts: pd.DataFrame, prompts_sha256: str,
                         block_size: int | None) -> dict:
    """Create the root and image table, or check an existing store holds the same table."""
    fs, path = _fs(uri)
    if fs.exists(path):
        if fs.isdir(path) and not fs.ls(path):
            pass  # an empty folder is as good as nothing
        else:
            attrs = read_root_attrs(uri)
            if attrs["prompts_sha256"] != prompts_sha256:
                raise ActstoreError(
                    f"store {uri}: was created from a different prompt table ({attrs['n_images']} "
                    "images, other ids/prompts/seeds/splits); use the same table or a new --store")
            if block_size is not None and block_size != attrs["block_size"]:
                raise ActstoreError(f"store {uri}: has block size {attrs['block_size']}, not "
                                    f"{block_size}; drop --block-size or use a new --store")
            return attrs
    attrs = {"schema_version": actstore.SCHEMA_VERSION, "n_images": len(prompts),
             "block_size": block_size or DEFAULT_BLOCK_SIZE, "prompts_sha256": prompts_sha256,
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    root = _open(uri, mode="a")
    root.attrs[ROOT_KEY] = attrs
    n = len(prompts)
    split = prompts["split"] if "split" in prompts else pd.Series(["train"] * n)
    columns = {"image_id": (prompts["image_id"].astype(str).to_numpy(), str),
               "prompt": (prompts["prompt"].astype(str).to_numpy(), str),
               "seed": (prompts["seed"].to_numpy(np.int64), "int64"),
               "split": (split.astype(str).to_numpy(), str)}
    for name, (values, dtype) in columns.items():
        arr = _create_array(root, f"images/{name}", shape=(n,), chunks=(max(n, 1),),
                            dtype=dtype, dims=["image"])
        if arr is not None:
            arr[:] = values
    return attrs


def block_layout(shape: tuple[int, ...], block: int, itemsize: int, lead: int,
                 target_bytes: int = TARGET_CHUNK_BYTES) -> tuple[tuple, tuple | None]:
    """(inner chunk, shard) for an array whose ``lead`` first axes are image (and step).

    The shard is the unit of writing: one block of images × all steps, so a block write
    never reads-modifies-writes anything. Inner chunks are what a reader fetches: one image
    × one step, grown over images then steps until ``target_bytes``, since per-chunk
    overhead dominates below a few megabytes (SD's 64×64×320 layers: 2 images × 1 step).
    When a chunk fills its shard, sharding is dropped (shard None).
    """
    shard = (block,) + tuple(shape[1:])
    chunk = [1] * lead + list(shape[lead:])
    cell = itemsize * int(np.prod(shape[lead:]))
    for axis in range(lead):
        while chunk[axis] < shard[axis] and cell * int(np.prod(chunk[:lead])) < target_bytes:
            chunk[axis] = next(d for d in range(chunk[axis] + 1, shard[axis] + 1)
                               if shard[axis] % d == 0)
    chunk = tuple(chunk)
    return chunk, (None if chunk == shard else shard)


def _create_array(group: zarr.Group, name: str, *, shape, chunks, dtype, dims, shards=None,
                  codec: str | None = None, attrs: dict | None = None):
    """Create an array unless an identical one exists (a concurrent worker made it).

    Never overwrite: overwriting would delete another worker's chunks.
    Returns the new array, or None if it already existed.
    """
    chain = codec_chain(codec) if codec else {}
    try:
        return group.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=dtype,
                                  dimension_names=dims, fill_value=0 if dtype != str else "",
                                  chunk_key_encoding=CHUNK_KEY_ENCODING,
                                  attributes=attrs or {}, overwrite=False, **chain)
    except (ContainsArrayError, ContainsGroupError):
        existing = group[name]
        if tuple(existing.shape) != tuple(shape):
            raise ActstoreError(f"store array {name}: has shape {existing.shape}, expected "
                                f"{tuple(shape)}; the store was made differently, use a new --store")
        return None


def check_or_create_model(uri: str, variant: str, fingerprint: dict, provenance: dict,
                          layers: list, n_steps: int, image_hw: tuple[int, int],
                          step_coords: dict[str, np.ndarray], codec: str, store_dtype: str,
                          keep_uncond: bool = False) -> None:
    """Make a model variant's arrays, or refuse if the variant exists with another config."""
    root = read_root_attrs(uri)
    n, block = root["n_images"], root["block_size"]
    try:
        existing = dict(_open(uri, model_path(variant)).attrs).get(MODEL_KEY)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        existing = None
    if existing is not None:
        diffs = _diff(existing["fingerprint"], fingerprint)
        if diffs:
            raise ActstoreError(f"store {uri}: model '{variant}' was made with another model or "
                                f"config ({'; '.join(diffs[:3])}); use a new --store")
        return
    group = _open(uri, mode="a").require_group(model_path(variant))
    h, w = image_hw
    for name, values in step_coords.items():
        arr = _create_array(group, name, shape=(n_steps,), chunks=(n_steps,), dtype="float32",
                            dims=["step"])
        if arr is not None:
            arr[:] = values
    image_arrays = {"final_image": ((n, h, w, 3), ["image", "y", "x", "rgb"], 1),
                    "x0_image": ((n, n_steps, h, w, 3), ["image", "step", "y", "x", "rgb"], 2)}
    for name, (shape, dims, lead) in image_arrays.items():
        chunks, shards = block_layout(shape, block, 1, lead)
        _create_array(group, name, shape=shape, chunks=chunks, shards=shards, dtype="uint8",
                      dims=dims, codec=codec)
    names = [ACTIVATION] + (["activation_uncond"] if keep_uncond else [])
    itemsize = np.dtype(store_dtype).itemsize
    for info in layers:
        shape = (n, n_steps, info.height, info.width, info.channels)
        chunks, shards = block_layout(shape, block, itemsize, 2)
        for name in names:
            _create_array(group, f"layers/{info.name}/{name}", shape=shape, chunks=chunks,
                          shards=shards, dtype=store_dtype,
                          dims=["image", "step", "y", "x", "channel"],
                          codec=codec, attrs={"layer": info.name, "block": info.block,
                                              "resolution": info.height,
                                              "channels": info.channels})
    # Written last: a variant without these attributes is not yet usable.
    group.attrs[MODEL_KEY] = {"fingerprint": fingerprint, **provenance}


def _diff(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: store has {_short(a)}, this run has {_short(b)}")
    return out


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 24 else text[:21] + "..."


def blocks_of(n_images: int, block_size: int, start: int = 0, stop: int | None = None):
    """The (start, stop) image blocks of a region; regions must align with blocks."""
    stop = n_images if stop is None else stop
    return [(a, min(a + block_size, n_images)) for a in range(start, stop, block_size)]


def completed_blocks(uri: str, variant: str) -> set[tuple[int, int]]:
    return completed_blocks_at(uri, model_path(variant))


def completed_blocks_at(uri: str, group: str) -> set[tuple[int, int]]:
    """The (start, stop) blocks recorded complete under ``<group>/_blocks``."""
    fs, path = _fs(uri)
    done = set()
    for name in fs.glob(f"{path.rstrip('/')}/{group}/_blocks/*/zarr.json"):
        a, b = name.rsplit("/", 2)[-2].split("-")
        done.add((int(a), int(b)))
    return done


def _write_record(uri: str, group: str, start: int, stop: int, record: dict) -> None:
    """Record a finished block as a Zarr group whose ``zarr.json`` appears atomically.

    A record is an empty group (so plain zarr tools see a valid hierarchy) holding the
    record in its attributes; its metadata file is written to a temporary name and renamed
    (one PUT on object stores), so a kill leaves either no record or a whole one. The
    parent ``<group>/_blocks`` must exist (:class:`BlockWriter` makes it).
    """
    fs, path = _fs(uri)
    node = f"{path.rstrip('/')}/{group}/_blocks/{start:08d}-{stop:08d}"
    fs.makedirs(node, exist_ok=True)
    meta = {"zarr_format": 3, "node_type": "group", "attributes": {"block": record}}
    tmp = f"{node}/.zarr.json.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(tmp, json.dumps(meta).encode())
    fs.mv(tmp, f"{node}/zarr.json")


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
        self._group = _open(uri, group, mode="r+")
        self._group.require_group("_blocks")   # once, not per record
        self._arrays: dict[str, zarr.Array] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="actstore-writer")
        self._pending = None
        self._on_written = on_written
        self.bytes = 0

    def _array(self, path: str) -> zarr.Array:
        if path not in self._arrays:  # whole blocks: skip zarr's scan for all-fill chunks
            self._arrays[path] = self._group[path].with_config({"write_empty_chunks": True})
        return self._arrays[path]

    def submit(self, start: int, stop: int, arrays: dict[str, np.ndarray], record: dict,
               prepare: Callable[[], dict[str, np.ndarray]] | None = None,
               rows: tuple[int, int] | None = None) -> None:
        """Queue ``arrays`` (array path under the group → this block's rows) and then the
        completion record of store block ``start:stop``; waits for the previous block
        first. ``rows`` is where the arrays go when it is not ``start:stop`` (an
        experiment holding a subset of the store's images). ``prepare`` runs in the writer
        before anything is written and returns more arrays (work moved off the caller's
        critical path); if it raises, the block is not stored."""
        self.wait()
        self._pending = self._pool.submit(self._write, start, stop, arrays, record, prepare,
                                          rows or (start, stop))

    def _write(self, start: int, stop: int, arrays: dict[str, np.ndarray], record: dict,
               prepare: Callable[[], dict[str, np.ndarray]] | None, rows: tuple[int, int]):
        if prepare is not None:
            arrays = {**arrays, **prepare()}
        handles = {path: self._array(path) for path in arrays}

        async def put_all() -> None:  # every array of the block concurrently, one event loop
            await asyncio.gather(*(handles[p].async_array.setitem(slice(*rows), data)
                                   for p, data in arrays.items()))

        sync(put_all())
        nbytes = sum(data.nbytes for data in arrays.values())
        _write_record(self.uri, self.group, start, stop, {**record, "bytes": nbytes})
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


def block_arrays(activations: dict[str, np.ndarray], final_images: np.ndarray,
                 uncond: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A materialized block as {array path under the variant: rows} (x0 images come from
    the writer's ``prepare``)."""
    out = {f"layers/{layer}/{ACTIVATION}": data for layer, data in activations.items()}
    out.update({f"layers/{layer}/activation_uncond": data
                for layer, data in (uncond or {}).items()})
    out["final_image"] = final_images
    return out


def model_variants(uri: str) -> list[str]:
    try:
        return sorted(name for name, _ in _open(uri, "models").groups())
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return []


def model_attrs(uri: str, variant: str) -> dict:
    try:
        attrs = dict(_open(uri, model_path(variant)).attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        attrs = {}
    if MODEL_KEY not in attrs:
        raise ActstoreError(f"store {uri}: has no model '{variant}' (has: "
                            f"{', '.join(model_variants(uri)) or 'none'}); materialize it first")
    return attrs[MODEL_KEY]
