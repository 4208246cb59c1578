"""The probe grid on a real store, checked against sklearn and brute-force loops."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge

from actstore.store.view import open_store
from actstore.label.labels import open_labels, write_labels
from actstore.probe.runs import (load_probe, load_targets, open_emergence, open_scores,
                                 run_probes)
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


def test_logistic_fits_the_sample_of_the_fit_pass(planted, monkeypatch, tmp_path):
    """With a token budget below the train tokens, each step's probe is the weighted fit
    on the sample the block tasks kept (redrawn here from the arrays), the ridge pass's
    statistics of *all* train tokens standing in for its Gram matrices, λ searched in the
    window around the ridge's. One fit task per store block, so the tasks' statistics and
    samples go through two levels of merges."""
    from actstore.probe import grid, sampling
    from actstore.probe.logistic import (LOGISTIC_LAMBDAS, PATH_TOL, fit_logistic_cv,
                                         lambda_window)
    from actstore.probe.solvers import fit_ridge_cv
    from actstore.probe.stats import image_stats

    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(planted["uri"], uri)
    X, y, split = _train_tokens(uri, "salient")
    train = np.flatnonzero(split == "train")
    yt = (y[train] > 0.5).astype(np.float64).ravel()
    monkeypatch.setattr(sampling, "SAMPLE_MIN_TOKENS", len(yt) // 3)
    monkeypatch.setattr(sampling, "SAMPLE_TOKENS_PER_CHANNEL", 0)
    monkeypatch.setattr(grid, "FIT_TASK_BYTES", 1)
    monkeypatch.setattr(grid, "MERGE_FAN_IN", 2)
    blocks = [(a, b) for a, b in load_targets(uri, "salient")[1].blocks
              if (split[a:b] == "train").any()]
    assert len(blocks) > grid.MERGE_FAN_IN
    run = run_probes(uri, "salient", layers=[LAYER], steps=[STEP], scheduler="threads",
                     progress=False)
    probe = load_probe(uri, run, LAYER)
    image = np.repeat(train, SIDE * SIDE)
    position = np.tile(np.arange(SIDE * SIDE), len(train))
    Xt = X[train].reshape(-1, X.shape[-1])
    s = sampling.draw(Xt[None], yt, image, position, sampling.class_rates(yt, len(yt) // 3))
    assert len(s.y) < 0.5 * len(yt) and (s.weight > 1).any()
    stats = image_stats(image, Xt, yt)
    keep = lambda_window(float(fit_ridge_cv(stats).lam), yt.mean())
    want = fit_logistic_cv(s.x[0], s.y, s.image, lambdas=LOGISTIC_LAMBDAS[keep], tol=PATH_TOL,
                           fold_stats=stats, weight=s.weight)
    np.testing.assert_allclose(probe["weights"][0], want.weights, rtol=1e-4,
                               atol=1e-4 * np.abs(want.weights).max())
    assert abs(probe["bias"][0] - want.bias) < 1e-4 * max(1.0, abs(want.bias))
    assert probe["lam"][0] == np.float32(want.lam)


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


def test_intervals_stored_and_drawn(planted, tmp_path):
    """Bootstrap intervals beside the scores and in emergence/, bands in the figures."""
    from PIL import Image

    from actstore.plots.figures import probe_figures
    from actstore.probe.emergence import format_table, summary_table

    uri = planted["uri"]
    ds = open_scores(uri, planted["runs"]["depth"])
    mean, low, high = ds["mean"], ds["ci_low"], ds["ci_high"]
    ok = mean.notnull()
    assert bool(((low <= mean + 1e-9) & (mean <= high + 1e-9)).where(ok, True).all())
    assert float((high - low).where(ok).mean()) > 0
    em = open_emergence(uri)
    for name in ("ci_low", "ci_high", "emergence_low", "emergence_high"):
        assert name in em, name
    step = em.sel(target="depth", metric="pearson_token", model="trained", layer=LAYER)
    assert float(step["emergence_low"]) <= float(step["emergence_step"]) <= \
        float(step["emergence_high"])
    assert "[" in format_table(summary_table(em))
    pngs = probe_figures(uri, "depth", str(tmp_path / "fig"))
    assert all(Image.open(p).size[0] > 300 for p in pngs)


def test_probe_never_touches_activations_or_labels(planted, tmp_path):
    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(planted["uri"], uri)
    before = {k: v for k, v in tree_digest(uri).items() if not k.startswith(("probes", "emergence"))}
    run_probes(uri, "depth", layers=["mid_block.attentions.0"], steps=[0],
               scheduler="threads", progress=False)
    after = {k: v for k, v in tree_digest(uri).items() if not k.startswith(("probes", "emergence"))}
    assert before == after


def test_probe_progress_counts_layers(planted, tmp_path, capsys):
    """The bar counts model layers (each fitted over every step at once), not image-steps:
    'probe depth: 2/2 [..., layer/s]', where it said '2/2 img-step' before."""
    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(planted["uri"], uri)
    run_probes(uri, "depth", layers=[LAYER, "mid_block.attentions.0"], steps=[0],
               scheduler="threads", progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "probe depth" in bar and "2/2" in bar and "layer" in bar, bar
    assert "img-step" not in bar, bar


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


@pytest.fixture(scope="module")
def cluster():
    """A real multi-process Dask cluster: tasks, statistics and results cross processes."""
    import logging

    from distributed import Client, LocalCluster

    with LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                      dashboard_address=":0", silence_logs=logging.ERROR) as lc, \
            Client(lc) as client:
        yield client


def test_cluster_grid_equals_in_process(planted, cluster, tmp_path, capsys):
    """`actstore probe --scheduler tcp://...` on 2 worker processes: the same probes and
    scores as the threaded in-process run, ridge (depth) and logistic (salient)."""
    from flows.cli import main

    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(planted["uri"], uri)
    for target in ("depth", "salient"):
        code = main(["--no-prefect", "--quiet", "--json", "probe", "--store", uri, "--target",
                     target, "--layers", LAYER, "mid_block.attentions.0", "--steps", "0", str(STEP),
                     "--scheduler", cluster.scheduler.address])
        assert code == 0, capsys.readouterr().err
        run = json.loads(capsys.readouterr().out)["run_id"]
        ref = planted["runs"][target]
        for layer in (LAYER, "mid_block.attentions.0"):
            a, b = load_probe(uri, run, layer), load_probe(planted["uri"], ref, layer)
            scale = np.abs(b["weights"]).max()
            np.testing.assert_allclose(a["weights"], b["weights"], rtol=1e-6, atol=1e-6 * scale)
            np.testing.assert_allclose(a["bias"], b["bias"], rtol=1e-6, atol=1e-6)
        ours, theirs = open_scores(uri, run), open_scores(planted["uri"], ref)
        assert list(ours["image"].values) == list(theirs["image"].values)
        np.testing.assert_allclose(ours["per_image"].values, theirs["per_image"].values,
                                   rtol=1e-6, atol=1e-6, equal_nan=True)


def test_task_graph_carries_no_arrays(planted):
    """What a cluster is sent: URIs, paths and image positions, never activations, labels
    or a reader holding them; the graph stays a few kB whatever the data size."""
    from dataclasses import replace

    import cloudpickle

    from actstore.store.core import layer_path
    from actstore.probe.grid import fit_graph, score_graph
    from actstore.probe.runs import load_targets

    uri = planted["uri"]
    seen: list = []

    class Spy(cloudpickle.Pickler):
        def persistent_id(self, obj):
            seen.append(obj)
            return None

    for target in ("depth", "salient"):
        _, split, sources = load_targets(uri, target)
        src = replace(sources[LAYER], activation=layer_path("trained", LAYER))
        steps = np.array([0, STEP])
        fit = fit_graph(src, split, steps)
        parts, _ = score_graph(src, split, steps, fit)
        graph = dict(fit.__dask_graph__())
        for p in parts:
            graph.update(p.__dask_graph__())
        buf = io.BytesIO()
        Spy(buf).dump(graph)
        arrays = [o for o in seen if isinstance(o, np.ndarray)]
        n_images = len(split.train)
        assert max(a.nbytes for a in arrays) <= 8 * n_images, \
            sorted(a.shape for a in arrays)[-3:]
        assert not any(type(o).__module__.startswith(("xarray", "zarr", "actstore.store"))
                       for o in seen)
        layer_bytes = open_store(uri)[LAYER].nbytes
        assert buf.tell() < 64_000 < layer_bytes / 4, (buf.tell(), layer_bytes)


@pytest.mark.alone   # refused in seconds: run while no other test runs (tests/alone.py)
def test_unreachable_scheduler_is_one_line_within_seconds(planted, tmp_path, capsys):
    import socket
    import time

    from flows.cli import main

    with socket.socket() as s:          # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(planted["uri"], uri)
    before = tree_digest(uri)
    t0 = time.monotonic()
    code = main(["--no-prefect", "--quiet", "probe", "--store", uri, "--target", "depth",
                 "--scheduler", f"tcp://127.0.0.1:{port}"])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"127.0.0.1:{port}" in err[0], err
    assert elapsed < 20, elapsed
    assert tree_digest(uri) == before


def test_emergence_table_of_runs_with_different_steps(ivstore, tmp_path):
    """Each target's row comes from its own latest run: a depth run on fewer steps and
    layers than the salient run must not be read at the salient run's last step (the
    table pads the shorter run with NaN)."""
    from actstore.probe.emergence import emergence_steps, primary_metric, summary_table

    uri = str(tmp_path / "s.zarr")
    shutil.copytree(ivstore["uri"], uri)
    runs = {"salient": ivstore["runs"]["salient"],      # steps 0, 1; two layers
            "depth": run_probes(uri, "depth", layers=[LAYER], steps=[0],
                                scheduler="threads", progress=False)}
    em = open_emergence(uri)
    rows = {r["target"]: r for r in summary_table(em)}
    assert sorted(rows) == ["depth", "salient"]
    for target, run in runs.items():
        mean = open_scores(uri, run)["mean"]
        metric = primary_metric(mean["metric"].values)
        final = mean.sel(metric=metric, model="trained").isel(step=-1)
        best = final.argmax("layer") if metric.startswith("dice") else final.argmin("layer")
        assert rows[target]["best_layer"] == str(mean["layer"].values[int(best)])
        assert rows[target]["trained"] == pytest.approx(float(final.isel(layer=int(best))))
        own = emergence_steps(mean).sel(metric=metric, model="trained",
                                        layer=rows[target]["best_layer"])
        got = em["emergence_step"].sel(target=target, metric=metric, model="trained",
                                       layer=rows[target]["best_layer"])
        np.testing.assert_array_equal(got.values, own.values)
