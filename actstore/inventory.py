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
from actstore.intervene.sweeprecords import list_sweeps
from actstore.probe.runs import list_runs
from actstore.store import io, labelsets
from actstore.store.core import model_variants, read_root_attrs
from actstore.store.layout import IMAGES
from actstore.store.view import open_store


def describe(store: str) -> dict:
    """Images, model variants, label targets, probe runs, experiments and sweeps of
    ``store``, each with the few attributes that tell them apart. Every variant the store
    has is described, whichever it is: opening the trained one first refused a store that
    holds only the randomized control (or none yet) with 'materialize it first', and
    counted the split of its complete images only ('16 images (4 train)')."""
    root = read_root_attrs(store)
    views = [open_store(store, model) for model in model_variants(store)]
    split = io.open_array(store, f"{IMAGES}/split")[...]
    out = {"store": store, "images": int(root["n_images"]),
           "split": dict(Counter(str(s) for s in split.tolist())),
           "steps": views[0].n_steps if views else None,
           "block_size": int(root["block_size"]), "models": {}}
    for v in views:
        out["models"][v.model] = {"complete_images": int(v.complete.sum()), "kinds": v.kinds,
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
