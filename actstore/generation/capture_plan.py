"""Which capture kinds a run writes on which blocks, and the fingerprints that bind them.

``--capture`` names the kinds a run makes complete on every block of its region; a store's
kinds are never dropped (a run without ``--capture`` keeps the variant's). So on a block:

* not yet stored: generate it with every kind, write everything, then each added kind's
  record and the block's own record (last: it makes the images visible);
* stored but lacking some kinds: regenerate it with their points hooked, check the
  regenerated final images against the stored ones (:mod:`~actstore.generation.regenerate`),
  then write only the missing kinds' arrays and records; nothing stored is rewritten;
* complete: skip.

The layout of kinds added to an existing variant is in :mod:`actstore.store.captures`; a kind
is added under a creation claim on its group (:func:`ensure_added`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from actstore.errors import ActstoreError
from actstore.generation.pointnames import KINDS, VAE_SOURCES, CapturePoint, parse_kinds
from actstore.store import captures as sc
from actstore.store import claims, io
from actstore.store import core as st
from actstore.store import layout as lay

if TYPE_CHECKING:
    from actstore.generation.materialize import CaptureConfig


@dataclass(frozen=True)
class CapturePlan:
    """The kinds of one model variant: as stored, and as this run leaves them."""

    variant: str
    exists: bool
    legacy: bool                    # fingerprint predates capture kinds (attn1 only)
    creation: tuple[str, ...]       # kinds complete with each block's own record
    added: dict                     # kind → attrs of kinds added after creation, as stored
    kinds: tuple[str, ...]          # every kind this run's blocks end up with

    def records(self, kinds: Iterable[str]) -> tuple[str, ...]:
        """Record groups (relative to the variant) for ``kinds`` written on a block."""
        return tuple(f"{lay.CAPTURES}/{k}" for k in kinds if k not in self.creation)


def plan_capture(store: str, variant: str, kinds: str | Iterable[str] | None,
                 vae_source: str) -> CapturePlan:
    """Read what the variant holds; ``kinds`` (None: keep the variant's) is what to add."""
    if vae_source not in VAE_SOURCES:
        raise ActstoreError(f"--vae-source {vae_source!r}: use {' or '.join(VAE_SOURCES)}")
    wanted = parse_kinds(kinds) if kinds is not None else ()
    try:
        fingerprint = st.model_attrs(store, variant)["fingerprint"]
    except ActstoreError:
        fingerprint = None
    if fingerprint is None:
        kinds = wanted or parse_kinds(None)
        return _vae_source_used(CapturePlan(variant, False, False, kinds, {}, kinds),
                                vae_source)
    creation = sc.creation_kinds(fingerprint)
    added = sc.added_captures(store, variant)
    have = set(creation) | set(added) | set(wanted)
    return _vae_source_used(CapturePlan(variant, True, "kinds" not in fingerprint.get(
        "capture", {}), creation, added, tuple(k for k in KINDS if k in have)), vae_source)


def _vae_source_used(plan: CapturePlan, vae_source: str) -> CapturePlan:
    """``--vae-source x0`` only says what the vae kind decodes: a run without that kind
    would accept it and store nothing of it, leaving the user believing x0 was decoded."""
    if vae_source != VAE_SOURCES[0] and "vae" not in plan.kinds:
        raise ActstoreError(f"--vae-source {vae_source}: only the vae capture kind decodes "
                            f"anything, and model '{plan.variant}' gets "
                            f"{','.join(plan.kinds)}; add --capture "
                            f"{','.join(plan.kinds + ('vae',))} or drop --vae-source")
    return plan


def capture_fingerprint(cap: CaptureConfig, kinds: Collection[str], legacy: bool) -> dict:
    """The ``capture`` entry of a variant's fingerprint. A store made before capture kinds
    keeps its entry as it was, so it still matches and extends."""
    out = {"store_dtype": cap.store_dtype, "codec": cap.codec, "keep_uncond": cap.keep_uncond,
           "x0": cap.x0}
    if not legacy:
        out["kinds"] = list(kinds)
        if "vae" in kinds:
            out["vae_source"] = cap.vae_source
    return out


def points_entry(points: list[CapturePoint], legacy: bool) -> dict:
    entry = sc.points_fingerprint(points)
    if legacy:
        del entry["points"]
    return entry


def added_fingerprint(kind: str, cap: CaptureConfig, points: list[CapturePoint]) -> dict:
    return {"kind": kind, **sc.points_fingerprint(points), **added_settings(kind, cap)}


def added_settings(kind: str, cap: CaptureConfig) -> dict:
    """The part of an added kind's fingerprint known without the model (not its points)."""
    return {"kind": kind, **({"vae_source": cap.vae_source} if kind == "vae" else {})}


def check_added(store: str, plan: CapturePlan, cap: CaptureConfig,
                points: list[CapturePoint]) -> None:
    """Refuse a run whose points or options differ from a kind already added; claims left
    on added kinds by creators that died after the marker go on the way."""
    for kind, attrs in plan.added.items():
        claims.sweep(store, lay.capture_group(plan.variant, kind))
        if kind in plan.kinds:
            refuse_other_kind(store, plan, kind, attrs["fingerprint"],
                              added_fingerprint(kind, cap, [p for p in points if p.kind == kind]))


def refuse_other_kind(store: str, plan: CapturePlan, kind: str, stored: dict,
                      want: dict) -> None:
    """The one line refusing a run whose settings for an added kind differ from its
    marker's (found by the run that loaded the model, or by the command before)."""
    diffs = st.diff(stored, want)
    if diffs:
        raise ActstoreError(f"store {store}: capture kind {kind!r} of model "
                            f"'{plan.variant}' was added with other settings "
                            f"({'; '.join(diffs[:2])}); use the same or a new --store")


def ensure_added(store: str, plan: CapturePlan, kinds: Collection[str], *, cap: CaptureConfig,
                 points: list[CapturePoint],
                 provenance: dict, n_steps: int) -> list[str]:
    """Create the arrays and groups of kinds this run adds, marker last; returns the kinds
    created.

    Each kind is created under a creation claim on its group (as the root and variants
    are, :mod:`actstore.store.claims`): two runs adding it with other settings (another
    ``--vae-source``) started together, or a rerun beside a frozen one, would otherwise
    both find no marker and write their markers and blocks over each other. Every claim is
    taken (in :data:`KINDS` order, so two runs never wait on each other crosswise) and
    every kind another run made is compared before anything is created: a refused run
    writes nothing."""
    new = [k for k in KINDS if k in kinds and k not in plan.creation and k not in plan.added]
    if not new:
        return []
    root = st.read_root_attrs(store)
    mine = {k: [p for p in points if p.kind == k] for k in new}
    wanted = {k: added_fingerprint(k, cap, mine[k]) for k in new}
    with ExitStack() as turns:
        found = {k: turns.enter_context(claims.creating(
            store, lay.capture_group(plan.variant, k), wanted[k],
            partial(_added_fingerprint, store, plan.variant, k),
            what=f"capture kind {k!r} of model '{plan.variant}'",
            fix="the same settings for it, or a new --store")) for k in new}
        for kind, existing in found.items():
            if existing is not None:
                refuse_other_kind(store, plan, kind, existing, wanted[kind])
        created = [k for k in new if found[k] is None]
        for kind in created:
            st.create_layer_arrays(store, plan.variant, mine[kind], n=root["n_images"],
                                   n_steps=n_steps, block=root["block_size"], codec=cap.codec,
                                   store_dtype=cap.store_dtype, keep_uncond=cap.keep_uncond)
            sc.create_capture(store, plan.variant, kind, {
                "fingerprint": wanted[kind], **provenance,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    for kind in new:
        plan.added[kind] = {"fingerprint": found[kind] or wanted[kind]}
    return created


def _added_fingerprint(store: str, variant: str, kind: str) -> dict | None:
    marker = (io.node_attrs(store, lay.capture_group(variant, kind)) or {}).get(lay.CAPTURE_KEY)
    return None if marker is None else marker["fingerprint"]


def undo_added(store: str, plan: CapturePlan, created: list[str], points: list[CapturePoint],
               added_blocks: list[tuple[int, int, tuple]]) -> None:
    """Take back what a run added before its regeneration check failed: the records it
    wrote, and the groups and arrays of the kinds it created. Fresh blocks (new images,
    generated and written whole) stay."""
    for kind in {k for _, _, kinds in added_blocks for k in kinds} - set(created):
        if kind not in plan.creation:
            sc.remove_capture(store, plan.variant, kind, [],
                              [(a, b) for a, b, kinds in added_blocks if kind in kinds])
    for kind in created:
        sc.remove_capture(store, plan.variant, kind, [p for p in points if p.kind == kind])
        plan.added.pop(kind, None)


def block_work(store: str, plan: CapturePlan,
               blocks: Iterable[tuple[int, int]]) -> list[tuple[int, int, tuple, bool]]:
    """(start, stop, kinds to write, fresh?) for every block that needs work."""
    base = st.completed_blocks(store, plan.variant) if plan.exists else set()
    done = {k: (base if k in plan.creation else
                st.completed_blocks_at(store, lay.capture_group(plan.variant, k))
                if k in plan.added else set()) for k in plan.kinds}
    work = []
    for a, b in blocks:
        fresh = (a, b) not in base
        missing = tuple(k for k in plan.kinds if fresh or (a, b) not in done[k])
        if missing:
            work.append((a, b, missing, fresh))
    return work
