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
    assert "1 model x 2 points" in text and "1 models" not in text   # runs of trained alone


def test_show_on_a_missing_store_is_one_line(tmp_path, capsys):
    assert main(["show", "--store", str(tmp_path / "none.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err, err


def test_show_a_store_without_a_complete_trained_model(tmp_path):
    """A store holding only the randomized control (half made), or whose model is still
    being created: `actstore show` refused both ('has no model 'trained' ...; materialize
    it first', exit 2) and, on a half-made model, counted the split of its complete images
    only ('16 images (4 train)'). It describes what there is, in a fresh process."""
    import shutil

    from conftest import TINY, cli

    with open(DEMO, newline="") as f:
        split = dict(Counter(r["split"] for r in csv.DictReader(f)))
    store = tmp_path / "control.zarr"
    made = cli("materialize", "--model", "tiny-random", "--prompts", DEMO, "--store",
               str(store), "--steps", str(TINY["steps"]), "--control", "randomized",
               "--images", "0:8")
    assert made.returncode == 0, made.stderr
    before = tree_digest(store)
    shown = cli("show", "--store", str(store))
    assert shown.returncode == 0, shown.stderr
    got = json.loads(shown.stdout)
    assert got["split"] == split and got["steps"] == TINY["steps"]
    assert list(got["models"]) == ["randomized"]
    assert got["models"]["randomized"]["complete_images"] == 8
    text = subprocess_text(store)
    assert f"{sum(split.values())} images" in text and "randomized   8/16 images" in text

    creating = tmp_path / "creating.zarr"        # the variant's marker not written yet
    shutil.copytree(store, creating)
    (creating / "models" / "randomized" / "zarr.json").unlink()
    shown = cli("show", "--store", str(creating))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["models"] == {}
    assert "models: none yet" in subprocess_text(creating)
    assert tree_digest(store) == before


def subprocess_text(store: Path) -> str:
    """`actstore show`'s text, as a person reads it."""
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, "-m", "flows.cli", "show", "--store", str(store)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout
