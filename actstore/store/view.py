"""Reading a store from a notebook: lazy, dask-backed xarray objects with labelled coordinates.

Every array comes back indexed by ``image`` (the image_id strings, with prompt/seed/split as
extra coordinates) and ``step`` (with timestep and sigma), and restricted to the image
blocks whose completion record exists, so a reader never sees a half-written image even
while workers are still filling the store. Dask chunks are one storage shard
(``block_size`` images × every step), so a computation reads every shard at most once, and
a selection only the inner chunks holding it.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import xarray as xr

from actstore.arguments import check_flag
from actstore.errors import ActstoreError
from actstore.generation.pointnames import KINDS, CapturePoint
from actstore.store import io
from actstore.store.captures import added_captures, kind_blocks, points_of
from actstore.store.core import (ACTIVATION, completed_blocks, layer_path, model_attrs,
                                 model_path, model_variants, read_root_attrs)
from actstore.store.layout import IMAGES


STEP_ATTRS = {
    "step": {"description": "denoising step index, 0 = first (pure noise)"},
    "timestep": {"description": "the scheduler's timestep at this step (0-999, noisiest first)"},
    "sigma": {"description": "the scheduler's noise level at this step (LMS sigma)"},
}


class StoreView:
    """One model variant of a store (``trained`` by default, or ``randomized``)."""

    def __init__(self, uri: str, model: str = "trained", complete_only: bool = True):
        self.uri = io.as_uri(uri)
        self.complete_only = check_flag(complete_only, "complete_only", f"store {self.uri}")
        self.model = model
        self.root_attrs = read_root_attrs(self.uri)
        self.attrs = model_attrs(self.uri, model)

    def __repr__(self) -> str:
        return (f"<actstore {self.uri} model={self.model}: {len(self.image_index)}/"
                f"{self.root_attrs['n_images']} images complete, {len(self.layers)} layers, "
                f"{self.n_steps} steps>")

    def refresh(self) -> "StoreView":
        """See blocks completed since this view was made (a view is a snapshot)."""
        for name in ("blocks", "complete", "image_index", "_image_chunks", "_image_coords",
                     "points"):
            self.__dict__.pop(name, None)
        return self

    @property
    def layers(self) -> list[str]:
        """Every readable capture point's name, by kind (attn1 first), then data flow."""
        return list(self.points)

    @cached_property
    def points(self) -> dict[str, CapturePoint]:
        """Readable capture points by name: the variant's creation kinds, and each kind
        added later whose records cover every complete block (see ``store.captures``)."""
        fingerprint = self.attrs["fingerprint"]
        points = points_of(fingerprint)
        base = self.blocks
        self._pending: dict[str, tuple[int, int]] = {}
        for kind, attrs in added_captures(self.uri, self.model).items():
            done = kind_blocks(self.uri, self.model, kind, fingerprint, base)
            if base <= done:
                points += points_of(attrs["fingerprint"])
            else:
                self._pending[kind] = (len(base & done), len(base))
        points.sort(key=lambda p: KINDS.index(p.kind))
        return {p.name: p for p in points}

    @property
    def pending(self) -> dict[str, tuple[int, int]]:
        """Capture kinds being added, not yet readable: kind → (blocks done, blocks to do);
        found with :attr:`points`, so reading it first no longer answers {}."""
        self.points   # noqa: B018 - computes _pending once per view
        return self._pending

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(p.kind for p in self.points.values()))

    @property
    def layer_shapes(self) -> dict[str, list[int]]:
        """(height, width, channels) of each readable point."""
        return {name: list(p.shape) for name, p in self.points.items()}

    @property
    def n_steps(self) -> int:
        return int(self.attrs["fingerprint"]["generation"]["steps"])

    @property
    def block_size(self) -> int:
        return int(self.root_attrs["block_size"])

    @property
    def models(self) -> list[str]:
        return model_variants(self.uri)

    @cached_property
    def blocks(self) -> set[tuple[int, int]]:
        """The variant's recorded blocks, listed once per snapshot (the image mask and the
        capture kinds' check both need them)."""
        return completed_blocks(self.uri, self.model)

    @cached_property
    def complete(self) -> np.ndarray:
        """Boolean per image (store order): is its block fully written?"""
        mask = np.zeros(self.root_attrs["n_images"], dtype=bool)
        for a, b in self.blocks:
            mask[a:b] = True
        return mask

    @cached_property
    def image_index(self) -> np.ndarray:
        """Store positions of the images this view exposes."""
        if not self.complete_only:
            return np.arange(self.root_attrs["n_images"])
        return np.flatnonzero(self.complete)

    @cached_property
    def _image_coords(self) -> dict:
        table = io.open_dataset(self.uri, IMAGES).load()
        table = table.isel(image=self.image_index)
        return {"image": _strings(table["image_id"]),
                "prompt": ("image", _strings(table["prompt"])),
                "seed": ("image", table["seed"].values),
                "split": ("image", _strings(table["split"])),
                "position": ("image", self.image_index)}

    @cached_property
    def step_coords(self) -> dict:
        """The two step coordinates, read as the two arrays they are (opening the variant's
        group as a dataset read the metadata of every array beside them too)."""
        base = model_path(self.model)
        return {"step": ("step", np.arange(self.n_steps), STEP_ATTRS["step"]),
                **{name: ("step", io.open_array(self.uri, f"{base}/{name}")[...],
                          STEP_ATTRS[name]) for name in ("timestep", "sigma")}}

    @property
    def images(self) -> xr.Dataset:
        """The image table (image_id, prompt, seed, split) of the exposed images."""
        return xr.Dataset(coords=self._image_coords)

    @cached_property
    def _image_chunks(self) -> tuple[int, ...]:
        """Dask chunks along ``image``: the exposed images of each block, so every dask
        chunk is one storage shard even where unrecorded blocks are left out."""
        _, counts = np.unique(self.image_index // self.block_size, return_counts=True)
        return tuple(int(c) for c in counts) or (0,)

    def _open(self, group: str, name: str) -> xr.DataArray:
        """The array restricted to the exposed images, then chunked by shard.

        The restriction is applied to xarray's lazy array before dask sees it: dask then
        reads a selection (one image, one step) by fusing it into each shard's read, so only
        the inner chunks holding it are fetched. Restricting the dask array instead (an
        integer-array ``isel`` on it) hides the shard reads from dask's slice fusion, and
        every selection read whole shards: a block of images × every step (60 times the
        bytes asked for one image and step of SD's 64×64×320 layers)."""
        var = io.open_dataset(self.uri, group, chunks=None)[name]
        shards = var.encoding.get("shards") or var.encoding.get("chunks")
        if len(self.image_index) < var.sizes["image"]:
            var = var.isel(image=self.image_index)
        if var.dtype == np.float16:
            var = _widened(var)
        data = var.chunk({**dict(zip(var.dims, shards)), "image": self._image_chunks})
        # the stored encoding (float16, the store's codecs) would make a selection written
        # out with to_netcdf/to_zarr differ from what it reads as: float16 again, or
        # netCDF3's "does not support type float16"
        data.encoding = {}
        data.attrs.update(self._provenance)
        coords = dict(self._image_coords)
        if "step" in data.dims:
            coords.update(self.step_coords)
        return data.assign_coords(coords)

    @cached_property
    def _provenance(self) -> dict:
        """Which store, variant and model an array came from, on the array itself: once
        selected, combined or saved, nothing else tells a trained layer from the control's
        (the store's location as :func:`io.canonical` names it: a relative path names
        nothing once saved)."""
        return {"store": io.canonical(self.uri), "model_variant": self.model,
                "model": str(self.attrs.get("model", "")),
                "weights_sha256": self.attrs["fingerprint"].get("weights_sha256", "")}

    def __getitem__(self, layer: str) -> xr.DataArray:
        """Activations of one layer: ``(image, step, y, x, channel)``, float32 whatever
        the store holds (:func:`_widened`)."""
        if not isinstance(layer, str):   # view[3], view[[name]]: a TypeError from inside
            hint = (f"view[view.layers[{layer}]] is view[{self.layers[layer]!r}]"
                    if isinstance(layer, (int, np.integer)) and -len(self.layers) <= layer < len(self.layers)
                    else "view[view.layers[i]] for the i-th, one view[name] per layer")
            raise ActstoreError(f"store {self.uri}: a layer is asked for by its name, one of "
                                f"view.layers (got {type(layer).__name__} {layer!r}); {hint}")
        if layer not in self.points:
            kind = layer.partition("/")[0] if "/" in layer else "attn1"
            if kind in self.pending:
                done, total = self.pending[kind]
                raise ActstoreError(f"store {self.uri}: capture kind {kind!r} is still being "
                                    f"added ({done} of {total} blocks); finish it with "
                                    f"`actstore materialize --capture ...,{kind}`")
            raise ActstoreError(f"store {self.uri}: no layer {layer!r}; layers are "
                                f"{', '.join(self.layers)}")
        group = layer_path(self.model, layer).rsplit("/", 1)[0]
        return self._open(group, ACTIVATION).rename(layer)

    @property
    def final_images(self) -> xr.DataArray:
        return self._open(model_path(self.model), "final_image")

    @property
    def has_x0(self) -> bool:
        """Were x0 images decoded when this variant was made (not ``--no-x0``)?"""
        return bool(self.attrs["fingerprint"].get("capture", {}).get("x0", True))

    @property
    def x0_images(self) -> xr.DataArray:
        """The decoded prediction of the clean image at each step, uint8. A variant made
        with ``--no-x0`` has the array but never wrote a chunk of it: read, it was black
        images, silently (sample grids and Figure 4 drew them)."""
        if not self.has_x0:
            raise ActstoreError(f"store {self.uri}: model '{self.model}' was materialized "
                                "with --no-x0, so it has no x0 images; make a store without "
                                "--no-x0 to have them")
        return self._open(model_path(self.model), "x0_image")

    def layer_info(self, layer: str) -> dict:
        return dict(self[layer].attrs)


def _widened(var: xr.DataArray) -> xr.DataArray:
    """float16 values read as float32, lazily, selections still reaching only the chunks
    they need. dask reduces an array in its own dtype, so over stored float16 a ``mean()``
    of more than 65504 values counted to inf and read 0.0 or NaN, a ``sum()`` inf and a
    ``std()`` NaN, silently (one image-step of an SD 64x64x320 layer is 1.3 M values).
    Widening is exact; a computed selection takes twice the memory of its stored bytes.
    Done under dask (an ``astype`` of its chunks) it read whole shards for one image."""
    from xarray.coding.variables import lazy_elemwise_func

    wide = lazy_elemwise_func(var.variable._data, lambda a: np.asarray(a, np.float32),
                              np.dtype(np.float32))
    return var.copy(data=wide)


def _strings(var: xr.DataArray) -> np.ndarray:
    """Zarr v3 strings arrive as numpy's StringDType; pandas indexes want plain ``str``."""
    return np.array([str(v) for v in var.values.tolist()])


def open_store(uri: str, model: str = "trained", complete_only: bool = True, *,
               storage_options: dict | None = None) -> StoreView:
    """Open a store for reading: ``open_store(u)["up_blocks.3.attentions.0"].sel(step=4)``.

    ``model``: the variant, ``"trained"`` or ``"randomized"`` (the weight-permuted control).
    The view, every array lazy: ``view[name]`` the activations ``(image, step, y, x,
    channel)`` of each name in ``view.layers`` (``view.kinds``: the capture kinds),
    ``view.images`` the image table (image_id, prompt, seed, split), ``view.final_images``
    ``(image, y, x, rgb)``, ``view.x0_images`` ``(image, step, y, x, rgb)``, ``view.n_steps``;
    ``view.refresh()`` sees blocks recorded since. ``complete_only=False`` also exposes images
    whose block is not recorded yet (unwritten values read as zeros or fill).

    ``storage_options``: fsspec options for an object store (endpoint, credentials), kept
    in memory for every later call on this store; by default the environment's."""
    if storage_options is not None:
        io.set_storage_options(io.as_uri(uri), storage_options)
    return StoreView(uri, model=model, complete_only=complete_only)
