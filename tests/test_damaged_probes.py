"""A complete probe run with one of its arrays gone (a damaged store: a probe's weights, a
score table's column): every reader a user meets (`actstore intervene`, the planner,
``load_probe``, ``open_emergence``, ``open_scores``, the figures) says so in one line naming
the store, the run and the array, with the way out (a new run), and alters nothing. Before
(2026-12-06) they raised zarr's or xarray's KeyError naming the bare array. A probe group
gone as a whole: tests/test_intervene_named.py."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import EXPLORE_LAYERS, cli, tree_digest
from test_probe_selection import store  # noqa: F401  (a fixture: the explore store, copied)

LAYER = EXPLORE_LAYERS[0]


def _damage(store: str, path: str) -> None:
    shutil.rmtree(os.path.join(store, path))


def _line(store: str, run: str, what: str, latest: bool = False) -> str:
    """``latest``: a reader of the target's latest run only, where another run is no way out."""
    then = (": the emergence table and figures read a target's latest run" if latest
            else " and use that run, or another run of the target")
    return (f"store {store}: probe run {run} {what}: the store is damaged); fit it again "
            f"(`actstore probe --target salient`){then}")


def _salient_run(store: str) -> str:
    from actstore.probe.runs import latest_run

    return latest_run(store, "salient")


def _refused(store: str, read, line: str) -> None:
    from actstore.errors import ActstoreError

    before = tree_digest(store)
    with pytest.raises(ActstoreError) as refused:
        read()
    assert str(refused.value) == line
    assert tree_digest(store) == before


@pytest.mark.parametrize("array", ["weights", "bias", "lam"])
def test_a_probe_array_gone_is_one_line_to_load_probe(store, array):
    from actstore.probe.runs import load_probe
    from actstore.store import layout as lay

    run = _salient_run(store)
    path = lay.run_layer_path(run, "trained", LAYER)
    _damage(store, f"{path}/{array}")
    _refused(store, lambda: load_probe(store, run, LAYER), _line(
        store, run, f"has no probe for model 'trained', layer {LAYER!r} (no array "
                    f"{path}/{array}"))


def test_a_probe_array_gone_is_one_line_from_the_intervene_command(store):
    """The command plans with the probes' weights: one line, exit 2, nothing written."""
    from actstore.store import layout as lay

    run = _salient_run(store)
    path = lay.run_layer_path(run, "trained", LAYER)
    _damage(store, f"{path}/weights")
    before = tree_digest(store)
    done = cli("intervene", "--store", store, "--probe-run", run, "--layers", LAYER,
               "--steps", "0", "--images", "demo-012")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "actstore intervene: error: " + _line(
            store, run, f"has no probe for model 'trained', layer {LAYER!r} (no array "
                        f"{path}/weights")]
    assert tree_digest(store) == before


@pytest.mark.parametrize("array", ["mean", "step", "ci_low"])
def test_a_score_array_gone_is_one_line_to_open_emergence(store, array):
    """``mean`` and the coordinates are read; an interval alone gone would have drawn the
    emergence without its bands, as for a run made before intervals were stored."""
    from actstore.probe.runs import open_emergence
    from actstore.store import layout as lay

    run = _salient_run(store)
    path = lay.run_scores_path(run)
    _damage(store, f"{path}/{array}")
    _refused(store, lambda: open_emergence(store),
             _line(store, run, f"has no scores {array!r} (no array {path}/{array}",
                   latest=True))


def test_a_score_group_gone_is_one_line_to_open_scores_and_the_figures(store, tmp_path):
    from actstore.plots.figures import emergence_curves
    from actstore.probe.runs import open_scores
    from actstore.store import layout as lay

    run = _salient_run(store)
    path = lay.run_scores_path(run)
    _damage(store, f"{path}/per_image")
    line = _line(store, run, f"has no scores 'per_image' (no array {path}/per_image")
    _refused(store, lambda: open_scores(store, run), line)
    _refused(store, lambda: emergence_curves(store, "salient", str(tmp_path / "e.png")), line)
    _damage(store, path)
    _refused(store, lambda: open_scores(store, run),
             _line(store, run, f"has no scores (no group {path}"))
