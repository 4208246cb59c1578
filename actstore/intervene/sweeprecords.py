"""A sweep's stored record, ``sweeps/<sweep_id>``: its id, its headline result, how it is
written and read (what the sweep does: :mod:`actstore.intervene.sweep`).

The id is a hash of what the sweep is (run, settings, image sets), so rerunning the same
sweep finds and resumes the same experiments and rewrites the same record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields

from actstore.arguments import check_name
from actstore.errors import ActstoreError
from actstore.intervene.results import existing_settings
from actstore.intervene.settings import SweepSettings, without_later_defaults
from actstore.store import io
from actstore.store import layout as lay
from actstore.store.core import listed


def same_labels(store: str, sweep_id: str, experiments: list[str]) -> None:
    """A sweep compares its experiments: all must have read the same label versions (a
    relabel during the sweep gives the later ones other labels). Experiments made before
    their records named the versions count as one version."""
    seen = {json.dumps((existing_settings(store, e) or {}).get("labels"), sort_keys=True)
            for e in experiments}
    if len(seen) > 1:
        raise ActstoreError(f"store {store}: sweep {sweep_id}: its experiments read different "
                            "versions of the labels (relabelled during the sweep); nothing "
                            "was recorded, rerun `actstore sweep`")


def settings_json(settings: SweepSettings) -> dict:
    """The sweep's settings as JSON; a provider object is named by its spec."""
    base = without_later_defaults({f.name: getattr(settings.base, f.name)
                                   for f in fields(settings.base)})   # old sweeps keep ids
    prov = base["provider"]
    base["provider"] = prov if prov is None or isinstance(prov, str) else \
        str(getattr(prov, "spec", type(prov).__name__))
    out = {f.name: getattr(settings, f.name) for f in fields(settings) if f.name != "base"}
    return json.loads(json.dumps({**out, "base": base}))


def sweep_id_of(record: dict) -> str:
    """Where a sweep runs is no part of what it is (its experiments' ids leave the device
    out too): the id is made as if on ``cpu``, the device of every sweep stored before, so
    a sweep started on a GPU resumes on the CPU, under ``auto`` or on another GPU, and
    stored ids stay."""
    key = {k: record[k] for k in ("probe_run", "settings", "validation_images",
                                  "evaluation_images")}
    settings = key["settings"]
    key["settings"] = {**settings, "base": {**settings["base"], "device": "cpu"}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return f"{record['target']}-sweep-{digest}"


def headline(summary: dict) -> dict:
    """The evaluation experiment at its one strength: what the main job reports."""
    row = summary["dose"][0]
    rnd = row.get("random", {})
    return {"experiment_id": summary["experiment_id"], "metric": summary["metric"],
            "interventions": summary["interventions"], "images": summary["images"],
            "strength": row["strength"], "pre": summary["pre"].get("median"),
            "post": row["probe"]["post"].get("median"),
            "random": rnd.get("post", {}).get("median"),
            "other": row["probe"]["other_targets"].get("median"),
            "improved": (row["probe"]["improved"] or {}).get("share"),
            "random_improved": (rnd.get("improved") or {}).get("share"),
            "specific": (row["probe"]["specific"] or {}).get("share"),
            "beats_random": (row["probe"].get("beats_random") or {}).get("share"),
            "relative_change": row["probe"]["edit"]["relative_change"],
            "token_relative_change": row["probe"]["edit"]["token_relative_change"],
            "non_finite": row["probe"]["non_finite"] + rnd.get("non_finite", 0),
            "effect": row["effect"]}


def write_sweep(store: str, sweep_id: str, record: dict) -> None:
    """One PUT of the sweep group's metadata: a sweep is recorded whole or not at all."""
    io.put_group(store, lay.SWEEPS)
    io.put_group(store, lay.sweep_path(sweep_id), {lay.SWEEP_KEY: record})


def list_sweeps(store: str) -> dict[str, dict]:
    sweeps = io.marked_children(store, lay.SWEEPS, lay.sweep_path, lay.SWEEP_KEY,
                                read=listed)
    return {name: attrs[lay.SWEEP_KEY] for name, attrs in sweeps.items()}


def latest_sweep(store: str, target: str) -> dict | None:
    sweeps = list_sweeps(store).values()
    check_name(target, "target", f"store {store}", (r["target"] for r in sweeps))
    found = [r for r in sweeps if r["target"] == target]
    return max(found, key=lambda r: r["created"]) if found else None
