"""A notebook's mistakes: the README's reading calls on a mistyped store path, or for a
target without a probe run, each end in one ActstoreError saying what is missing, never an
empty answer that looks like an empty store or a TypeError from deep inside."""

from __future__ import annotations

import numpy as np
import pytest

import actstore
from actstore.errors import ActstoreError
from actstore.intervene.results import list_interventions
from actstore.intervene.sweep import list_sweeps
from actstore.probe.runs import latest_run, list_runs, open_scores
from conftest import EXPLORE_LAYERS, tree_digest


@pytest.mark.parametrize("where", ["mistyped", "a file"])
@pytest.mark.parametrize("call", [list_runs, list_interventions, list_sweeps,
                                  lambda u: latest_run(u, "salient")],
                         ids=["list_runs", "list_interventions", "list_sweeps", "latest_run"])
def test_listing_what_is_not_a_store_says_so(tmp_path, where, call):
    """`list_interventions("runs/mian/store.zarr")` gave {} and `latest_run` None, as for a
    store with nothing in it: the analyst's typo looked like missing results."""
    path = tmp_path / "runs" / "mian" / "store.zarr"
    if where == "a file":
        path.parent.mkdir(parents=True)
        path.write_text("notes")
    words = "does not exist" if where == "mistyped" else "not an actstore store"
    with pytest.raises(ActstoreError, match=words):
        call(str(path))


def test_the_readme_probe_line_for_a_target_without_runs(explore_store):
    """The README's `actstore.load_probe(u, latest_run(u, "salient"), layer)` for a target
    the store has no run of: latest_run gives None, and load_probe (open_scores too) failed
    with 'TypeError: argument of type 'NoneType' is not iterable'."""
    before = tree_digest(explore_store)
    assert latest_run(explore_store, "shading") is None          # a store, no such run
    for call in (lambda: actstore.load_probe(explore_store, latest_run(explore_store,
                                                                      "shading"),
                                             EXPLORE_LAYERS[0]),
                 lambda: open_scores(explore_store, latest_run(explore_store, "shading"))):
        with pytest.raises(ActstoreError, match=r"probe run None is no run id .*targets with "
                                                r"runs: depth, salient\); run `actstore probe"):
            call()
    assert list_interventions(explore_store) and list_runs(explore_store)
    assert list_sweeps(explore_store) == {}                       # a store, no sweep yet
    assert tree_digest(explore_store) == before


def test_load_probe_of_a_model_the_run_lacks_names_its_models(explore_store):
    """`load_probe(u, run, layer, model="randomized")` on a run of the trained model only
    said 'has no probe for model 'randomized' ...; it has layers ...': the layer was fine,
    and the models it has were not named."""
    run = latest_run(explore_store, "salient")
    with pytest.raises(ActstoreError, match="it has models trained and layers"):
        actstore.load_probe(explore_store, run, EXPLORE_LAYERS[0], model="randomized")


def test_x0_images_of_a_store_made_without_them(tmp_path):
    """`view.x0_images` of a store made with --no-x0 read the never-written array as black
    images, silently, and the sample grid and Figure 4 drew them; now the view says so in
    one line, and the figures show the final images in their place."""
    from PIL import Image

    from conftest import DEMO, TINY, cli

    store, grid = str(tmp_path / "nox0.zarr"), tmp_path / "grid.png"
    made = cli("materialize", "--model", "tiny-random", "--prompts", DEMO, "--store", store,
               "--steps", str(TINY["steps"]), "--no-x0", "--grid", str(grid))
    assert made.returncode == 0, made.stderr
    view = actstore.open_store(store)
    with pytest.raises(ActstoreError, match="materialized with --no-x0, so it has no x0"):
        view.x0_images
    assert not view.has_x0
    assert np.asarray(Image.open(grid)).std() > 0
    assert cli("label", "--store", store, "--provider", "toyworld", "--target", "salient"
               ).returncode == 0
    probed = cli("probe", "--store", store, "--target", "salient", "--layers",
                 EXPLORE_LAYERS[0], "--scheduler", "sync", "--figures", str(tmp_path / "f"))
    assert probed.returncode == 0, probed.stderr
    assert (tmp_path / "f" / "salient-figure4.png").stat().st_size > 0
