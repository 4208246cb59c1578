"""A notebook's mistakes: the README's reading calls on a mistyped store path, or for a
target without a probe run, each end in one ActstoreError saying what is missing, never an
empty answer that looks like an empty store or a TypeError from deep inside."""

from __future__ import annotations

import json

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


def test_selection_keeps_xarrays_behaviour(explore_store):
    """Readers' objects carry xarray's own indexes: nearest, slices, alignment with a
    user's plain array (also over labels that differ: reindex, merge, outer align) and
    concatenation work as on any xarray object. An index class of actstore's own, once
    tried for friendlier `.sel` messages, made every such alignment an AlignmentError,
    as xarray aligns only indexes of one type."""
    import xarray as xr

    a = actstore.open_store(explore_store)[EXPLORE_LAYERS[0]]
    assert int(a.sel(step=2.4, method="nearest").step) == 2
    assert a.sel(step=slice(1, 2)).sizes["step"] == 2
    with pytest.raises(KeyError):                       # xarray's own, beyond the tolerance
        a.sel(step=9, method="nearest", tolerance=1)
    mine = xr.DataArray(np.arange(a.sizes["image"], dtype=float), dims="image",
                        coords={"image": a.image.values})
    product = (a.mean(["step", "y", "x", "channel"]) * mine).compute()
    np.testing.assert_allclose(product.values, a.mean(["step", "y", "x", "channel"]).values
                               * np.arange(a.sizes["image"]), rtol=1e-6)
    both = xr.concat([a.isel(step=[0]), a.isel(step=[1])], dim="step")
    assert list(both.step.values) == [0, 1]
    longer = a.isel(image=0).reindex(step=range(a.sizes["step"] + 2))
    assert longer.sizes["step"] == a.sizes["step"] + 2
    assert bool(longer.isel(step=-1).isnull().all())
    other = mine.isel(image=[0]).assign_coords(image=["mine-1"]).rename("mine")
    merged = xr.merge([a.mean(["step", "y", "x", "channel"]).rename("act"), other],
                      join="outer")
    assert merged.sizes["image"] == a.sizes["image"] + 1
    score = actstore.open_emergence(explore_store).score
    assert score.reindex(step=range(score.sizes["step"] + 1)).sizes["step"] == \
        score.sizes["step"] + 1
    for reader in (actstore.open_labels(explore_store, "depth").x0,
                   open_scores(explore_store, latest_run(explore_store, "depth"))["mean"]):
        for dim, index in reader.xindexes.items():
            assert type(index) is xr.indexes.PandasIndex, dim


def test_a_layer_says_which_store_model_and_variant_it_is(explore_store, tmp_path):
    """A selection carried into a notebook's own arrays, or saved, said nothing of where it
    came from: a trained layer and the control's looked alike. And it kept the stored
    float16 encoding, so `to_netcdf` failed ("NetCDF 3 does not support type float16") and
    `to_zarr` wrote float16 what read as float32."""
    import xarray as xr

    view = actstore.open_store(explore_store)
    a = view[EXPLORE_LAYERS[0]]
    assert {k: a.attrs[k] for k in ("store", "model_variant", "model")} == {
        "store": explore_store, "model_variant": "trained", "model": "tiny-random"}
    assert a.attrs["weights_sha256"] == view.attrs["fingerprint"]["weights_sha256"]
    assert view.final_images.attrs["model_variant"] == "trained"
    assert "noise level" in a.sigma.attrs["description"]
    picked = a.isel(image=[0, 1], step=0)
    picked.to_netcdf(tmp_path / "pick.nc")
    back = xr.open_dataarray(tmp_path / "pick.nc")
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back.values, picked.values)
    assert back.attrs["model_variant"] == "trained"
    run = latest_run(explore_store, "depth")
    assert open_scores(explore_store, run).attrs["run"] == run   # which run, once combined
    emergence = actstore.open_emergence(explore_store)
    assert json.loads(emergence.attrs["runs"]) == {t: latest_run(explore_store, t)
                                                   for t in ("depth", "salient")}
    emergence.to_netcdf(tmp_path / "emergence.nc")              # attributes netCDF holds
    assert xr.open_dataset(tmp_path / "emergence.nc").attrs["runs"] == emergence.attrs["runs"]
