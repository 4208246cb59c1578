"""A model variant's fingerprint: everything that changes what its arrays hold.

A store refuses a run whose fingerprint differs from its variant's. The whole fingerprint
needs the model loaded (its weights' sha256, its capture points' shapes), so the run that
loads it found every difference: with ``--workers`` a worker, after ~30 s of cluster
start-up, and the refusal named that worker. The rest (model dtype, generation settings,
the scheduler's config, the capture settings) comes from the command line and the model
folder's JSON files: :func:`check_stored_settings` compares that much before a cluster, a
Prefect server or a model starts, and refuses in the same words; weights replaced in the
same folder are left to the run that loads them (why: :func:`check_stored_settings`).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import TYPE_CHECKING

from actstore.errors import ActstoreError
from actstore.generation.capture_plan import (CapturePlan, added_settings, capture_fingerprint,
                                              plan_capture, points_entry, refuse_other_kind)
from actstore.generation.models import (LoadedModel, folder_facts, resolve_dtype,
                                        variant_of)
from actstore.store import core as st

if TYPE_CHECKING:
    from actstore.generation.materialize import CaptureConfig, MaterializeSettings
    from actstore.generation.sampling import GenerationConfig
    import torch



def model_fingerprint(model: LoadedModel, gen: GenerationConfig, cap: CaptureConfig,
                      points: list, plan: CapturePlan | None = None) -> dict:
    """Everything that changes what a variant's arrays hold; a store refuses a mismatch.
    ``points`` are the variant's creation points (kinds added later have their own)."""
    kinds = plan.creation if plan else tuple(dict.fromkeys(p.kind for p in points))
    legacy = bool(plan and plan.legacy)
    return {"weights_sha256": model.weights_hash,
            **settings_fingerprint(model.variant, model.dtype, gen, model.scheduler_config,
                                   cap, kinds, legacy),
            **points_entry(points, legacy)}


def settings_fingerprint(variant: str, dtype: torch.dtype | str, gen: GenerationConfig,
                         scheduler_config: dict, cap: CaptureConfig,
                         kinds: tuple[str, ...], legacy: bool) -> dict:
    """The fingerprint's parts known without the weights, in the fingerprint's order."""
    return {"variant": variant, "dtype": str(dtype).replace("torch.", ""),
            "generation": asdict(gen), "scheduler_config": _jsonable(scheduler_config),
            "capture": capture_fingerprint(cap, kinds, legacy)}


def _jsonable(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def check_stored_settings(store: str, model: str, settings: MaterializeSettings) -> None:
    """Refuse settings the stored variant was not made with, before a model loads, in the
    line the model's run would say; a bad ``--height``/``--width`` and a ``--vae-source``
    without the vae kind too. Reads only.

    Decided here only when this run's model folder is the one the variant was made from:
    from another folder the weights may differ too, and the model's run names them first.
    A folder this machine lacks (a ``--cluster`` whose workers hold the model) leaves it
    all to the workers. Kinds added to a variant are no difference (they are checked by
    regenerating stored blocks); the options of a kind added earlier are.

    Weights replaced in the same folder (retrained in place, same file names) pass here
    and are refused by the run that loads the model, before it writes: ``weights_sha256``
    is a hash of the tensors as loaded (state-dict names after diffusers' key conversions,
    the load dtype), which no file-level fingerprint matches, and a safetensors file's
    header and size stay the same when same-shaped weights change. Computing it here
    means loading and hashing the model in the command on every run: 1.4-4.7 ms become
    0.16-0.28 s for the toy LDM, and sha256 alone (0.6-0.9 GiB/s) takes 4-6 s over SD
    v1.4's 3.97 GiB, before the loading and on top of the workers' own hash, to bring
    forward a refusal that is rare (``benchmarks/bench_weights_check.py``, 2026-12-06)."""
    variant, cap = variant_of(settings.control), settings.cap
    plan = plan_capture(store, variant, cap.kinds, cap.vae_source)
    try:
        facts = folder_facts(model)
    except (ActstoreError, OSError, ValueError, KeyError):
        return
    gen = settings.gen.at_size(facts.native_size)
    gen.check_size(facts.vae_scale_factor)
    if not plan.exists:
        return
    stored = st.model_attrs(store, variant)
    if not _same_folder(facts.path, stored.get("model_source")):
        return
    wanted = settings_fingerprint(variant, resolve_dtype(settings.dtype), gen,
                                  facts.scheduler_config, cap, plan.creation, plan.legacy)
    st.refuse_other_config(store, variant, _part(stored["fingerprint"], wanted), wanted)
    for kind, attrs in plan.added.items():
        if kind in plan.kinds:
            want = added_settings(kind, cap)
            refuse_other_kind(store, plan, kind, _part(attrs["fingerprint"], want), want)


def _part(stored: dict, wanted: dict) -> dict:
    """The stored entries ``wanted`` has, in the stored order (the order a refusal names
    its differences in)."""
    return {k: v for k, v in stored.items() if k in wanted}


def _same_folder(path: str, source: str | None) -> bool:
    return bool(source) and os.path.realpath(path) == os.path.realpath(source)
