"""Probe targets in the store: per-pixel labels of each image, at every resolution a probe needs.

Labels are made from the **final images of one variant** (``source_model``, the trained
model by default) and serve as targets for every variant's activations, the randomized
control included, as in the paper: the question is whether a model's activations encode
the scene of the image the trained model draws, and the control must be scored against
the same targets to be a control at all. Layout, one group per target version (which
version is current: ``labels/_commits/``, see :func:`list_targets`)::

    labels/<target>/<version>/       attrs: target, kind, provider, source_model,
                                       normalization, mean, std, created, version, ...
      full   (image, y, x)           float32 at image resolution; z-scored or 0/1
      r<h>   (image, y_r<h>, x_r<h>) float32 area mean of ``full`` at each layer
                                       token grid (binary: salient fraction; target > 0.5)
      x0     (image, step, y, x)     float32 the provider on each step's decoded x0 image,
                                       same normalization (the paper's Figure 4)

Continuous targets are z-scored with the mean/std over all pixels of the **train** split,
so test images never leak into the targets. Each run writes its targets as fresh versions
and commits them together with one record (:mod:`actstore.store.labelsets`): a failed or
killed run leaves nothing a reader sees, several targets become visible all at once, and
an overwrite replaces the old labels in one step. Several targets of one provider are
written in one pass over the images (one provider call per batch, see
:mod:`actstore.label.passes`). Nothing outside ``labels/`` is ever written, so labelling
never touches activations.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import xarray as xr

import actstore
from actstore.store import core as st
from actstore.store import io, labelsets
from actstore.store.view import StoreView
from actstore.errors import ActstoreError
from actstore.label import blocks
from actstore.label.passes import PassContext, by_size, resolution_name
from actstore.kinds import CONTINUOUS, KINDS
from actstore.label.providers import LabelProvider, get_provider
from actstore.label.settings import LabelSettings
from actstore.options import named_once
from actstore.progress import Progress

if TYPE_CHECKING:
    import zarr

TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def write_labels(store: str, provider: str | LabelProvider,
                 target: str | list[str] | tuple[str, ...],
                 settings: LabelSettings | None = None, *, progress: bool = True,
                 **options: Any) -> dict:
    """Label the store's final images with ``provider`` and write ``target``, one or several.

    ``provider``: a spec (``toyworld``, ``hf-depth:FOLDER``, ``hf-segmentation:FOLDER``, or
    ``array:FILE`` for your own labels: an ``.npz``/Zarr group with ``image_id`` and one
    ``(N, H, W)`` array per target; see :mod:`actstore.label.providers`) or a provider object.

    ``settings`` (default :class:`LabelSettings`), with any of its fields given as keyword
    ``options`` on top (``overwrite=True``, ``on_x0=False``...).

    Several targets share one provider call per batch of images: a label model that makes
    them together runs once over the images, not once per target. Everything that can be
    checked is checked for every target before the first byte is written; bad labels found
    later (e.g. NaN from the label model) remove every partial target, so an error leaves
    the store unchanged, with no target of the set written. A run killed or failed for
    another reason is resumed by the next run of the same job, block by block
    (:mod:`actstore.label.blocks`). Returns a summary for one name, ``{target: summary}``
    for a list.
    """
    t0 = time.perf_counter()
    settings = (settings or LabelSettings()).with_options(**options)
    prov = get_provider(provider, settings.device) if isinstance(provider, str) else provider
    job = prepare_labels(store, prov, target, settings)
    bar = Progress(len(job.ids), 1 + job.n_steps, f"label {', '.join(job.kinds)}",
                   enabled=progress)
    try:
        blocks.run_blocks(job, blocks.PASS1, blocks.pending(job, blocks.PASS1), prov=prov,
                          bar=bar)
        constants = blocks.stats(job)
        blocks.run_blocks(job, blocks.PASS2, blocks.pending(job, blocks.PASS2), constants,
                          prov=prov, bar=bar)
        out = commit_labels(job, prov, constants)
    except ActstoreError:
        abort_labels(job)
        raise
    finally:
        labelsets.release(job.paths)
        bar.close()
    for summary in out.values():
        summary["seconds"] = time.perf_counter() - t0
    return out[target] if isinstance(target, str) else out


class LabelRequest(NamedTuple):
    """What :func:`check_labels` read and worked out, for :func:`prepare_labels` to use."""
    spec: str
    targets: list[str]
    kinds: dict[str, str]
    view: StoreView
    existing: dict[str, dict | None]
    ids: list[str]
    train: np.ndarray
    hw: tuple[int, int]
    grids: dict[str, tuple[int, int]]
    x0_note: str | None


def check_labels(store: str, prov: LabelProvider, target: str | list[str] | tuple[str, ...],
                 settings: LabelSettings = LabelSettings()) -> LabelRequest:
    """Every check of a label run that reads and writes nothing but the store's records
    and the provider's description: a fan-out runs it before it starts a cluster (a
    mistyped --target or store took a `--workers 2` run 43 s of cluster start-up to
    refuse, 2026-12-07), then again as it begins the run."""
    targets = _target_names(target)
    spec = getattr(prov, "spec", None) or getattr(prov, "name", type(prov).__name__)
    kinds = {t: _target_kind(prov, spec, t) for t in targets}
    view = StoreView(store, model=settings.source_model, complete_only=False)
    _check_complete(view)
    existing = _existing(store, targets, settings.overwrite)
    ids = [str(v) for v in view.images["image"].values]
    train = view.images["split"].values == "train"
    if not train.any():
        raise ActstoreError(f"store {store}: no train-split images to normalize labels with; "
                            "give some images split=train in the prompt table")
    hw = tuple(int(d) for d in st.model_array(store, settings.source_model,
                                               "final_image").shape[1:3])
    check = getattr(prov, "check", None)
    if check is not None:
        check(ids, hw)
    x0_note = _x0_decision(view, settings.on_x0, getattr(prov, "by_ids", None))
    return LabelRequest(spec, targets, kinds, view, existing, ids, train, hw,
                        _layer_grids(view, hw), x0_note)


def prepare_labels(store: str, prov: LabelProvider, target: str | list[str] | tuple[str, ...],
                   settings: LabelSettings = LabelSettings()) -> blocks.LabelJob:
    """Check everything, then begin (or resume) the run's versions and make their arrays.

    The calling process holds the versions' writer marks until :func:`commit_labels` or
    :func:`abort_labels` (then ``labelsets.release(job.paths)``)."""
    spec, targets, kinds, view, existing, ids, train, hw, grids, x0_note = \
        check_labels(store, prov, target, settings)
    source_model, overwrite = settings.source_model, settings.overwrite
    batch_size, device = settings.batch_size, settings.device
    n_steps = view.n_steps if x0_note is None else 0
    provenance = getattr(prov, "provenance", {})
    key = blocks.job_key(spec, provenance, {
        "targets": targets, "source_model": source_model, "n_steps": n_steps,
        "batch_size": batch_size, "ids": ids, "block": view.block_size})
    # looked at again after the run's look for a version to resume: a run of the same job
    # that committed since the look above would otherwise be labelled again beside it
    paths = labelsets.begin(store, targets, key, fresh=lambda: _existing(store, targets,
                                                                          overwrite))
    job = blocks.LabelJob(store=store, spec=spec, device=device, kinds=kinds, paths=paths,
                          ids=tuple(ids), train=tuple(bool(x) for x in train), hw=hw,
                          block=view.block_size, batch_size=batch_size,
                          source_model=source_model, grids=grids, n_steps=n_steps,
                          x0_note=x0_note,
                          replaced=tuple(t for t in targets if existing[t] is not None),
                          tokens=labelsets.tokens(paths))
    try:
        blocks.create_arrays(job)
    except BaseException:
        labelsets.release(paths)
        raise
    return job


def commit_labels(job: blocks.LabelJob, prov: LabelProvider, constants: dict) -> dict:
    """Make every target of the run visible at once; ``{target: summary}``."""
    blocks.drop_staging(job)
    ctx = job.context(prov)
    n_train = sum(job.train)
    attrs = {t: _target_attrs(ctx, t, job.source_model, *constants[t], n_train, job.grids,
                              job.x0_note) for t in job.kinds}
    labelsets.commit_set(job.store, job.paths, attrs)   # all targets visible at once
    return {t: {"store": job.store, "target": t, "kind": kind, "provider": job.spec,
                "images": len(job.ids), "resolutions": by_size(attrs[t]["resolutions"]),
                "x0": attrs[t]["x0"], "x0_note": job.x0_note, "mean": constants[t][0],
                "std": constants[t][1], "replaced": t in job.replaced}
            for t, kind in job.kinds.items()}


def abort_labels(job: blocks.LabelJob) -> None:
    """Remove the run's versions: the labels were bad, the same job would fail again."""
    labelsets.abort(job.store, job.paths)


