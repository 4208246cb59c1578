"""A notebook's mistakes: the README's reading calls on a mistyped store path, or for a
target without a probe run, each end in one ActstoreError saying what is missing, never an
empty answer that looks like an empty store or a TypeError from deep inside."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_a_relative_path_is_read_from_the_folder_it_is_opened_in(explore_store, tiny_store,
                                                                  tmp_path, monkeypatch):
    """A notebook that moves (`%cd`, `os.chdir`) and opens `store.zarr` again got the store
    of the folder it first opened that name in: the resolved location was kept per string,
    so another folder's store, or none, read as the first one's, with its probe runs. And a
    layer's `store` attribute said `store.zarr`, which names nothing once saved."""
    import shutil

    from actstore.probe.runs import list_runs

    here = tmp_path / "other"
    here.mkdir()
    monkeypatch.chdir(Path(explore_store).parent)
    first = actstore.open_store("store.zarr")
    assert first[EXPLORE_LAYERS[0]].attrs["store"] == explore_store   # absolute
    assert open_scores("store.zarr", latest_run("store.zarr", "depth")).attrs["store"] \
        == explore_store
    monkeypatch.chdir(here)
    for call in (actstore.open_store, actstore.open_emergence, list_runs):
        with pytest.raises(ActstoreError, match="store store.zarr: does not exist"):
            call("store.zarr")
    shutil.copytree(tiny_store, here / "store.zarr")      # another store, without runs
    assert list_runs("store.zarr") == {}
    with pytest.raises(ActstoreError, match="no probe runs yet"):
        actstore.open_emergence("store.zarr")
    a = actstore.open_store("store.zarr/")[EXPLORE_LAYERS[0]]   # a trailing slash too
    assert a.attrs["store"] == str(here / "store.zarr")


@pytest.mark.parametrize("key", [3, [EXPLORE_LAYERS[0]], None],
                         ids=["position", "list", "None"])
def test_a_layer_is_asked_for_by_its_name(explore_store, key):
    """`view[3]` (the fourth layer, as in a list) was `TypeError: argument of type 'int' is
    not iterable`, `view[[name]]` 'unhashable type: list'."""
    view = actstore.open_store(explore_store)
    with pytest.raises(ActstoreError, match=r"a layer is asked for by its name, one of "
                                            r"view\.layers \(got .*\); view\[view\.layers"):
        view[key]
    assert str(view.layers[3]) in _message(lambda: view[3])


def _message(call) -> str:
    try:
        call()
    except ActstoreError as exc:
        return str(exc)
    raise AssertionError("no ActstoreError")


def test_a_catalog_store_name_says_where_its_store_is(explore_store, tmp_path, monkeypatch):
    """`actstore materialize --store toy` writes the catalog's runs/toy.zarr; the readers
    take locations, and `open_store("toy")` said 'store toy: does not exist; create it with
    `actstore materialize`', the command that had just made it."""
    from conftest import store_catalog

    store_catalog(tmp_path, explore_store, name="mine")
    monkeypatch.chdir(tmp_path)
    for call in (actstore.open_store, actstore.open_emergence):
        with pytest.raises(ActstoreError, match=r"^store mine: does not exist here; 'mine' is a "
                           r"store name of .*catalog\.yaml, the catalog the commands read "
                           rf"without --catalog: open its location, {explore_store}$"):
            call("mine")
    with pytest.raises(ActstoreError, match=r"^store yours: does not exist; create it with "
                                            r"`actstore materialize`$"):
        actstore.open_store("yours")                      # no name of the catalog


def test_a_store_name_another_catalog_gives_is_not_sent_to_this_ones_location(
        explore_store, tmp_path, monkeypatch):
    """`actstore --catalog mine.yaml materialize --store toy` writes where mine.yaml says;
    `open_store("toy")` was told to open the location ./catalog.yaml gives 'toy', where
    there is no store."""
    from conftest import store_catalog

    elsewhere = tmp_path / "runs" / "toy.zarr"
    store_catalog(tmp_path, str(elsewhere), name="toy")
    (tmp_path / "mine").mkdir()
    store_catalog(tmp_path / "mine", explore_store, name="toy")   # the one it was made with
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ActstoreError) as err:
        actstore.open_store("toy")
    assert str(err.value) == (
        f"store toy: does not exist here, nor at {elsewhere}, its location in "
        f"{tmp_path / 'catalog.yaml'}, the catalog the commands read without --catalog; open "
        "the location the catalog it was made with gives it")
    assert not elsewhere.exists()


