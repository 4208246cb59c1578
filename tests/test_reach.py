"""What an edit that moves the object can reach of a shifted depth target."""

from __future__ import annotations

import numpy as np
import pytest

from actstore.errors import ActstoreError
from actstore.intervene.reach import main, object_moved, reach
from actstore.intervene.targets import translate
from conftest import store_catalog


def test_object_moved_reaches_the_shifted_map_when_the_background_is_uniform():
    rng = np.random.default_rng(0)
    bg = np.full((32, 32), -0.5, np.float32)
    depth = bg.copy()
    mask = np.zeros((32, 32), bool)
    mask[10:16, 12:19] = True
    depth[mask] = rng.uniform(1, 2, mask.sum())
    for dy, dx in [(5, -6), (0, 7), (-4, 3)]:
        moved = object_moved(depth, mask, bg, dy, dx)
        np.testing.assert_array_equal(moved, translate(depth, dy, dx, "continuous"))
    # a sloped background (a ground plane) cannot be reached by moving the object alone
    slope = np.linspace(-1, 1, 32, dtype=np.float32)[:, None].repeat(32, 1)
    sloped = np.where(mask, depth, slope)
    target = translate(sloped, 5, 0, "continuous")
    moved = object_moved(sloped, mask, slope, 5, 0)
    assert np.sqrt(((moved - target) ** 2).mean()) > 0.05
    assert np.sqrt(((moved - target) ** 2).mean()) < np.sqrt(((sloped - target) ** 2).mean())


def test_reach_on_a_store(ivstore):
    r = reach(ivstore["uri"], n_images=3)
    assert r["fixed_map_share"] <= 1 and r["fixed_map_rmse"] > 0
    for mode in ("shift", "shift-x"):
        assert r[mode]["n"] == 6 and r[mode]["pre"] > 0


def _refused(capsys, argv: list[str]) -> str:
    """The one line a refused command prints, after checking its exit code is 2."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    prefix = "python -m actstore.intervene.reach: error: "
    assert err[0].startswith(prefix), err
    return err[0][len(prefix):]


def test_store_is_a_catalog_name_or_a_path(ivstore, tmp_path, capsys):
    """As every actstore command's --store: a catalog name reads its store, and an unknown
    one is the same one line as an actstore command's, exit 2."""
    catalog = store_catalog(tmp_path, ivstore["uri"])
    main(["--store", ivstore["uri"], "--images", "3"])
    by_path = capsys.readouterr().out
    main(["--catalog", catalog, "--store", "iv", "--images", "3"])
    assert capsys.readouterr().out == by_path and "fixed map" in by_path
    assert _refused(capsys, ["--catalog", catalog, "--store", "ivv"]) == \
        "store ivv: does not exist; create it with `actstore materialize`"


def test_reach_without_labels_is_one_line(tiny_store, capsys):
    msg = _refused(capsys, ["--store", tiny_store])
    assert msg.startswith("store") and "no labels 'depth'" in msg


def test_nearest_is_the_brute_force_minimum():
    from actstore.intervene.reach import nearest
    from actstore.metrics import rmse

    rng = np.random.default_rng(1)
    cands = rng.normal(size=(37, 8, 8)).astype(np.float32)
    maps = rng.normal(size=(5, 8, 8)).astype(np.float32)
    maps[2] = cands[30]                               # a map that is one of the candidates
    best, arg = nearest(maps, cands, chunk=8)         # several chunks, the last one short
    for k in range(len(maps)):
        loop = [float(rmse(maps[k][None], c[None])[0]) for c in cands]
        assert best[k] == pytest.approx(min(loop), abs=1e-6)
        assert arg[k] == int(np.argmin(loop))
    assert best[2] < 1e-6 and arg[2] == 30


@pytest.fixture(scope="module")
def toy_depth_store(tmp_path_factory, tiny_store):
    """The reference store with depth labelled by a (small, untrained) toyworld label model."""
    import shutil

    import torch

    from actstore.label.labels import write_labels
    from actstore.label.providers import get_provider
    from actstore.toyworld.labeler import DEFAULT_CONFIG, LabelNet, ToyLabeler

    root = tmp_path_factory.mktemp("reach")
    torch.manual_seed(0)
    ToyLabeler(LabelNet([8, 8]), {**DEFAULT_CONFIG, "widths": [8, 8], "size": 32}) \
        .save_pretrained(root / "toy")
    uri = str(root / "s.zarr")
    shutil.copytree(tiny_store, uri)
    write_labels(uri, get_provider(f"toyworld:{root / 'toy'}"), ["depth", "salient"],
                 on_x0=False, progress=False)
    return uri


