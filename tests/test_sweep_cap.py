"""The sweep's edit-size cap: a setting whose median relative edit ‖Δh‖/‖h‖ on the
validation images exceeds ``max_edit_size`` is run and tabled but never chosen; the choice
is the best setting under the cap (checked against a brute-force pass over the stored sweep
table); the cap and the choice are recorded; bad caps fail in one line before any work."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from actstore.errors import ActstoreError
from actstore.intervene.results import open_intervention
from actstore.intervene.settings import InterventionSettings as IS, SweepSettings
from actstore.intervene.sweep import choose, list_sweeps, run_sweep
from actstore.intervene.tables import format_cells, format_sweeps
from conftest import PixelLabels, tree_digest
from flows.cli import main

STRENGTHS = (0.05, 0.25, 1.0)
KEYS = ("kind", "steps", "strength")


def brute_force(cells: list[dict], cap: float) -> dict | None:
    """The oracle: every eligible cell against every other, pairwise; the one no other
    beats (larger specific effect, or equal and smaller edit)."""
    ok = [c for c in cells if c["strength"] > 0 and c["effect"]["specific"] is not None
          and c["relative_change"] is not None and c["relative_change"] <= cap]
    for c in ok:
        beaten = any(d["effect"]["specific"] > c["effect"]["specific"]
                     or (d["effect"]["specific"] == c["effect"]["specific"]
                         and d["relative_change"] < c["relative_change"]) for d in ok)
        if not beaten:
            return c
    return None


def test_choose_under_the_cap_matches_brute_force_on_random_tables():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 12))
        rows = [{"effect": {"specific": None if rng.random() < 0.1 else
                            float(rng.integers(-3, 6)) / 10},
                 "relative_change": float(rng.choice([0.05, 0.1, 0.25, 0.5, 0.77, 2.2])),
                 "strength": float(rng.choice([0.0, 1.0, 3.0, 10.0]))} for _ in range(n)]
        cap = float(rng.choice([0.07, 0.25, 0.5, 1.0]))
        got, want = choose(rows, cap), brute_force(rows, cap)
        assert got is want or (got is not None and want is not None
                               and got["effect"]["specific"] == want["effect"]["specific"]
                               and got["relative_change"] == want["relative_change"]), trial


def test_largest_effect_over_the_cap_is_passed_over():
    def row(spec, size):
        return {"effect": {"specific": spec}, "relative_change": size, "strength": 1.0}
    rows = [row(0.1, 0.2), row(0.6, 0.77), row(0.3, 0.4), row(0.3, 0.45), row(0.2, None)]
    assert choose(rows) is rows[1]                       # no cap: the image-breaking edit
    assert choose(rows, 0.5) is rows[2]                  # capped: the best under it
    assert choose(rows, 0.5) is brute_force(rows, 0.5)
    assert choose(rows, 0.1) is None                     # nothing under the cap
    assert choose([row(0.9, float("nan"))], 10.0) is None   # no size: not shown under it


def _sweep(uri, run, model, cap, tmp_path=None):
    """Seed 1 of this grid on the tiny model. The plant needs the largest specific effect
    not to be the smallest edit, on any CPU: which s = 0.25 cell wins depends on the CPU's
    rounding (steps 0 on Intel, steps 0-1 on AMD EPYC), so the grid has s = 0.05, whose
    edits are ~5x smaller and whose effects are ~7x smaller than s = 0.25's on both."""
    settings = SweepSettings(kinds=("attn1",), step_counts=(1, 2), strengths=STRENGTHS,
                             validation=2, evaluation=3, max_edit_size=cap,
                             base=IS(n_targets=2, provider=PixelLabels(), batch_size=8,
                                     seed=1))
    return run_sweep(uri, [run], settings, model=model, progress=False,
                     out_dir=str(tmp_path) if tmp_path else None)["targets"]["salient"]