def _existing(store: str, targets: list[str], overwrite: bool) -> dict[str, dict | None]:
    """Each target's current labels (None: none); refused in one line unless ``overwrite``."""
    existing = {t: _attrs_or_none(store, t) for t in targets}
    for t, attrs in existing.items():
        if attrs is not None and not overwrite:
            raise ActstoreError(f"store {store}: already has labels {t!r} (from "
                                f"{attrs.get('provider')}); pass --overwrite to replace them")
    return existing


def _target_names(target) -> list[str]:
    """One name or several, in the order given, all valid before anything runs; a name
    given twice is refused (``--target depth depth`` labelled depth once, without a word)."""
    names = list(target) if isinstance(target, (list, tuple)) else [target]
    if not names:
        raise ActstoreError("no target given; name at least one (e.g. --target depth)")
    for t in names:
        if not isinstance(t, str) or not TARGET_NAME.match(t):
            raise ActstoreError(f"target {t!r}: use letters, digits, '_', '.', '-' (not "
                                "starting with '_' or '.')")
    named_once("--target", "target", names)
    return names


def _target_kind(prov, spec: str, target: str) -> str:
    if target not in prov.targets:
        raise ActstoreError(f"provider {spec} makes no target {target!r}; it makes "
                            f"{', '.join(prov.targets) or 'none'}")
    kind = prov.targets[target]
    if kind not in KINDS:
        raise ActstoreError(f"provider {spec}: target {target!r} has kind {kind!r}, not one "
                            f"of {KINDS}")
    return kind


