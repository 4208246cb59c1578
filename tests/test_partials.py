"""Temporary files of killed local writes (zarr's ``<key>.<uuid>.partial``) are removed by
the next writer of their node once stale, while a writer's file in flight is kept."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from actstore.generation.materialize import MaterializeSettings, materialize
from actstore.generation.sampling import GenerationConfig
from actstore.label.labels import write_labels
from actstore.probe.runs import run_probes
from conftest import DEMO, TINY
from storecheck import assert_same_store
from test_labels import Brightness

LAYER = "up_blocks.3.attentions.0"


def _partial(path: Path, like: Path, age_s: float) -> Path:
    """What a kill -9 during zarr's write of ``like`` leaves: half of its bytes under the
    temporary name zarr uses (``Path.with_suffix(".<uuid>.partial")``)."""
    out = like.with_suffix(f".{uuid.uuid4().hex}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = like.read_bytes() if like.exists() else b"{}"
    out.write_bytes(data[: len(data) // 2])
    stamp = time.time() - age_s
    os.utime(out, (stamp, stamp))
    return out


def test_next_writers_remove_stale_partials(tmp_path, tiny_store, tiny_model):
    path = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, path)
    act = path / "models/trained/layers" / LAYER / "activation"
    hour = 3600
    stale = [_partial(path, act / "c.0.0.0.0.0", 2 * hour),
             _partial(path, path / "models/trained/_blocks/00000000-00000004/zarr.json",
                      2 * hour),
             _partial(path, path / "images/prompt/c.0", 2 * hour),
             _partial(path, path / "zarr.json", 2 * hour)]
    fresh = _partial(path, act / "c.1.0.0.0.0", 5)   # a writer at work: never touched
    materialize(tiny_model, DEMO, str(path),
                MaterializeSettings(gen=GenerationConfig(steps=TINY["steps"]),
                                    batch_size=TINY["batch_size"],
                                    block_size=TINY["block_size"]), progress=False)
    assert not any(p.exists() for p in stale) and fresh.exists()
    assert_same_store(str(path), tiny_store)

    write_labels(str(path), Brightness(), "depth", on_x0=False, progress=False)
    label_left = _partial(path, path / "labels/zarr.json", 2 * hour)
    probe_left = _partial(path, path / "probes/zarr.json", 2 * hour)
    write_labels(str(path), Brightness(), "salient", on_x0=False, progress=False)
    assert not label_left.exists() and probe_left.exists()
    run_probes(str(path), "depth", layers=[LAYER], steps=[0], scheduler="threads",
               progress=False)
    assert not probe_left.exists() and fresh.exists()