def test_planted_sweep_chooses_the_best_setting_under_the_cap(ivstore, tiny_model, tmp_path):
    uri = str(tmp_path / "cap.zarr")
    shutil.copytree(ivstore["uri"], uri)
    run = ivstore["runs"]["salient"]
    free = _sweep(uri, run, tiny_model, 1e9)
    top = brute_force(free["cells"], math.inf)
    assert {k: free["chosen"][k] for k in KEYS} == {k: top[k] for k in KEYS}
    # plant: a cap just under the largest effect's edit, with some scored cell below it
    cap = top["relative_change"] * 0.999
    assert brute_force(free["cells"], cap) is not None, "plant needs a smaller scored cell"
    rec = _sweep(uri, run, tiny_model, cap, tmp_path)
    assert rec["sweep_id"] != free["sweep_id"] and rec["max_edit_size"] == cap
    assert rec["settings"]["max_edit_size"] == cap
    assert [{k: c[k] for k in KEYS} for c in rec["cells"]] == \
        [{k: c[k] for k in KEYS} for c in free["cells"]]        # every setting still run
    assert rec["experiments"] == free["experiments"]             # (resumed, not redone)
    want = brute_force(rec["cells"], cap)
    chosen = rec["chosen"]
    assert {k: chosen[k] for k in KEYS} == {k: want[k] for k in KEYS}
    assert {k: chosen[k] for k in KEYS} != {k: top[k] for k in KEYS}
    assert chosen["relative_change"] <= cap < top["relative_change"]
    for c in rec["cells"]:
        assert c["over_cap"] == (c["relative_change"] > cap)
    # what is stored: the sweep record as listed, and the evaluation experiment's own record
    assert list_sweeps(uri)[rec["sweep_id"]]["chosen"] == chosen
    final = open_intervention(uri, rec["evaluation"])
    prov = final.attrs["settings"]["provenance"]
    assert prov["max_edit_size"] == cap and prov["sweep"] == rec["sweep_id"]
    assert prov["chosen_validation_size"] == chosen["relative_change"]
    assert final.attrs["settings"]["steps"] == chosen["steps"]
    assert list(final["strength"].values) == [chosen["strength"]]
    # the table shows every cell: the chosen one starred, the passed-over one marked
    lines = format_cells({"salient": rec}).splitlines()
    def line_of(c):
        tag = f"steps {c['steps'][0]}-{c['steps'][-1]} s={c['strength']:g} "
        (hit,) = [ln for ln in lines if tag in ln]
        return hit
    assert line_of(chosen).endswith(" *")
    assert line_of(top).endswith(f"over cap {cap:g}")
    assert f"{cap:.3f}" in format_sweeps({"salient": rec})


def test_nothing_under_the_cap_is_a_recorded_result_not_a_run(ivstore, tiny_model, tmp_path):
    uri = str(tmp_path / "none.zarr")
    shutil.copytree(ivstore["uri"], uri)
    rec = _sweep(uri, ivstore["runs"]["salient"], tiny_model, 1e-9)
    assert rec["chosen"] is None and rec["evaluation"] is None and rec["result"] is None
    assert rec["note"].startswith("none under the cap: no scored setting has edit size "
                                  "<= 1e-09")
    assert all(c["over_cap"] for c in rec["cells"])
    smallest = min(c["relative_change"] for c in rec["cells"])
    assert f"smallest {smallest:.3f}" in rec["note"]
    assert list_sweeps(uri)[rec["sweep_id"]]["note"] == rec["note"]
    stored = {open_intervention(uri, e).attrs["settings"]["provenance"]["role"]
              for e in rec["experiments"]}
    assert stored == {"sweep validation"}                      # no evaluation was run
    assert rec["note"] in format_sweeps({"salient": rec})


@pytest.mark.parametrize("value", [0, -0.5, float("nan"), float("inf"), True])
def test_bad_caps_refused_in_one_line(value):
    with pytest.raises(ActstoreError, match="--max-edit-size") as info:
        SweepSettings(max_edit_size=value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["0", "-1", "-0.25", "nan", "big"])
def test_bad_cap_option_is_one_line_before_anything_is_written(ivstore, tmp_path, capsys,
                                                               value):
    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(ivstore["uri"], uri)
    before = tree_digest(uri)
    with pytest.raises(SystemExit) as exc:
        main(["--no-prefect", "sweep", "--store", uri, "--probe-run",
              ivstore["runs"]["salient"], "--max-edit-size", value])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "argument --max-edit-size" in lines[0], lines
    assert tree_digest(uri) == before
