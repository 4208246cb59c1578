"""What a store holds, in one small dictionary: the answer to "what is in this store?"
before anyone opens an array (``actstore show``).

Everything here is read from records and attributes, never from activations, so it costs
a few listings whatever the store's size, on a local disk or an object store. Only what
readers may see is listed: complete blocks, committed label versions, marked probe runs,
complete experiments and recorded sweeps, as the readers of each would see them.
"""

from __future__ import annotations

from collections import Counter

from actstore.intervene.results import list_interventions
from actstore.intervene.sweep import list_sweeps
from actstore.probe.runs import list_runs
from actstore.store import labelsets
from actstore.store.view import open_store


def describe(store: str) -> dict:
    """Images, model variants, label targets, probe runs, experiments and sweeps of
    ``store``, each with the few attributes that tell them apart."""
    view = open_store(store)
    images = view.images
    out = {"store": store, "images": int(view.root_attrs["n_images"]),
           "split": dict(Counter(str(s) for s in images["split"].values)),
           "steps": view.n_steps, "block_size": int(view.root_attrs["block_size"]),
           "models": {}}
    for model in view.models:
        v = view if model == view.model else open_store(store, model)
        out["models"][model] = {"complete_images": int(v.complete.sum()), "kinds": v.kinds,
                                "points": len(v.points), "guidance": v.attrs.get("guidance"),
                                "pending_kinds": sorted(v.pending)}
    # one look: a relabel between two would show one version beside another's provider
    out["labels"] = {t: {"kind": a.get("kind"), "provider": a.get("provider"),
                         "version": labelsets.version_of(a["path"]),
                         "created": a.get("created")}
                     for t, a in sorted(labelsets.current(store).items())}
    out["probe_runs"] = [{"id": rid, "target": a["target"], "models": a["models"],
                          "layers": len(a["layers"]), "steps": len(a["steps"]),
                          "label_version": (a.get("labels") or {}).get("version"),
                          "created": a.get("created")}
                         for rid, a in sorted(list_runs(store).items(),
                                              key=lambda kv: (kv[1].get("created", ""), kv[0]))]
    out["experiments"] = [{"id": eid, "target": a.get("target"), "method": a.get("method"),
                           "probe_run": a.get("probe_run"), "images": a.get("images"),
                           "interventions": a.get("interventions"),
                           "role": (a.get("provenance") or {}).get("role")}
                          for eid, a in sorted(list_interventions(store).items())]
    out["sweeps"] = [{"id": sid, "target": a.get("target"), "probe_run": a.get("probe_run"),
                      "cells": len(a.get("cells") or []), "chosen": a.get("chosen")}
                     for sid, a in sorted(list_sweeps(store).items())]
    return out