def test_render_reach_matches_a_loop_over_renders(toy_depth_store):
    from actstore.intervene.reach import render_reach
    from actstore.toyworld.train import TRAIN_SEED_OFFSET
    from actstore.intervene.targets import make_targets
    from actstore.label.labels import label_array, list_targets
    from actstore.metrics import rmse
    from actstore.store.view import StoreView
    from actstore.toyworld.render import render_scene

    n, pitch = 10, (-0.2, 0.55)
    r = render_reach(toy_depth_store, ("fixed", "varied"), n_renders=n, n_images=2)
    wide = render_reach(toy_depth_store, ("varied",), n_renders=n, n_images=2, pitch=pitch)
    attrs = list_targets(toy_depth_store)["depth"]
    split = StoreView(toy_depth_store, model="trained", complete_only=False).images
    test = np.flatnonzero(split["split"].values == "test")[:2]
    d = np.asarray(label_array(toy_depth_store, "depth", "full")[:], np.float32)
    maps = np.concatenate([make_targets(d[p], str(split["image"].values[p]), "continuous",
                                        n_targets=2, seed=0)[0] for p in test])
    assert r["n"] == len(maps) == 4 and wide["n"] == 4
    for cam, res, pr in (("fixed", r, None), ("varied", r, None), ("varied", wide, pitch)):
        renders = [(render_scene(TRAIN_SEED_OFFSET + i, 64, cam, pr).inv_depth - attrs["mean"])
                   / attrs["std"] for i in range(n)]
        loop = [min(float(rmse(m[None], x[None])[0]) for x in renders) for m in maps]
        assert res[cam]["nearest"] == pytest.approx(float(np.median(loop)), abs=1e-5)
        unshifted = [min(float(rmse(d[p][None], x[None])[0]) for x in renders) for p in test]
        assert res[cam]["nearest_unshifted"] == pytest.approx(float(np.median(unshifted)),
                                                              abs=1e-5)
        assert res[cam]["fixed_map_share"] <= 1
    assert wide["varied"]["nearest"] != r["varied"]["nearest"]   # another world was rendered


def test_render_reach_bad_input_is_one_line(ivstore, toy_depth_store, capsys):
    cases = [([ivstore["uri"], "--renders", "4"], "not a toyworld label model"),
             ([toy_depth_store, "--renders", "1"], "need at least 2"),
             ([toy_depth_store, "--renders", "4", "--camera", "tilted"], "camera 'tilted'"),
             ([toy_depth_store, "--renders", "4", "--camera", "fixed", "--pitch", "0", "0.5"],
              "for --camera varied"),
             ([toy_depth_store, "--renders", "4", "--pitch", "0.5", "0.1"], "LO < HI")]
    for argv, words in cases:
        assert words in _refused(capsys, ["--store", *argv]), argv


def test_bad_counts_are_one_line_before_any_reading(ivstore, capsys):
    """--images 0 printed NaN with numpy warnings and -1 silently left out the last test
    image (exit 0); a value of the wrong type printed the whole usage."""
    for argv, words in ((["--images", "0"], "--images: must be >= 1, got 0"),
                        (["--images", "-1"], "--images: must be >= 1, got -1"),
                        (["--images", "two"], "must be a whole number, got 'two'"),
                        (["--renders", "-5"], "--renders: must be >= 0"),
                        (["--pitch", "0", "nan"], "--pitch: must be a finite number")):
        with pytest.raises(SystemExit) as exc:
            main(["--store", ivstore["uri"], *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and words in err[0], (argv, err)
    with pytest.raises(ActstoreError, match="--images 0: give a count"):
        reach(ivstore["uri"], n_images=0)
    assert reach(ivstore["uri"], n_images=2)["images"] == \
        reach(ivstore["uri"], n_images=99)["images"][:2]