def test_an_experiment_says_which_store_and_experiment_it_is(explore_store):
    """open_scores and open_emergence name their store and runs; an experiment carried no
    more than its settings, so two experiments' tables combined could not be told apart."""
    name = next(iter(list_interventions(explore_store)))
    exp = actstore.open_intervention(explore_store, name)
    assert {k: exp.attrs[k] for k in ("store", "experiment")} == {"store": explore_store,
                                                                  "experiment": name}
    assert exp.attrs["settings"]["method"] == "projection"


@pytest.mark.parametrize("target, then", [
    ("dpeth", "did you mean 'depth'? else write them with `actstore label --target dpeth`"),
    ("shading", "write them with `actstore label --target shading`"),
    (None, "name a target by its name, one of those"),
    ("depth/", "name a target by its name, one of those")])
def test_labels_of_a_mistyped_target(explore_store, target, then):
    """`open_labels(u, "dpeth")` told the analyst to label a target 'dpeth', and a target
    that is no name (None, 'depth/') to run `actstore label --target None`."""
    with pytest.raises(ActstoreError) as err:
        actstore.open_labels(explore_store, target)
    assert str(err.value) == (f"store {explore_store}: no complete labels {target!r} (has: "
                              f"depth, salient); {then}")


@pytest.mark.parametrize("flag", ["no", "False", 0, None])
def test_a_flag_that_is_not_true_or_false(explore_store, flag):
    """`open_store(u, complete_only="no")` read every image, finished or not: a non-empty
    string is true to Python. 0 and None, which Python would take for False, are refused
    as well, so that a flag means the same wherever it is given."""
    before = tree_digest(explore_store)
    name = next(iter(list_interventions(explore_store)))
    for where, call in ((f"store {explore_store}",
                         lambda: actstore.open_store(explore_store, complete_only=flag)),
                        (f"store {explore_store}: experiment {name}",
                         lambda: actstore.open_intervention(explore_store, name, flag))):
        with pytest.raises(ActstoreError) as err:
            call()
        assert str(err.value) == (f"{where}: complete_only={flag!r} is not True or False; "
                                  "pass complete_only=True or complete_only=False")
    assert actstore.open_store(explore_store, complete_only=np.bool_(False)).complete_only \
        is False
    assert tree_digest(explore_store) == before


@pytest.mark.parametrize("target", [None, 3, ""])
def test_latest_run_of_no_target_name(explore_store, target):
    """`latest_run(u, None)` (or 3, or "") gave None, as for a target with no run yet;
    latest_sweep likewise."""
    from actstore.intervene.sweeprecords import latest_sweep

    with pytest.raises(ActstoreError) as err:
        latest_run(explore_store, target)
    assert str(err.value) == (f"store {explore_store}: target {target!r} is no name; give "
                              "one of depth, salient as a string")
    with pytest.raises(ActstoreError) as err:
        latest_sweep(explore_store, target)                 # a store without sweeps
    assert str(err.value) == (f"store {explore_store}: target {target!r} is no name; give "
                              "one as a string")
    assert latest_sweep(explore_store, "salient") is None


@pytest.mark.parametrize("store", [3, None, b"store.zarr"], ids=["int", "None", "bytes"])
@pytest.mark.parametrize("call", [
    actstore.open_store, lambda s: actstore.open_emergence(s), list_runs, list_interventions,
    list_sweeps, lambda s: latest_run(s, "salient"), lambda s: open_scores(s, "r"),
    lambda s: actstore.open_labels(s, "depth"), lambda s: actstore.open_intervention(s, "e"),
    lambda s: actstore.load_probe(s, "r", EXPLORE_LAYERS[0])],
    ids=["open_store", "open_emergence", "list_runs", "list_interventions", "list_sweeps",
         "latest_run", "open_scores", "open_labels", "open_intervention", "load_probe"])
def test_a_store_that_is_no_location(call, store):
    """`open_emergence(3)` said 'store 3: does not exist', as if a folder named 3 were
    missing; each reader now says what it was given."""
    with pytest.raises(ActstoreError) as err:
        call(store)
    assert str(err.value) == (f"store {store!r}: a store location is a path or URL, not a "
                              f"{type(store).__name__}; pass it as a string (e.g. "
                              "'runs/toy.zarr', 's3://bucket/p.zarr') or a pathlib.Path")


def test_a_store_given_as_a_path(explore_store):
    """A pathlib.Path is a location like its string."""
    assert actstore.open_store(Path(explore_store)).layers == \
        actstore.open_store(explore_store).layers
    assert latest_run(Path(explore_store), "salient") == latest_run(explore_store, "salient")
