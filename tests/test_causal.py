"""The causal test's guarantees: the random control is an equal-size edit in another
direction, strength 0 is no edit at all, the effect grows with strength where the answer
is known, and a sweep never reports on the images it chose its setting on."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from actstore.errors import ActstoreError
from actstore.generation.sampling import GenerationConfig, generate
from actstore.intervene.edits import (EditHook, direction_key, equal_norm, generate_edited,
                                      probe_predict, random_directions, torch_probes)
from actstore.intervene.results import open_intervention
from actstore.intervene.scores import effects, summarize_arrays
from actstore.intervene.settings import InterventionSettings as IS, SweepSettings
from actstore.intervene.sweep import choose, fit_split, list_sweeps, run_sweep
from actstore.probe.runs import load_probe
from actstore.store.view import open_store
from conftest import IV_LAYERS, IV_STEPS, TINY, PixelLabels


def _hook(w, b, targets, strengths, random, keys, method="projection", layer="L"):
    return EditHook(method, "continuous", {layer: "ridge"}, {layer: {0: (w, b)}},
                    {layer: targets}, len(strengths), strengths=torch.tensor(strengths),
                    random=torch.tensor(random), keys=keys)


@pytest.mark.parametrize("method", ["projection", "gradient"])
def test_random_control_equal_token_norms_other_direction_seeded(method):
    g = torch.Generator().manual_seed(0)
    T, C = 40, 24
    a = torch.randn(1, T, C, generator=g).repeat(2, 1, 1)      # both rows: the same activation
    w, b = torch.randn(C, generator=g), torch.tensor(0.2)
    t = torch.randn(1, T, generator=g).repeat(2, 1) * 3
    out = torch.cat([torch.zeros_like(a), a])                  # CFG batch: [uncond, cond]
    keys = [direction_key("img-1", 0, 0)] * 2
    hook = _hook(w, b, t, [2.0, 2.0], [False, True], keys, method)
    hook.step = 0
    new = hook("L", out)[2:]
    d_probe, d_rand = new[0] - a[0], new[1] - a[1]
    torch.testing.assert_close(d_rand.norm(dim=-1), d_probe.norm(dim=-1), rtol=1e-5, atol=1e-6)
    cos = (d_probe * d_rand).sum(-1) / (d_probe.norm(dim=-1) * d_rand.norm(dim=-1))
    assert float(cos.abs().max()) < 0.9 and float(cos.abs().mean()) < 0.4
    # the probe sees the probe edit, hardly the random one
    moved = (probe_predict(new, w, b) - probe_predict(a, w, b)).abs().mean(-1)
    assert float(moved[1]) < 0.5 * float(moved[0])
    again = _hook(w, b, t, [2.0, 2.0], [False, True], keys, method)
    again.step = 0
    assert torch.equal(again("L", out)[2:], new)                # seeded: reproducible
    other = _hook(w, b, t, [2.0, 2.0], [False, True], [keys[0], direction_key("img-1", 0, 1)],
                  method)
    other.step = 0
    assert not torch.equal(other("L", out)[3], new[1])          # another seed, another draw
    # the same direction at every strength: only its length changes
    u = random_directions(keys[:1], "L", 0, (T, C), torch.device("cpu"))
    half = equal_norm(d_probe[None] / 2, u)
    torch.testing.assert_close(half * 2, d_rand[None], rtol=1e-5, atol=1e-6)
    assert direction_key("img-1", 0, 0) != direction_key("img-2", 0, 0)


@pytest.mark.parametrize("halves", ["cond", "both"])
def test_strength_zero_is_bitwise_unchanged_in_generation(ivstore, tiny_model, halves):
    uri = ivstore["uri"]
    view = open_store(uri)
    table = view.images.isel(image=slice(12, 15))
    prompts = [str(p) for p in table["prompt"].values] * 2
    seeds = [int(s) for s in table["seed"].values] * 2
    gen = GenerationConfig(steps=TINY["steps"])
    plain = generate(tiny_model, prompts, seeds, gen)
    probes = {la: load_probe(uri, ivstore["runs"]["depth"], la) for la in IV_LAYERS}
    tprobes = torch_probes(probes, IV_STEPS, torch.device("cpu"))
    rng = np.random.default_rng(0)
    n = len(prompts)
    targets = {la: torch.from_numpy(rng.normal(size=(n, int(np.prod(view[la].shape[2:4]))))
                                    .astype(np.float32) * 5) for la in IV_LAYERS}
    strengths = [0.0, 0.0, 0.0, 1.0, 0.0, 3.0]
    random = [False, True, False, False, True, True]
    hook = EditHook("projection", "continuous", {la: "ridge" for la in IV_LAYERS}, tprobes,
                    targets, n, strengths=torch.tensor(strengths), random=torch.tensor(random),
                    keys=[direction_key(str(i), 0, 0) for i in range(n)], halves=halves)
    edited = generate_edited(tiny_model, prompts, seeds, gen, hook=hook)
    zero = np.array(strengths) == 0
    assert np.array_equal(edited[zero], plain[zero])
    assert not np.array_equal(edited[~zero], plain[~zero])
    stats = hook.stats()
    assert (stats[zero, 2:] == 0).all() and (stats[~zero, 2] > 0).all()


def test_effect_grows_with_strength_on_a_planted_network():
    """A network whose output is a known linear function of the edited activation: each
    token's output is the probe's own reading, so at strength s the output's RMSE to the
    target is exactly (1 - s) times the original's, and an equal-size random edit, which
    the readout hardly sees, does not get closer."""
    g = torch.Generator().manual_seed(3)
    T, C, n = 64, 16, 4
    w, b = torch.randn(C, generator=g), torch.tensor(0.1)

    class Planted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Identity()

        def forward(self, x):
            return probe_predict(self.inner(x), w, b)

    net = Planted()
    x = torch.randn(n, T, C, generator=g)
    target = torch.randn(n, T, generator=g) * 2
    strengths = [0.0, 0.25, 0.5, 0.75, 1.0]
    rows = [(i, s, r) for i in range(n) for s in strengths for r in (False, True)]
    hook = EditHook("projection", "continuous", {"inner": "ridge"}, {"inner": {0: (w, b)}},
                    {"inner": torch.stack([target[i] for i, _, _ in rows])}, len(rows),
                    strengths=torch.tensor([s for _, s, _ in rows]),
                    random=torch.tensor([r for _, _, r in rows]),
                    keys=[direction_key(f"im{i}", 0, 0) for i, _, _ in rows])
    hook.step = 0
    batch = torch.stack([x[i] for i, _, _ in rows])
    handle = net.inner.register_forward_hook(
        lambda _m, _a, out: hook("inner", torch.cat([out, out]))[len(rows):])
    with torch.no_grad():
        y = net(batch)
    handle.remove()
    from actstore.metrics import rmse
    post = rmse(y.numpy(), torch.stack([target[i] for i, _, _ in rows]).numpy())
    post = post.reshape(n, 1, len(strengths), 2)
    pre = rmse(probe_predict(x, w, b).numpy(), target.numpy()).reshape(n, 1)
    stats = np.zeros((n, 1, len(strengths), 2, 4))
    summary = summarize_arrays(pre, post, np.full_like(post, np.nan), stats, strengths=strengths,
                               arms=["probe", "random"], kind="continuous")
    gains = [r["effect"]["gain"] for r in summary["dose"]]
    assert np.all(np.diff(gains) > 0) and abs(gains[0]) < 1e-6
    np.testing.assert_allclose(post[..., 0], (1 - np.array(strengths)) * pre[..., None],
                               rtol=1e-4, atol=1e-5)
    margins = [r["effect"]["over_random"] for r in summary["dose"][1:]]
    assert np.all(np.diff(margins) > 0) and margins[0] > 0


def test_choose_takes_the_most_specific_effect_smaller_edit_on_ties():
    def row(spec, size, strength=1.0):
        return {"effect": {"specific": spec}, "relative_change": size, "strength": strength}
    rows = [row(0.1, 0.2), row(0.3, 0.9), row(0.3, 0.4), row(None, 0.1), row(0.5, 0, 0.0)]
    assert choose(rows) is rows[2]
    assert choose([row(None, 0.1), row(0.0, 0.0, 0.0)]) is None
    assert effects({"probe": {"post": {"median": 0.5}, "other_targets": {"median": 0.4}},
                    "random": {"post": {"median": 0.2}}}, 0.3, "binary")["specific"] == \
        pytest.approx(0.1)
    assert effects({"probe": {"post": {"median": 0.6}, "other_targets": {"median": 0.9}},
                    "random": {"post": {"median": 0.8}}}, 0.8, "continuous")["specific"] == \
        pytest.approx(0.2)


def test_sweep_chooses_on_validation_and_reports_on_other_images(ivstore, tiny_model, tmp_path):
    uri = str(tmp_path / "sweep.zarr")
    shutil.copytree(ivstore["uri"], uri)
    # no cap: tiny-random's projection edits are as large as its activations (the cap's
    # own tests are in test_sweep_cap.py)
    settings = SweepSettings(kinds=("attn1",), step_counts=(1, 2), strengths=(1.0, 4.0),
                             validation=2, evaluation=3, max_edit_size=1e9,
                             base=IS(n_targets=2, provider=PixelLabels(), batch_size=8))
    out = run_sweep(uri, [ivstore["runs"]["salient"]], settings, model=tiny_model,
                    out_dir=str(tmp_path), progress=False)
    (rec,) = list_sweeps(uri).values()
    val, ev = rec["validation_images"], rec["evaluation_images"]
    assert len(val) == 2 and len(ev) == 3 and not set(val) & set(ev)
    assert val + ev == [f"demo-0{i}" for i in range(10, 15)]     # test split, store order
    assert len(rec["cells"]) == 2 * 2 and {tuple(c["steps"]) for c in rec["cells"]} == {(0,), (0, 1)}
    for exp in rec["experiments"]:                                  # selection saw only these
        ds = open_intervention(uri, exp)
        assert sorted(ds["image"].values) == sorted(val)
    final = open_intervention(uri, rec["evaluation"])
    assert sorted(final["image"].values) == sorted(ev)
    assert not set(final["image"].values) & set(val)
    prov = final.attrs["settings"]["provenance"]
    assert prov["sweep"] == rec["sweep_id"] and prov["validation_images"] == val
    chosen = rec["chosen"]
    assert final.attrs["settings"]["layers"] == chosen["layers"]
    assert final.attrs["settings"]["steps"] == chosen["steps"]
    assert list(final["strength"].values) == [chosen["strength"]]
    assert list(final["arm"].values) == ["probe", "random"]          # both controls kept
    assert np.isfinite(final["score_other"].values).any()
    best = max(c["effect"]["specific"] for c in rec["cells"])
    assert chosen["effect"]["specific"] == best
    assert {p.rsplit("/", 1)[-1] for p in out["figures"]} == {"dose-response.png",
                                                              "intervention-salient.png"}
    again = run_sweep(uri, [ivstore["runs"]["salient"]], settings, model=tiny_model,
                      progress=False)
    assert again["targets"]["salient"]["sweep_id"] == rec["sweep_id"]
    # resumed on another device (a run begun under auto, a GPU's, finished on the CPU)
    assert settings.base.device == "auto"
    elsewhere = replace(settings, base=settings.base.with_(device="cpu"))
    moved = run_sweep(uri, [ivstore["runs"]["salient"]], elsewhere, model=tiny_model,
                      progress=False)["targets"]["salient"]
    assert moved["sweep_id"] == rec["sweep_id"] and list(list_sweeps(uri)) == [rec["sweep_id"]]
    assert moved["settings"]["base"]["device"] == "cpu"      # the record says where it ran


def test_sweep_needs_enough_test_images(ivstore, tiny_model):
    with pytest.raises(ActstoreError, match="test images"):
        run_sweep(ivstore["uri"], ivstore["runs"]["salient"],
                  SweepSettings(validation=4, evaluation=4,
                                base=IS(provider=PixelLabels())), model=tiny_model)


def test_fit_split_shrinks_the_sets_to_the_stores_test_images(ivstore):
    table = open_store(ivstore["uri"]).images
    n = int((table["split"].values == "test").sum())
    fitted = fit_split(ivstore["uri"], SweepSettings(validation=3 * n, evaluation=8 * n))
    assert (fitted.validation, fitted.evaluation) == (round(n * 3 / 11), n - round(n * 3 / 11))
    small = SweepSettings(validation=1, evaluation=1)
    assert fit_split(ivstore["uri"], small) is small


@pytest.mark.parametrize("strengths,words", [((1, -1), ">= 0"), ((2, 2), "strength 2 is named twice"),
                                             ((), "(none)"), ((float("nan"),), "finite")])
def test_settings_refuse_bad_strengths_in_one_line(strengths, words):
    with pytest.raises(ActstoreError, match="--strength") as info:
        IS(strengths=strengths)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_reader_per_step_reads_each_steps_x0_of_the_test_images(tiny_model, tmp_path):
    import csv

    from actstore.generation.materialize import MaterializeSettings, materialize
    from actstore.toyworld.naming import naming_step, reader_per_step
    from actstore.toyworld.reader import OBJECTS, agreement, attributes
    from conftest import REPO

    rows = list(csv.DictReader(open(REPO / "prompts" / "toyworld.csv")))[:6]
    for i, r in enumerate(rows):
        r["split"] = "test" if i % 2 else "train"
    table = tmp_path / "toy.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    uri = str(tmp_path / "toy.zarr")
    materialize(tiny_model, str(table), uri,
                MaterializeSettings(batch_size=6, block_size=6, gen=GenerationConfig(steps=3)),
                progress=False)

    class Recorder:
        """Says 'light from the left, one red cube' of every image; keeps what it saw."""
        def __init__(self):
            self.seen = []

        def __call__(self, images):
            self.seen.append(images.copy())
            n = len(images)
            objects = np.zeros((n, len(OBJECTS)), np.float32)
            objects[:, 0] = 1
            return {"light": np.zeros(n, int), "count": np.zeros(n, int), "objects": objects}

    reader = Recorder()
    got = reader_per_step(uri, reader)
    view = open_store(uri)
    test = [i for i, r in enumerate(rows) if r["split"] == "test"]
    x0 = view.x0_images.values[test]
    assert got["n"] == 3 and got["steps"] == [0, 1, 2]
    for s in range(3):
        assert np.array_equal(reader.seen[s], x0[:, s])
    assert np.array_equal(reader.seen[3], view.final_images.values[test])
    truth = attributes([rows[i]["prompt"] for i in test])
    want = agreement(reader(x0[:, 0]), truth)
    assert got["per_step"]["light"] == [want["light"]] * 3
    assert got["final"]["object_set"] == want["object_set"]
    assert naming_step([0.1, 0.5, 0.95, 1.0], 1.0) == 2 and naming_step([0.1], 0.0) is None


def test_edits_that_blow_the_model_up_are_counted_not_scored(ivstore, tiny_model, tmp_path):
    import zarr

    from actstore.intervene.results import group_path
    from actstore.intervene.run import run_interventions

    uri = str(tmp_path / "blow.zarr")
    shutil.copytree(ivstore["uri"], uri)
    out = run_interventions(uri, ivstore["runs"]["depth"],
                            IS(layers=IV_LAYERS, steps=IV_STEPS, images=["demo-012", "demo-013"],
                               n_targets=1, strengths=(1.0, 1e38), provider=PixelLabels()),
                            model=tiny_model, progress=False)
    grp = zarr.open_group(uri, path=group_path(out["experiment_id"]), mode="r")
    blown = ~np.isfinite(grp["edit_stats"][...]).all(-1)
    assert not blown[:, :, 0].any() and blown[:, :, 1].all()
    assert np.isnan(grp["score_post"][...][blown]).all()
    huge = out["dose"][1]
    assert huge["probe"]["non_finite"] == 2 and huge["probe"]["post"] == {"n": 0}
    assert huge["effect"]["specific"] is None and out["dose"][0]["probe"]["post"]["n"] == 2


def test_shift_x_targets_are_the_papers_horizontal_offsets():
    from actstore.intervene.targets import make_targets, translate

    depth = np.add.outer(np.arange(32.0), np.zeros(32)).astype(np.float32)   # rows = depth
    depth[10:16, 4:10] = 50
    both, off = make_targets(depth, "img-3", "continuous", n_targets=4, seed=0, mode="shift")
    horiz, off_x = make_targets(depth, "img-3", "continuous", n_targets=4, seed=0, mode="shift-x")
    assert (off_x[:, 0] == 0).all() and np.array_equal(off_x[:, 1], off[:, 1])
    assert (off[:, 0] != 0).all()
    for k in range(4):
        assert np.array_equal(horiz[k], translate(depth, 0, int(off[k, 1]), "continuous"))
        # a horizontal shift keeps every ground row's depth; the paper's moves the horizon
        assert np.array_equal(horiz[k][25], depth[25]) and not np.array_equal(both[k][25],
                                                                              depth[25])
    with pytest.raises(ActstoreError, match="shift-x"):
        make_targets(depth, "img-3", "continuous", n_targets=1, seed=0, mode="diagonal")
