"""`actstore intervene --experiment NAME` with a name the store has, made with other
settings: refused by the command, before a cluster, a Prefect server or a model starts, in
one line (the one the planning worker says), exit 2, the store byte-for-byte unchanged.
Asked again with its own settings, the experiment resumes as before. A probe the run lacks
(its group gone from a damaged store) is refused the same way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import EXPLORE_LAYERS, REPO, tree_digest
from test_probe_selection import store  # noqa: F401  (a fixture: the explore store, copied)

# explore_store's one experiment (conftest): the salient run, these settings
MADE = {"--layers": EXPLORE_LAYERS, "--steps": ["0", "1"],
        "--images": ["demo-012", "demo-013"], "--n-targets": ["1"]}


def _made(store: str) -> tuple[str, str]:
    """The stored experiment's id and its probe run."""
    from actstore.intervene.results import list_interventions

    (eid,) = list_interventions(store)
    return eid, _stored(store, eid)["probe_run"]


def _settings(**changed):
    from actstore.intervene.settings import InterventionSettings

    return InterventionSettings(layers=tuple(EXPLORE_LAYERS), steps=(0, 1),
                                images=("demo-012", "demo-013"), n_targets=1).with_(**changed)


def test_other_settings_refused_before_any_worker_starts(store, tmp_path):
    """A local cluster's workers make their scratch space in the temporary folder as they
    start (dask-scratch-space/): none is made, and the line names no worker."""
    eid, run = _made(store)
    _refused_early(store, run, tmp_path, "--experiment", eid, "--strength", "2", line=(
        f"store {store}: experiment {eid} exists with other settings (strengths: store has "
        "[1.0], this run has [2.0]); drop --experiment to start a new one"))


def _refused_early(store: str, run: str, tmp_path, *extra: str, line: str) -> None:
    """``actstore intervene --workers 2`` with the stored experiment's settings and
    ``extra``: exit 2 with ``line``, no worker started, the store unchanged."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    before = tree_digest(store)
    argv = [a for opt, vals in MADE.items() for a in (opt, *vals)]
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--quiet", "intervene", "--store", store,
         "--probe-run", run, *argv, *extra, "--workers", "2"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(scratch),
             "PREFECT_HOME": str(tmp_path / "prefect")})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"actstore intervene: error: {line}"]
    assert not (scratch / "dask-scratch-space").exists()
    assert tree_digest(store) == before


@pytest.mark.parametrize("changed,key,difference", [
    ({"strengths": (2.0,)}, "strengths", "store has [1.0], this run has [2.0]"),
    ({"images": ("demo-012",)}, "images",
     'store has ["demo-012", "demo-013"], this run has ["demo-012"]'),
    ({"margin": 3.0}, "margin", "store has 4.0, this run has 3.0"),   # logistic probes
    ({"provider": "pixel-test"}, "provider", 'this run has "pixel-test"'),
])
def test_the_request_check_says_the_planners_line(store, changed, key, difference):
    """The check made before anything loads (probe solvers from their attributes, the
    label provider by name) says what the planning worker's full check would."""
    from actstore.errors import ActstoreError
    from actstore.intervene.inputs import check_existing
    from actstore.intervene.plan import check_request

    eid, run = _made(store)
    with pytest.raises(ActstoreError) as early:
        check_request(store, run, _settings(experiment_id=eid, **changed))
    line = str(early.value)
    assert line.startswith(f"store {store}: experiment {eid} exists with other settings "
                           f"({key}: ")
    assert line.endswith(f"{difference}); drop --experiment to start a new one")
    value = changed[key]
    with pytest.raises(ActstoreError) as late:   # the planner's record, changed alike
        check_existing(store, eid, {**_stored(store, eid),
                                    key: list(value) if isinstance(value, tuple) else value})
    assert str(late.value) == line


def _stored(store: str, eid: str) -> dict:
    from actstore.intervene.results import existing_settings

    return existing_settings(store, eid)


def test_its_own_settings_pass_and_resume_it(store):
    """Nothing in the early record may differ from the stored one when nothing changed:
    the check passes, and the plan resumes the experiment under its name."""
    from actstore.intervene.plan import check_request, plan_interventions

    eid, run = _made(store)
    check_request(store, run, _settings(experiment_id=eid))
    assert plan_interventions(store, run, _settings(experiment_id=eid)).experiment_id == eid
    assert plan_interventions(store, run, _settings()).experiment_id == eid


def _without_probe(store: str) -> tuple[str, str, str]:
    """The store with one layer's probe group of the experiment's run deleted (a damaged
    store): (experiment id, run id, the line that refuses it)."""
    from actstore.store import layout as lay

    eid, run = _made(store)
    layer = EXPLORE_LAYERS[1]
    path = lay.run_layer_path(run, "trained", layer)
    shutil.rmtree(os.path.join(store, path))
    return eid, run, (f"store {store}: probe run {run} has no probe for model 'trained', "
                      f"layer {layer!r} (no group {path}: the store is damaged); fit it "
                      "again (`actstore probe --target salient`) and use that run, or "
                      "another run of the target")


def test_a_missing_probe_group_is_one_line_before_any_worker_starts(store, tmp_path):
    """The early check read the solvers of the run's probes from their groups' attributes:
    one group gone raised a TypeError ('NoneType' object is not subscriptable)."""
    eid, run, line = _without_probe(store)
    _refused_early(store, run, tmp_path, "--experiment", eid, line=line)


def test_a_missing_probe_group_is_the_same_line_to_the_planner(store):
    """Unnamed, the plan reads the probes' weights: the same line, nothing written."""
    from actstore.errors import ActstoreError
    from actstore.intervene.plan import plan_interventions

    _, run, line = _without_probe(store)
    before = tree_digest(store)
    with pytest.raises(ActstoreError) as refused:
        plan_interventions(store, run, _settings())
    assert str(refused.value) == line
    assert tree_digest(store) == before