def _target_attrs(ctx: PassContext, target: str, source_model: str, mean, std, n_train: int,
                  grids: dict, x0_note: str | None) -> dict:
    """Provenance and normalization: enough to undo the z-score and to redo the labels."""
    prov, kind = ctx.prov, ctx.kinds[target]
    return {"target": target, "kind": kind, "provider": ctx.spec,
            "provider_name": getattr(prov, "name", type(prov).__name__),
            "provider_provenance": getattr(prov, "provenance", {}),
            "source_model": source_model,
            "normalization": "zscore-train" if kind == CONTINUOUS else "none",
            "mean": mean, "std": std, "n_train_images": n_train,
            "image_size": list(ctx.hw),
            "resolutions": {resolution_name(*g): list(g) for g in grids.values()},
            "layer_arrays": {layer: resolution_name(*g) for layer, g in grids.items()},
            "x0": x0_note is None, "x0_note": x0_note,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "actstore_version": actstore.__version__}


def _check_complete(view: StoreView) -> None:
    n = view.root_attrs["n_images"]
    done = st.completed_blocks(view.uri, view.model)
    missing = [blk for blk in st.blocks_of(n, view.block_size) if blk not in done]
    if missing:
        names = ", ".join(f"{a}:{b}" for a, b in missing[:4])
        raise ActstoreError(f"store {view.uri}: model '{view.model}' is incomplete ({len(missing)}"
                            f" image blocks missing: {names}{', ...' if len(missing) > 4 else ''})"
                            "; finish it with `actstore materialize` before labelling")


