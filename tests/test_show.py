"""`actstore show`: what a store holds, checked against the store's own files read with
json alone and against the prompt table it was made from; it writes nothing."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

from conftest import DEMO, tree_digest
from flows.cli import main


def _attrs(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text()).get("attributes", {})


def test_show_lists_what_the_store_holds(explore_store, capsys):
    before = tree_digest(explore_store)
    assert main(["--json", "show", "--store", explore_store]) == 0
    got = json.loads(capsys.readouterr().out)
    root = Path(explore_store)
    with open(DEMO, newline="") as f:
        rows = list(csv.DictReader(f))
    assert got["images"] == len(rows)
    assert got["split"] == dict(Counter(r["split"] for r in rows))
    assert set(got["models"]) == {p.name for p in (root / "models").iterdir()
                                  if p.is_dir() and "actstore_model" in _attrs(p)}
    assert all(m["complete_images"] == len(rows) for m in got["models"].values())
    commits = [_attrs(p)["labels"] for p in sorted((root / "labels" / "_commits").iterdir())
               if p.is_dir() and "labels" in _attrs(p)]
    versions = {t: a["version"] for record in commits for t, a in record.items()}
    assert {t: a["version"] for t, a in got["labels"].items()} == versions
    runs = {p.name: _attrs(p) for p in (root / "probes").iterdir()
            if p.is_dir() and "target" in _attrs(p)}
    assert {r["id"]: r["target"] for r in got["probe_runs"]} == \
        {k: a["target"] for k, a in runs.items()}
    assert all(r["label_version"] == versions[r["target"]] for r in got["probe_runs"])
    experiments = {p.name for p in (root / "interventions").iterdir() if p.is_dir()}
    assert {e["id"] for e in got["experiments"]} == experiments
    assert [e["probe_run"] for e in got["experiments"]] == \
        [k for k, a in runs.items() if a["target"] == "salient"]
    assert got["sweeps"] == []
    assert tree_digest(explore_store) == before                 # reads records only

    assert main(["show", "--store", explore_store]) == 0        # the text a person reads
    text = capsys.readouterr().out
    for name in [*runs, *experiments, *versions.values()]:
        assert name in text, name


def test_show_on_a_missing_store_is_one_line(tmp_path, capsys):
    assert main(["show", "--store", str(tmp_path / "none.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err, err
