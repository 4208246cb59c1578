"""Checking an intervention experiment's inputs against the store, before anything runs.

Each check raises a one-line :class:`ActstoreError` that says what is wrong and how to
fix it, and none of them writes: a rejected experiment leaves the store byte-for-byte as
it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from actstore.store import core as st
from actstore.store.view import StoreView
from actstore.errors import ActstoreError, InputError
from actstore.options import start_stop
from actstore.intervene.results import existing_settings
from actstore.label.blocks import shared_provider
from actstore.store import io, labelsets
from actstore.generation.models import TINY_RANDOM, LoadedModel, apply_control, load_model

if TYPE_CHECKING:
    from actstore.intervene.plan import Plan
    from actstore.label.providers import LabelProvider


def select_images(view: StoreView, images: str | Sequence[str] | None) -> np.ndarray:
    """Store positions of the chosen images, in store order.

    ``None``: the test split (the paper intervenes on test images), or every image if the
    table has no test split. ``"A:B"``: store positions. Otherwise image ids, as a list or
    one comma-separated string. Every chosen image must be fully materialized.
    """
    table = view.images
    ids = np.array([str(v) for v in table["image"].values])
    n = len(ids)
    if images is None or (not isinstance(images, str) and len(images) == 0):
        test = np.flatnonzero(table["split"].values == "test")
        positions = test if test.size else np.arange(n)
    elif isinstance(images, str) and ":" in images:
        positions = _region(images, n)
    else:
        wanted = images.split(",") if isinstance(images, str) else [str(i) for i in images]
        if len(wanted) == 1 and ":" in wanted[0]:
            positions = _region(wanted[0], n)
        else:
            row = {v: i for i, v in enumerate(ids)}
            missing = [w for w in wanted if w not in row]
            if missing:
                raise InputError(f"image(s) {', '.join(missing[:3])} are not in store "
                                 f"{view.uri} ({n} images, {ids[0]} ... {ids[-1]})")
            positions = np.array(sorted({row[w] for w in wanted}), dtype=np.int64)
    unfinished = positions[~view.complete[positions]]
    if unfinished.size:
        raise ActstoreError(f"image {ids[unfinished[0]]!r} (and {unfinished.size - 1} more) "
                            f"is not materialized yet in model {view.model!r}; finish "
                            "`actstore materialize` first or choose other --images")
    return np.asarray(positions, np.int64)


def _region(text: str, n: int) -> np.ndarray:
    return np.arange(*start_stop(text, n, expected="START:STOP or image ids", holder="the store"))


def resolve_provider(provider: str | LabelProvider | None, label_attrs: dict, target: str,
                     kind: str,
                     device: str) -> tuple[object, str]:
    """The label model that reads the intervened images, and its spec for the settings.

    Defaults to the provider that made the stored labels, so pre and post scores use the
    same reader as the probes' targets. Providers that look labels up by image id (user
    arrays) can't read new images: a pixel-based provider must be passed instead.
    """
    spec = provider_spec(provider, label_attrs, target)
    if provider is None or isinstance(provider, str):
        try:   # this process's, kept: a sweep's experiments on one worker share it
            provider = shared_provider(spec, device)
        except ActstoreError as exc:
            raise ActstoreError(f"label provider {spec} can't be loaded to read intervened "
                                f"images ({exc}); pass --provider with one that can") from None
    if getattr(provider, "by_ids", None) is not None:
        raise InputError(f"label provider {spec} looks labels up by image id, so it can't "
                         "label intervened images; pass --provider with a label model "
                         "(toyworld, hf-depth:FOLDER, hf-segmentation:FOLDER)")
    made = getattr(provider, "targets", {})
    if made.get(target) != kind:
        raise InputError(f"label provider {spec} makes no {kind} target {target!r} (it "
                         f"makes {', '.join(f'{t} ({k})' for t, k in made.items()) or 'none'})")
    return provider, str(spec)


def provider_spec(provider: str | LabelProvider | None, label_attrs: dict, target: str) -> str:
    """How an experiment's record names its label provider, without loading it (the
    command's early check of a named experiment compares it): the spec given, else the
    one that made the labels, else a provider object's own name."""
    if provider is None:
        spec = label_attrs.get("provider")
        if not spec:
            raise ActstoreError(f"labels {target!r} record no provider; pass --provider")
        return str(spec)
    if isinstance(provider, str):
        return provider
    return str(getattr(provider, "spec", None) or getattr(provider, "name",
                                                          type(provider).__name__))


def store_model_ref(view: StoreView) -> tuple[str, str, str]:
    """Where the store's model loads from, its dtype and variant (trained, randomized)."""
    attrs, fp = view.attrs, view.attrs["fingerprint"]
    name = attrs.get("model", "")
    ref = name if name == TINY_RANDOM else (attrs.get("model_source") or name)
    return ref, fp["dtype"], fp["variant"]


def load_store_model(view: StoreView, model: LoadedModel | None, device: str) -> LoadedModel:
    """The model that made the store (same weights, dtype and variant), or a refusal."""
    fp = view.attrs["fingerprint"]
    if model is None:
        ref, dtype, variant = store_model_ref(view)
        model = load_model(ref, dtype=dtype, device=device)
        model = apply_control(model, None if variant == "trained" else variant)
    dtype = str(model.dtype).replace("torch.", "")
    if dtype != fp["dtype"]:
        raise ActstoreError(f"store {view.uri}: was generated in {fp['dtype']}, the model "
                            f"given is {dtype}; load it with dtype={fp['dtype']}")
    if model.weights_hash != fp["weights_sha256"]:
        raise ActstoreError(f"store {view.uri}: was made with other weights than model "
                            f"{model.name!r} (variant {model.variant}); interventions must "
                            "use the store's own model")
    return model


def check_existing(store: str, experiment_id: str, settings: dict,
                   unknown: tuple[str, ...] = ()) -> None:
    """A rerun resumes an experiment only if nothing that shapes its results changed.

    ``unknown``: fields of the record left out on both sides, for a check made before
    what they come from is read (the command's, before a cluster starts); the planning
    worker then compares them all, in the same words."""
    old = existing_settings(store, experiment_id)
    if old is None:
        return
    old, settings = ({k: v for k, v in d.items() if k not in unknown} for d in (old, settings))
    if old != settings:
        diffs = st.diff(old, settings)
        raise ActstoreError(f"store {store}: experiment {experiment_id} exists with other "
                            f"settings ({'; '.join(diffs[:2])}); drop --experiment to start "
                            "a new one")


def label_rows(plan: Plan, target: str, positions: np.ndarray) -> np.ndarray:
    """Stored full-resolution labels (n, H, W) of some images, normalized units, from the
    version the plan pinned; checked still there after the read (a missing chunk reads as
    the fill value, which must never become an experiment's targets)."""
    path = plan.label_paths[target]
    try:
        return np.asarray(io.open_array(plan.store, f"{path}/full").oindex[
            np.asarray(positions)], np.float32)
    finally:   # after the read, or after it failed: say so if the version went
        labelsets.check_readable(plan.store, target, path, "actstore intervene")
