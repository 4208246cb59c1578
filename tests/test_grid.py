"""The probe grid on a real store, checked against sklearn and brute-force loops."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge

from actstore.store.view import open_store
from actstore.label.labels import open_labels, write_labels
from actstore.probe.runs import load_probe, open_emergence, open_scores, run_probes
from conftest import tree_digest

LAYER, STEP, NOISE = "up_blocks.3.attentions.0", 2, 0.2
SIDE = 8  # LAYER's token grid in tiny-random; images are 64 px, so 8x8 pixel blocks


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_store):
    """A store copy whose label is a known linear map of one cell's activations + noise."""
    root = tmp_path_factory.mktemp("grid")
    uri = str(root / "s.zarr")
    shutil.copytree(tiny_store, uri)
    view = open_store(uri)
    X = view[LAYER].isel(step=STEP).values.astype(np.float32)   # (image, 8, 8, C)
    rng = np.random.default_rng(0)
    w = rng.normal(size=X.shape[-1]).astype(np.float32)
    signal = X @ w
    noise = NOISE * signal.std() * rng.normal(size=signal.shape).astype(np.float32)
    y_tok = signal + noise + 3.0
    full = np.kron(y_tok, np.ones((1, 64 // SIDE, 64 // SIDE), np.float32))
    ids = view.images["image"].values
    np.savez(root / "planted.npz", image_id=ids.astype(str), depth=full,
             salient=(full > np.median(full)).astype(np.float32))
    for target in ("depth", "salient"):
        write_labels(uri, f"array:{root / 'planted.npz'}", target, progress=False)
    runs = {t: run_probes(uri, t, layers=[LAYER, "mid_block.attentions.0"], steps=[0, STEP],
                          scheduler="threads", progress=False) for t in ("depth", "salient")}
    return {"uri": uri, "signal": signal, "noise": noise, "runs": runs}


def _train_tokens(uri, target):
    view = open_store(uri)
    split = view.images["split"].values
    X = view[LAYER].isel(step=STEP).values.astype(np.float32)
    y = open_labels(uri, target)[f"r{SIDE}"].values
    return X, y, split


def test_planted_signal_recovered(planted):
    uri = planted["uri"]
    X, y, split = _train_tokens(uri, "depth")
    test = split == "test"
    scores = open_scores(uri, planted["runs"]["depth"])["per_image"]
    rmse = scores.sel(metric="rmse_token", model="trained", layer=LAYER, step=STEP).values
    var = y[test].var()
    r2_fit = 1 - np.mean(rmse ** 2) / var
    # planted R² on the same test tokens, in the label's normalized units
    std = open_labels(uri, "depth").attrs["std"]
    r2_true = 1 - np.mean((planted["noise"][test] / std) ** 2) / var
    assert r2_true > 0.9
    assert abs(r2_fit - r2_true) < 0.01, (r2_fit, r2_true)


def test_ridge_matches_sklearn_on_store_arrays(planted):
    uri = planted["uri"]
    X, y, split = _train_tokens(uri, "depth")
    train = split == "train"
    Xt, yt = X[train].reshape(-1, X.shape[-1]), y[train].reshape(-1)
    probe = load_probe(uri, planted["runs"]["depth"], LAYER)
    k = probe["steps"].index(STEP)
    Xc = Xt - Xt.mean(0)
    alpha = probe["lam"][k] * np.trace(Xc.T.astype(np.float64) @ Xc) / Xt.shape[1]
    ref = Ridge(alpha=alpha).fit(Xt.astype(np.float64), yt)
    np.testing.assert_allclose(probe["weights"][k], ref.coef_, rtol=1e-3,
                               atol=1e-3 * np.abs(ref.coef_).max())
    assert abs(probe["bias"][k] - ref.intercept_) < 1e-3


def test_logistic_matches_sklearn_on_store_arrays(planted):
    uri = planted["uri"]
    X, y, split = _train_tokens(uri, "salient")
    train = split == "train"
    Xt, yt = X[train].reshape(-1, X.shape[-1]), (y[train].reshape(-1) > 0.5).astype(int)
    probe = load_probe(uri, planted["runs"]["salient"], LAYER)
    assert probe["solver"] == "logistic"
    k = probe["steps"].index(STEP)
    Xc = Xt - Xt.mean(0)
    alpha = probe["lam"][k] * np.trace(Xc.T.astype(np.float64) @ Xc) / Xt.shape[1]
    ref = LogisticRegression(C=1 / alpha, tol=1e-10, max_iter=10000).fit(
        Xt.astype(np.float64), yt)
    ours = Xt @ probe["weights"][k] + probe["bias"][k]
    theirs = ref.decision_function(Xt)
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max())


def test_scores_match_brute_force(planted):
    """Dice and RMSE per test image recomputed by plain loops from the stored weights."""
    uri = planted["uri"]
    view = open_store(uri)
    split = view.images["split"].values
    for target, metric in (("depth", "rmse_token"), ("salient", "dice_token")):
        run = planted["runs"][target]
        probe = load_probe(uri, run, LAYER)
        k = probe["steps"].index(STEP)
        labels = open_labels(uri, target)[f"r{SIDE}"].values
        stored = open_scores(uri, run)["per_image"].sel(metric=metric, model="trained",
                                                         layer=LAYER, step=STEP)
        for image in stored["image"].values:
            i = list(view.images["image"].values).index(image)
            assert split[i] == "test"
            x = view[LAYER].sel(image=image, step=STEP).values.astype(np.float64)
            pred = np.zeros((SIDE, SIDE))
            for r in range(SIDE):
                for c in range(SIDE):
                    pred[r, c] = x[r, c] @ probe["weights"][k] + probe["bias"][k]
            truth = labels[i]
            if metric == "rmse_token":
                expect = np.sqrt(np.mean((pred - truth) ** 2))
            else:
                p, t = pred > 0, truth > 0.5
                expect = 2 * (p & t).sum() / (p.sum() + t.sum()) if (p.sum() + t.sum()) else 1.0
            assert abs(float(stored.sel(image=image)) - expect) < 1e-4, (target, image)


def test_run_metadata_and_emergence(planted):
    uri = planted["uri"]
    em = open_emergence(uri)
    assert set(em["target"].values) == {"depth", "salient"}
    assert {"dice_label", "rmse_label", "pearson_token"} <= set(em["metric"].values)
    step = em["emergence_step"].sel(target="depth", metric="pearson_token", model="trained",
                                    layer=LAYER)
    assert float(step) in (0.0, float(STEP))
    # the planted cell is the best one for its own target
    mean = open_scores(uri, planted["runs"]["depth"])["mean"]
    best = mean.sel(metric="pearson_token", model="trained").argmax(...)
    assert mean["layer"].values[best["layer"]] == LAYER
    assert mean["step"].values[best["step"]] == STEP


def test_probe_never_touches_activations_or_labels(planted, tmp_path):
    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(planted["uri"], uri)
    before = {k: v for k, v in tree_digest(uri).items() if not k.startswith(("probes", "emergence"))}
    run_probes(uri, "depth", layers=["mid_block.attentions.0"], steps=[0],
               scheduler="threads", progress=False)
    after = {k: v for k, v in tree_digest(uri).items() if not k.startswith(("probes", "emergence"))}
    assert before == after


@pytest.mark.parametrize("extra,words", [
    (["--target", "shading"], "no target 'shading'"),
    (["--target", "depth", "--layers", "up_blocks.9.attentions.0"], "no layer"),
    (["--target", "depth", "--steps", "99"], "no step 99"),
    (["--target", "depth", "--models", "randomized"], "has no model 'randomized'"),
])
def test_probe_bad_input(planted, tmp_path, capsys, extra, words):
    from flows.cli import main

    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(planted["uri"], uri)
    before = tree_digest(uri)
    code = main(["--no-prefect", "--quiet", "probe", "--store", uri, *extra,
                 "--scheduler", "threads"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert tree_digest(uri) == before


def test_probe_refuses_incomplete_store(planted, tiny_model, tmp_path, capsys):
    """The randomized control only half materialized: refuse, naming the missing blocks."""
    from flows.cli import main
    from actstore.generation.sampling import GenerationConfig
    from actstore.generation.materialize import MaterializeSettings, materialize
    from actstore.generation.models import apply_control, load_model
    from conftest import DEMO, TINY

    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(planted["uri"], uri)
    control = apply_control(load_model("tiny-random", device="cpu"), "randomized")
    materialize(control, DEMO, uri,
                MaterializeSettings(gen=GenerationConfig(steps=TINY["steps"])), images="0:8",
                progress=False)
    before = tree_digest(uri)
    code = main(["--no-prefect", "--quiet", "probe", "--store", uri, "--target", "depth",
                 "--scheduler", "threads"])
    err = capsys.readouterr().err
    assert code == 2 and "'randomized' is incomplete" in err and "8:12, 12:16" in err, err
    assert tree_digest(uri) == before