def _layer_grids(view: StoreView, hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Each capture point's token grid (h, w), whatever its kind."""
    grids = {layer: (int(s[0]), int(s[1])) for layer, s in view.layer_shapes.items()}
    for h, w in set(grids.values()):
        if hw[0] % h or hw[1] % w:
            raise ActstoreError(f"store {view.uri}: image size {hw[0]}x{hw[1]} is not a "
                                f"multiple of token grid {h}x{w}; labels can't be pooled exactly")
    return grids


def _x0_decision(view: StoreView, on_x0: bool, by_ids) -> str | None:
    """None if x0 labels will be written, else why not (kept in the attrs)."""
    if not on_x0:
        return "not requested"
    if by_ids is not None:
        return "provider looks labels up by image id; it can't label x0 images"
    if not view.attrs["fingerprint"].get("capture", {}).get("x0", True):
        return "store was materialized without x0 images"
    return None


def _labels_to_read(target: object, have: list[str]) -> str:
    """What to do about a target without labels. A notebook's typo ('dpeth') was told to
    label it (`actstore label --target dpeth`), and open_labels(u, None) to run
    `actstore label --target None`: a near name is offered first, a non-name refused."""
    import difflib

    if not isinstance(target, str) or not target or "/" in target:
        return "name a target by its name, one of those"
    near = difflib.get_close_matches(target, have, n=1)
    then = f"did you mean {near[0]!r}? else " if near else ""
    return f"{then}write them with `actstore label --target {target}`"


def _attrs_or_none(store: str, target: str) -> dict | None:
    """A target's attributes (with ``path``), or None if it has no committed labels."""
    return labelsets.current(store).get(target)


def _current_attrs(store: str, target: str) -> dict:
    attrs = _attrs_or_none(store, target)
    if attrs is None:
        raise ActstoreError(f"store {store}: no labels {target!r}; write them with "
                            f"`actstore label --target {target}`")
    return attrs


def label_path(store: str, target: str) -> str:
    """The group holding a target's current label arrays (for plain zarr/xarray readers)."""
    return _current_attrs(store, target)["path"]


def array_names(attrs: dict) -> list[str]:
    """The arrays a label version holds, from its attributes: ``full``, each token grid's
    ``r<h>`` (smallest first), ``x0`` if it was labelled on the x0 images."""
    return ["full", *by_size(attrs.get("resolutions") or {}), *(["x0"] if attrs.get("x0")
                                                               else [])]


def label_array(store: str, target: str, name: str = "full") -> zarr.Array:
    """One array of a target's current labels (``full``, ``r<h>``, ``x0``) for reading.

    A name the version lacks (a grid no layer has, ``x0`` of labels made without) is
    refused naming the ones it has: zarr's 'No array found ... at path labels/<target>/
    v-.../r64' told neither."""
    attrs = _current_attrs(store, target)
    names = array_names(attrs)
    if name not in names:
        raise ActstoreError(f"store {store}: labels {target!r} have no array {name!r}; they "
                            f"have {', '.join(names)}")
    return io.open_array(store, f"{attrs['path']}/{name}")


def list_targets(store: str) -> dict[str, dict]:
    """The store's complete label targets and their attributes."""
    st.read_root_attrs(store)
    return {t: {k: v for k, v in attrs.items() if k not in ("path", "commit", "version")}
            for t, attrs in sorted(labelsets.current(store).items())}


# stored attribute -> its name on open_labels' Dataset: xarray reads ``ds.x0`` as the
# attribute when the data variable is absent, so a target labelled without x0 images
# answered ``ds.x0`` with False instead of failing
DATASET_ATTRS = {"x0": "has_x0"}


def open_labels(store: str, target: str) -> xr.Dataset:
    """A target as a lazy Dataset indexed like :class:`StoreView` (image ids, split, steps).

    Its data variables: ``full``, one ``r<h>`` per token grid the store's layers have, and
    ``x0`` if the labels were made on each step's x0 image (``ds.attrs["has_x0"]``; if not,
    ``x0_note`` says why); ``list(ds.data_vars)`` shows which. ``ds["r8"].rename(y_r8="y",
    x_r8="x")`` lines a pooled label up with a layer's ``(image, step, y, x, channel)``
    activations.
    """
    attrs = _attrs_or_none(store, target)
    if attrs is None:
        have = list(list_targets(store))
        raise ActstoreError(f"store {store}: no complete labels {target!r} (has: "
                            f"{', '.join(have) or 'none'}); {_labels_to_read(target, have)}")
    ds = io.open_dataset(store, attrs["path"])
    ds.attrs = {DATASET_ATTRS.get(k, k): v for k, v in ds.attrs.items()}
    view = StoreView(store, model=attrs["source_model"], complete_only=False)
    ds = ds.assign_coords(view.images.coords)
    if "step" in ds.dims:   # the view's two step arrays, not every array of the variant
        ds = ds.assign_coords(step=np.arange(ds.sizes["step"]),
                              timestep=view.step_coords["timestep"],
                              sigma=view.step_coords["sigma"])
    return ds
