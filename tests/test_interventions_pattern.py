"""--direction pattern: the projection edit along the probe's activation pattern
Cov(a, ŷ)/Var(ŷ) instead of its weights. The pattern equals a brute-force covariance over
the stored train tokens, the probe still reads the target, strength 0 is no edit, the
random control matches its size, and the record names the direction; --direction probe is
today's experiment, id and bits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from actstore.errors import ActstoreError
from actstore.intervene.edits import EditHook, direction_key, probe_predict
from actstore.intervene.pattern import patterns
from actstore.intervene.plan import plan_interventions
from actstore.intervene.results import existing_settings
from actstore.intervene.run import run_interventions
from actstore.intervene.settings import InterventionSettings as IS
from actstore.intervene.sweeprecords import settings_json
from actstore.probe.runs import load_probe
from actstore.store.view import StoreView, open_store
from conftest import (IV_LAYERS as LAYERS, IV_STEPS as STEPS, PixelLabels, iv_cli,
                      small_experiment, tree_digest)
from flows.cli_intervene import sweep_settings


def test_pattern_is_the_covariance_of_the_train_tokens_with_the_probe(ivstore):
    uri, run = ivstore["uri"], ivstore["runs"]["depth"]
    probes = {la: load_probe(uri, run, la) for la in LAYERS}
    got, record = patterns(StoreView(uri, complete_only=False), probes, STEPS)
    view = open_store(uri)
    train = view.images["split"].values == "train"
    assert record["n_images"] == int(train.sum()) > 0
    for la in LAYERS:
        acts = view[la].values[train]                       # (n, S, h, w, C) as stored
        for s in STEPS:
            a = acts[:, s].reshape(-1, acts.shape[-1]).astype(np.float64)
            w = np.asarray(probes[la]["weights"][probes[la]["steps"].index(s)], np.float64)
            y = a @ w + float(probes[la]["bias"][probes[la]["steps"].index(s)])
            joint = np.cov(np.column_stack([a, y]), rowvar=False)
            want = joint[:-1, -1] / joint[-1, -1]             # Cov(a, ŷ)/Var(ŷ)
            np.testing.assert_allclose(got[la][s], want, rtol=1e-5, atol=1e-7)
            sigma = np.cov(a, rowvar=False)                   # = Σw/(wᵀΣw), Haufe et al.
            np.testing.assert_allclose(got[la][s], sigma @ w / (w @ sigma @ w), rtol=1e-5,
                                       atol=1e-7)
            assert abs(float(got[la][s] @ w) - 1) < 1e-5     # the probe reads it as 1
            # not the filter itself: the pattern leans toward the directions that vary
            cos = got[la][s] @ w / np.linalg.norm(got[la][s]) / np.linalg.norm(w)
            assert cos < 0.999


def _edit(a, w, b, t, d, strengths, random):
    """The hook on a CFG batch whose conditional half is ``a``; returns the edited half."""
    n = len(strengths)
    hook = EditHook("projection", "continuous", {"L": "ridge"}, {"L": {0: (w, b)}},
                    {"L": t}, n, strengths=torch.tensor(strengths),
                    random=torch.tensor(random), keys=[direction_key("img", 0, 0)] * n,
                    directions=None if d is None else {"L": {0: d}})
    hook.step = 0
    return hook("L", torch.cat([torch.zeros_like(a), a]))[n:]


def test_pattern_edit_reads_the_target_moves_along_p_and_keeps_the_control_fair():
    g = torch.Generator().manual_seed(3)
    T, C = 50, 16
    a = torch.randn(1, T, C, generator=g).repeat(4, 1, 1)
    w, b = torch.randn(C, generator=g), torch.tensor(-0.3)
    mix = torch.randn(C, C, generator=g)
    sigma = mix @ mix.T
    p = sigma @ w / (w @ sigma @ w)                           # a pattern of that probe
    t = torch.randn(1, T, generator=g).repeat(4, 1) * 2
    new = _edit(a, w, b, t, p, [1.0, 0.0, 1.0, 2.0], [False, False, True, False])
    torch.testing.assert_close(probe_predict(new[0], w, b), t[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(new[1], a[1])                          # strength 0: bitwise
    delta = new[0] - a[0]                                     # every token moves along p
    cos = delta @ p / (delta.norm(dim=-1) * p.norm())
    torch.testing.assert_close(cos.abs(), torch.ones(T), rtol=0, atol=1e-5)
    # the random arm: the pattern edit's norm at every token, another direction
    torch.testing.assert_close((new[2] - a[2]).norm(dim=-1), delta.norm(dim=-1),
                               rtol=1e-5, atol=1e-6)
    z = probe_predict(a[3], w, b)
    torch.testing.assert_close(probe_predict(new[3], w, b), z + 2 * (t[3] - z), rtol=1e-5,
                               atol=1e-4)
    # the same reading costs at least the minimal-norm edit (‖p‖‖w‖ ≥ wᵀp = 1)
    along_w = _edit(a, w, b, t, None, [1.0] * 4, [False] * 4)
    assert bool(((along_w[0] - a[0]).norm(dim=-1) <= delta.norm(dim=-1) + 1e-6).all())
    # d = w is today's projection, bit for bit
    assert torch.equal(_edit(a, w, b, t, w.clone(), [1.0] * 4, [False] * 4), along_w)


def test_pattern_experiment_names_its_direction_and_resumes(ivstore, tiny_model, tmp_path):
    uri, run, base = small_experiment(ivstore, tmp_path)
    pat = base.with_(direction="pattern")
    kw = dict(model=tiny_model, progress=False)
    out = run_interventions(uri, run, pat, **kw)
    assert out["complete"] and out["direction"] == "pattern"
    assert out["experiment_id"].startswith("depth-projection-pattern-")
    record = existing_settings(uri, out["experiment_id"])
    assert record["direction"] == "pattern"
    assert record["pattern"]["images"] == "train" and len(record["pattern"]["sha256"]) == 64
    edit = out["dose"][0]["probe"]["edit"]
    assert edit["probe_error_after"] < 1e-3 < edit["probe_error_before"]
    rnd = out["dose"][0]["random"]["edit"]
    assert np.isclose(rnd["token_relative_change"], edit["token_relative_change"], rtol=0.05)
    along_w = run_interventions(uri, run, base, **kw)
    assert "direction" not in existing_settings(uri, along_w["experiment_id"])
    assert along_w["experiment_id"] != out["experiment_id"]
    # larger for the same reading, as the norms promise
    assert along_w["dose"][0]["probe"]["edit"]["relative_change"] < edit["relative_change"]
    assert run_interventions(uri, run, pat, **kw)["blocks_written"] == 0
    explicit = plan_interventions(uri, run, base.with_(direction="probe"))
    assert explicit.experiment_id == along_w["experiment_id"] and explicit.patterns is None


def test_gradient_along_the_pattern_is_refused_in_one_line(ivstore, tmp_path):
    uri = str(tmp_path / "g.zarr")
    shutil.copytree(ivstore["uri"], uri)
    before = tree_digest(uri)
    with pytest.raises(ActstoreError) as info:
        iv_cli(["intervene", "--store", uri, "--probe-run", ivstore["runs"]["depth"],
              "--method", "gradient", "--direction", "pattern", "--provider",
              "toyworld:/nonexistent"])
    assert "--direction pattern" in str(info.value) and "\n" not in str(info.value)
    assert tree_digest(uri) == before


def test_sweep_records_the_direction_and_keeps_default_ids():
    common = ["sweep", "--store", "s.zarr", "--probe-run", "r"]
    default = settings_json(sweep_settings(iv_cli(common)))
    probe = settings_json(sweep_settings(iv_cli(common + ["--direction", "probe"])))
    pattern = settings_json(sweep_settings(iv_cli(common + ["--direction", "pattern"])))
    assert "direction" not in default["base"] and probe == default
    assert pattern["base"]["direction"] == "pattern"
    assert json.dumps(pattern, sort_keys=True) != json.dumps(default, sort_keys=True)


def test_a_store_without_train_images_has_no_pattern_one_line(ivstore, tmp_path):
    import zarr

    uri = str(tmp_path / "n.zarr")
    shutil.copytree(ivstore["uri"], uri)
    split = zarr.open_array(uri, path="images/split", mode="r+")
    split[...] = np.array(["test"] * split.shape[0], dtype=split.dtype)
    before = tree_digest(uri)
    settings = IS(layers=LAYERS, steps=STEPS, direction="pattern", provider=PixelLabels())
    with pytest.raises(ActstoreError) as info:
        plan_interventions(uri, ivstore["runs"]["depth"], settings)
    assert "no train images" in str(info.value) and "\n" not in str(info.value)
    assert tree_digest(uri) == before
