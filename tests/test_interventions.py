"""Interventions: edits do what their maths says, a no-op edit is bitwise a no-op, the
experiment is resumable and scored right, and bad input changes nothing."""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import pytest
import torch

from actstore.store.view import open_store
from actstore.generation.capture import attn1_hooks
from actstore.errors import ActstoreError
from actstore.generation.sampling import GenerationConfig, generate
from flows.cli_intervene import add_intervene_parser, intervene_command
from actstore.intervene.edits import (EditHook, generate_edited, gradient_edit,
                                         probe_predict, project, torch_probes)
from actstore.intervene.results import list_interventions, open_intervention
from actstore.intervene.targets import (SHIFT_RANGE, insert_object_depth, load_user_targets,
                                           make_targets, shift_offset, token_targets, translate)
from actstore.intervene.run import run_interventions
from actstore.intervene.settings import InterventionSettings as IS
from actstore.label.labels import open_labels
from actstore.metrics import dice, rmse
from actstore.probe.runs import load_probe
from conftest import IV_LAYERS as LAYERS, IV_STEPS as STEPS, TINY, PixelLabels, tree_digest

BLOCK = slice(12, 16)   # demo-012..015: one whole store block of test images


def _block(uri):
    view = open_store(uri)
    table = view.images.isel(image=BLOCK)
    return ([str(p) for p in table["prompt"].values], [int(s) for s in table["seed"].values],
            view.final_images.isel(image=BLOCK).values)


def _probes(uri, run):
    probes = {la: load_probe(uri, run, la) for la in LAYERS}
    return probes, torch_probes(probes, STEPS, torch.device("cpu"))


def _capture(model, prompts, seeds, gen):
    """Plain generation, keeping the conditional-half activations at the edit points."""
    acts, state, n = {}, {"step": -1}, len(prompts)

    def keep(layer, out):
        if state["step"] in STEPS:
            acts[(layer, state["step"])] = out[n:].float().contiguous().clone()

    with attn1_hooks(model.unet, LAYERS, keep):
        images = generate(model, prompts, seeds, gen,
                          on_step_start=lambda i: state.__setitem__("step", i))
    return images, acts


class Recording(EditHook):
    """Keeps each edit's input and output activation."""

    def __call__(self, layer, out):
        new = super().__call__(layer, out)
        if new is not None:
            n = self.n_images
            self.record[(layer, self.step)] = (out[n:].float().clone(), new[n:].float().clone())
        return new


def _hook(cls, method, kind, probes, tprobes, targets, n):
    hook = cls(method, kind, {la: p["solver"] for la, p in probes.items()}, tprobes, targets, n)
    hook.record = {}
    return hook


# --- the edits ---------------------------------------------------------------------------

def test_projection_reaches_target_along_probe_direction_in_generation(ivstore, tiny_model):
    uri = ivstore["uri"]
    prompts, seeds, _ = _block(uri)
    probes, tprobes = _probes(uri, ivstore["runs"]["depth"])
    rng = np.random.default_rng(0)
    targets = {la: torch.from_numpy(rng.normal(size=(4, int(np.prod(
        open_store(uri)[la].shape[2:4])))).astype(np.float32)) for la in LAYERS}
    hook = _hook(Recording, "projection", "continuous", probes, tprobes, targets, 4)
    generate_edited(tiny_model, prompts, seeds, GenerationConfig(steps=TINY["steps"]), hook=hook)
    assert set(hook.record) == {(la, s) for la in LAYERS for s in STEPS}
    for (layer, step), (a, new) in hook.record.items():
        w, b = tprobes[layer][step]
        t = targets[layer]
        pred = probe_predict(new, w, b)
        scale = float(t.abs().max() + (a.abs() @ w.abs()).max())
        assert float((pred - t).abs().max()) < 1e-5 * scale, (layer, step)
        delta = new - a
        w_hat = w / w.norm()
        across = delta - (delta @ w_hat)[..., None] * w_hat       # part in w's null space
        assert float(across.norm(dim=-1).max()) < 1e-5 * float(a.norm(dim=-1).max())
        v = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(1))
        v = v - (v @ w_hat) * w_hat                                # a null-space direction
        assert float((delta @ v).abs().max()) < 1e-4 * float(a.norm(dim=-1).max())


def test_projection_closed_form_on_random_tokens():
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(3, 50, 16, generator=g), torch.randn(16, generator=g)
    b, t = torch.tensor(0.3), torch.randn(3, 50, generator=g) * 4
    new = project(a, w, b, t)
    torch.testing.assert_close(probe_predict(new, w, b), t, atol=1e-5, rtol=1e-5)
    # minimal norm: any other edit reaching t, e.g. along a tilted direction, is longer
    u = w + 0.3 * torch.randn(16, generator=g)
    other = a + ((t - probe_predict(a, w, b)) / (u @ w))[..., None] * u
    assert float((new - a).norm()) < float((other - a).norm())


def test_a_probe_without_direction_leaves_its_point_unedited():
    """A probe fitted where its train labels held one class has weights 0 (the ridge
    fallback on constant labels; on the tiny model's 2x2-token points, salient). Projection
    divided by w·w = 0: `actstore intervene` on such a run (docs/interventions.md's default
    salient points) reported every image non-finite. The point is now left as it is, in
    both arms, and the other points are edited as before."""
    g = torch.Generator().manual_seed(0)
    n, T, C = 2, 4, 8
    w = torch.randn(C, generator=g)
    tprobes = {"zero": {0: (torch.zeros(C), torch.tensor(-0.5))},
               "live": {0: (w, torch.tensor(0.1))}}
    targets = {la: torch.randn(n, T, generator=g) for la in tprobes}
    for direction in (None, {"zero": {0: torch.full((C,), float("nan"))},
                             "live": {0: w / (w @ w)}}):
        hook = EditHook("projection", "binary", {"zero": "logistic", "live": "logistic"},
                        tprobes, targets, n, random=torch.tensor([False, True]), keys=[1, 2],
                        directions=direction)
        hook.step = 0
        out = torch.randn(2 * n, T, C, generator=g)
        assert hook("zero", out.clone()).equal(out)
        edited = hook("live", out.clone())
        assert torch.isfinite(edited).all() and not edited[n:].equal(out[n:])
        torch.testing.assert_close(probe_predict(edited[n], w, torch.tensor(0.1)),
                                   targets["live"][0], atol=1e-4, rtol=1e-4)
        assert np.isfinite(hook.sizes[("zero", 0)]).all() and not hook.sizes[("zero", 0)].any()


def test_an_experiment_with_no_probe_direction_is_refused(ivstore, tmp_path, capsys):
    """Where every chosen probe has weights 0 there is nothing to edit: one line, before
    anything is written. Where some have, the command says up front, in one line, which
    points it leaves unedited (found only per edit before 2026-12-07)."""
    import zarr

    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(ivstore["uri"], uri)
    run = ivstore["runs"]["salient"]
    zarr.open_array(f"{uri}/probes/{run}/trained/{LAYERS[0]}/weights", mode="r+")[...] = 0
    before = tree_digest(uri)
    argv = ["--store", uri, "--probe-run", run, "--steps", "0", "1", "--provider", "toyworld"]
    with pytest.raises(ActstoreError) as info:
        _cli([*argv, "--layers", LAYERS[0]])
    message = str(info.value)
    assert "every probe of the chosen layers (up_blocks.3.attentions.0) and steps (0, 1) " \
           "has zero weights" in message and "\n" not in message, message
    assert tree_digest(uri) == before
    capsys.readouterr()
    summary = _cli([*argv, "--layers", *LAYERS])      # the other point is edited
    assert [ln for ln in capsys.readouterr().err.splitlines() if "actstore" in ln] == [
        f"actstore intervene: note: probe run {run}: zero weights (train labels of one "
        f"class) at {LAYERS[0]} steps 0, 1: left unedited there"]
    rows = [row[arm] for row in summary["dose"] for arm in ("probe", "random")]
    assert rows and all(r["non_finite"] == 0 and r["edit"]["relative_change"] > 0
                        for r in rows), rows


def test_gradient_reduces_probe_loss_monotonically_on_average(ivstore, tiny_model):
    uri = ivstore["uri"]
    prompts, seeds, _ = _block(uri)
    curves = []
    for target, kind in (("salient", "binary"), ("depth", "continuous")):
        probes, tprobes = _probes(uri, ivstore["runs"][target])
        view = open_store(uri)   # targets: each label shifted, as an experiment does
        full = open_labels(uri, target)["full"].values[BLOCK]
        shifted = np.stack([translate(f, 14, -13, kind) for f in full])
        tok = {la: torch.from_numpy(token_targets(shifted, view[la].shape[2:4], kind,
                                                  probes[la]["solver"])) for la in LAYERS}
        hook = _hook(EditHook, "gradient", kind, probes, tprobes, tok, 4)
        generate_edited(tiny_model, prompts, seeds, GenerationConfig(steps=TINY["steps"]),
                        hook=hook)
        assert len(hook.curves) == len(LAYERS) * len(STEPS)
        curves += [c / c[0] for _, _, c in hook.curves]
        assert (hook.stats()[:, 1] < hook.stats()[:, 0]).all()   # probe error went down
    mean = np.mean(curves, axis=0)
    assert len(mean) == 129
    assert (np.diff(mean) <= 1e-9).all(), np.diff(mean).max()
    assert mean[-1] < 0.8 * mean[0]


def test_gradient_edit_matches_adam_by_hand():
    """Sanity of the optimiser wiring: 3 Adam steps written out agree with gradient_edit."""
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(2, 5, 4, generator=g), torch.randn(4, generator=g)
    b, t = torch.tensor(0.1), torch.randn(2, 5, generator=g)
    out, losses = gradient_edit(a, w, b, t, "continuous", "ridge", lr=0.01, iterations=3)
    x, m, v = a.clone(), torch.zeros_like(a), torch.zeros_like(a)
    for i in range(1, 4):
        r = x @ w + b - t
        grad = (torch.where(r.abs() <= 1, r, r.sign()) / 5)[..., None] * w
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad ** 2
        x = x - 0.01 * (m / (1 - 0.9 ** i)) / ((v / (1 - 0.999 ** i)).sqrt() + 1e-8)
    torch.testing.assert_close(out, x, atol=1e-6, rtol=1e-5)
    assert losses[0] > losses[-1]


@pytest.mark.parametrize("method", ["projection", "gradient"])
def test_identity_target_leaves_image_bitwise_unchanged(ivstore, tiny_model, method):
    uri = ivstore["uri"]
    prompts, seeds, _ = _block(uri)
    gen = GenerationConfig(steps=TINY["steps"])
    plain, acts = _capture(tiny_model, prompts, seeds, gen)
    for target, kind in (("salient", "binary"), ("depth", "continuous")):
        probes, tprobes = _probes(uri, ivstore["runs"][target])
        same = {la: {s: probe_predict(acts[(la, s)], *tprobes[la][s]) for s in STEPS}
                for la in LAYERS}
        hook = _hook(EditHook, method, kind, probes, tprobes, same, 4)
        edited = generate_edited(tiny_model, prompts, seeds, gen, hook=hook)
        assert hook.count == len(LAYERS) * len(STEPS)
        assert np.array_equal(edited, plain), (method, target)
        assert (hook.stats()[:, 1:] == 0).all()


def test_unedited_regeneration_is_the_store_final_image(ivstore, tiny_model):
    """Why 'original' = the stored final image: same block, same seeds → same bytes."""
    prompts, seeds, final = _block(ivstore["uri"])
    gen = GenerationConfig(steps=TINY["steps"])
    assert np.array_equal(generate_edited(tiny_model, prompts, seeds, gen, hook=None), final)
    probes, tprobes = _probes(ivstore["uri"], ivstore["runs"]["depth"])
    idle = {la: {} for la in LAYERS}   # hooks installed, no step planned
    hook = _hook(EditHook, "projection", "continuous", probes, idle, {}, 4)
    assert np.array_equal(generate_edited(tiny_model, prompts, seeds, gen, hook=hook), final)


# --- targets -----------------------------------------------------------------------------

def test_shift_targets_are_seeded_per_image_and_in_the_papers_range():
    hw = (64, 64)
    offs = [shift_offset("img-1", k, 0, hw=hw) for k in range(50)]
    assert offs[:5] == [shift_offset("img-1", k, 0, hw=hw) for k in range(5)]
    assert (offs[0] != shift_offset("img-2", 0, 0, hw=hw)
            or offs[1] != shift_offset("img-2", 1, 0, hw=hw))
    assert (offs[0] != shift_offset("img-1", 0, 1, hw=hw)
            or offs[1] != shift_offset("img-1", 1, 1, hw=hw))
    mags = np.abs(np.array(offs))
    lo, hi = np.floor(SHIFT_RANGE[0] * 64), np.ceil(SHIFT_RANGE[1] * 64)
    assert (mags >= lo).all() and (mags <= hi).all()
    assert {np.sign(o[0]) for o in offs} == {-1, 1} and {np.sign(o[1]) for o in offs} == {-1, 1}


def test_translate_fills_depth_with_edges_and_masks_with_background():
    depth = np.arange(36, dtype=np.float32).reshape(6, 6)
    moved = translate(depth, 2, -1, "continuous")
    assert np.array_equal(moved[2:, :5], depth[:4, 1:])
    assert np.array_equal(moved[:2, :5], np.repeat(depth[:1, 1:], 2, 0))   # top edge row
    assert np.array_equal(moved[2:, 5], depth[:4, 5])                       # right edge column
    mask = np.ones((6, 6), np.float32)
    m = translate(mask, 2, -1, "binary")
    assert m[:2].sum() == 0 and m[:, 5].sum() == 0 and m[2:, :5].all()


def test_insert_copies_object_farther_and_smaller():
    depth = np.zeros((40, 40), np.float32)
    mask = np.zeros((40, 40), bool)
    mask[10:20, 5:15] = True
    depth[mask] = 3.0
    out = insert_object_depth(depth, mask, 0, 20, push=1.0, scale=0.6)
    new = (out != depth)
    assert np.allclose(out[new], 2.0)                       # 1 unit farther (inverse depth)
    assert 0 < new.sum() < mask.sum()                       # smaller copy
    assert np.array_equal(out[mask], depth[mask])           # original untouched
    cols = np.nonzero(new)[1]
    assert cols.min() > 15 and abs(cols.mean() - 29.5) < 1.5


def test_token_targets_units():
    mask = np.zeros((1, 8, 8), np.float32)
    mask[0, :4] = 1
    logit = token_targets(mask, (2, 2), "binary", "logistic", margin=3.0)
    assert np.array_equal(logit, [[3.0, 3.0, -3.0, -3.0]])
    assert np.array_equal(token_targets(mask, (2, 2), "binary", "ridge"), [[1, 1, 0, 0]])
    depth = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    assert np.allclose(token_targets(depth, (1, 1), "continuous", "ridge"), depth.mean())
    _, offsets = make_targets(depth[0], "x", "continuous", n_targets=3, seed=0)
    assert offsets.shape == (3, 2)


def test_user_targets_npz_and_png(tmp_path):
    from PIL import Image

    ids, hw = ["a", "b"], (8, 8)
    np.savez(tmp_path / "t.npz", a=np.ones(hw), b=np.zeros((2, *hw)))
    with pytest.raises(ActstoreError, match="different numbers"):
        load_user_targets(str(tmp_path / "t.npz"), ids, hw, kind="binary", mean=None, std=None)
    np.savez(tmp_path / "t.npz", a=np.full((2, *hw), 3.0), b=np.zeros((2, *hw)))
    raw = load_user_targets(str(tmp_path / "t.npz"), ids, hw, kind="continuous", mean=1.0, std=2.0,
                            units="raw")
    assert raw.shape == (2, 2, 8, 8) and np.allclose(raw[0], 1.0) and np.allclose(raw[1], -0.5)
    folder = tmp_path / "png"
    folder.mkdir()
    for i in ids:
        img = np.zeros(hw, np.uint8)
        img[:4] = 255
        Image.fromarray(img).save(folder / f"{i}.png")
    masks = load_user_targets(str(folder), ids, hw, kind="binary", mean=None, std=None)
    assert masks.shape == (2, 1, 8, 8) and masks[:, 0, :4].all() and not masks[:, 0, 4:].any()
    with pytest.raises(ActstoreError, match="shape"):
        load_user_targets(str(folder), ids, (16, 16), kind="binary", mean=None, std=None)


def test_unreadable_user_targets_are_one_line(tmp_path):
    """Pickled objects, text, a torn file and strings: each an ActstoreError naming the
    file (were NumPy's ValueError, exit 1, whose message advises loading pickles)."""
    hw = (8, 8)
    folder = tmp_path / "objects"
    folder.mkdir()
    np.save(folder / "a.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "torn.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "text.npz", a=np.array([["w"] * 8] * 8))
    np.savez(tmp_path / "pickled.npz", a=np.array([{"x": 1}], dtype=object))
    for name, words in (("objects", "a.npy is not a NumPy file of plain arrays"),
                        ("torn.npz", "torn.npz is not a NumPy file of plain arrays"),
                        ("pickled.npz", "pickled.npz is not a NumPy file of plain arrays"),
                        ("text.npz", "image 'a' holds <U1 values")):
        with pytest.raises(ActstoreError) as info:
            load_user_targets(str(tmp_path / name), ["a"], hw, kind="continuous", mean=0.0,
                              std=1.0)
        assert words in str(info.value) and "allow_pickle" not in str(info.value), name


# --- the experiment ----------------------------------------------------------------------

def _arrays(uri, exp):
    import zarr
    group = zarr.open_group(uri, path=f"interventions/{exp}", mode="r")
    return {name: arr[...] for name, arr in group.arrays()}


def test_experiment_scores_resumes_and_records(ivstore, tiny_model, tmp_path, monkeypatch):
    import actstore.intervene.run as iv

    settings = IS(method="projection", layers=LAYERS, steps=STEPS, n_targets=2,
                  strengths=(1.0, 2.0), provider=PixelLabels())
    kw = dict(model=tiny_model, progress=False)
    whole, part = str(tmp_path / "whole.zarr"), str(tmp_path / "part.zarr")
    shutil.copytree(ivstore["uri"], whole)
    shutil.copytree(ivstore["uri"], part)
    run = ivstore["runs"]["salient"]
    ref = run_interventions(whole, run, settings, **kw)
    assert ref["complete"] and ref["blocks_written"] == 2 and ref["interventions"] == 12
    assert ref["metric"] == "dice" and ref["probe_run"] == run
    one = ref["dose"][0]
    assert [r["strength"] for r in ref["dose"]] == [1.0, 2.0]
    assert one["probe"]["edit"]["probe_error_after"] < 1e-4 < one["probe"]["edit"]["probe_error_before"]
    # the random arm moves the activation as far, token by token, but not the probe
    assert np.isclose(one["random"]["edit"]["token_relative_change"],
                      one["probe"]["edit"]["token_relative_change"], rtol=0.2)
    assert one["random"]["edit"]["probe_error_after"] > 10 * one["probe"]["edit"]["probe_error_after"]

    real, calls = iv._run_block, []

    def dies_on_second_block(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(iv, "_run_block", dies_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        run_interventions(part, run, settings, **kw)
    assert ref["experiment_id"] not in list_interventions(part)     # not complete yet
    monkeypatch.setattr(iv, "_run_block", real)
    again = run_interventions(part, run, settings, **kw)
    assert again["experiment_id"] == ref["experiment_id"]
    assert again["blocks_written"] == 1 and again["blocks_skipped"] == 1
    a, b = _arrays(whole, ref["experiment_id"]), _arrays(part, ref["experiment_id"])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    ds = open_intervention(whole, ref["experiment_id"])
    assert list(ds["image"].values) == [f"demo-0{i}" for i in range(10, 16)]
    assert list(ds["arm"].values) == ["probe", "random"]
    assert ds["output"].dtype == np.uint8 and ds["output"].shape == (6, 2, 2, 2, 64, 64, 3)
    assert ds["edit_size"].shape == (6, 2, 2, 2, len(LAYERS), len(STEPS), 3)
    target = ds["target"].values.reshape(12, -1) > 0.5
    pre = dice(np.repeat(ds["original_label"].values[:, None], 2, 1).reshape(12, -1) > 0.5,
               target)
    assert np.allclose(ds["score_pre"].values.ravel(), pre)
    assert np.isclose(ref["pre"]["median"], np.median(pre))
    for s in range(2):
        for arm in ("probe", "random"):
            new = ds["new_label"].isel(strength=s).sel(arm=arm).values.reshape(12, -1) > 0.5
            post = dice(new, target)
            assert np.allclose(ds["score_post"].isel(strength=s).sel(arm=arm).values.ravel(),
                               post)
            swapped = dice(new, ds["target"].values[:, ::-1].reshape(12, -1) > 0.5)  # K = 2
            assert np.allclose(ds["score_other"].isel(strength=s).sel(arm=arm).values.ravel(),
                               swapped)
            row = ref["dose"][s][arm]
            assert np.isclose(row["post"]["median"], np.median(post))
            assert np.isclose(row["specific"]["share"], np.mean(post > swapped))
            assert np.isclose(row["improved"]["share"], np.mean(post > pre))
        rnd = dice(ds["new_label"].isel(strength=s).sel(arm="random").values.reshape(12, -1)
                   > 0.5, target)
        probe = ds["score_post"].isel(strength=s).sel(arm="probe").values.ravel()
        assert np.isclose(ref["dose"][s]["probe"]["beats_random"]["share"],
                          np.mean(probe > rnd))
    view = open_store(whole)
    stored = view.final_images.sel(image=ds["image"].values).values
    assert np.array_equal(ds["original_label"].values,
                          PixelLabels()(stored)["salient"])
    offs = np.abs(ds["offset"].values)
    assert (offs >= 11).all() and (offs <= 15).all()
    summary = list_interventions(whole)[ref["experiment_id"]]
    assert summary["probe_run"] == run and summary["method"] == "projection"
    again = run_interventions(whole, run, settings, **kw)
    assert again["blocks_written"] == 0


def test_depth_gradient_experiment_and_figure(ivstore, tiny_model, tmp_path):
    from actstore.plots.interventions import intervention_grid

    uri = str(tmp_path / "d.zarr")
    shutil.copytree(ivstore["uri"], uri)
    out = run_interventions(uri, ivstore["runs"]["depth"],
                            IS(method="gradient", layers=LAYERS, steps=[0],
                               images=["demo-012", "demo-013"], n_targets=1,
                               provider=PixelLabels(), iterations=16, random_control=False),
                            model=tiny_model, progress=False)
    assert out["metric"] == "rmse" and out["interventions"] == 2
    ds = open_intervention(uri, out["experiment_id"])
    assert np.allclose(ds["score_post"].values.ravel(), rmse(
        ds["new_label"].values.reshape(2, -1), ds["target"].values.reshape(2, -1)))
    png = intervention_grid(uri, out["experiment_id"], str(tmp_path / "g.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# --- bad input ---------------------------------------------------------------------------

def _cli(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-prefect", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    add_intervene_parser(parser.add_subparsers(dest="command"))
    return intervene_command(parser.parse_args(["--no-prefect", "--quiet", "intervene", *argv]), None)


@pytest.mark.parametrize("extra,words", [
    (["--probe-run", "salient-19990101T000000"], "no probe run"),
    (["--layers", "up_blocks.1.attentions.0"], "has no probe for layer"),
    (["--layers", "up_blocks.9.attentions.0"], "the store has no such capture point"),
    (["--strength", "1", "-1"], "must be >= 0"),     # argparse's check
    (["--strength", "2", "2"], "strength 2 is named twice"),
    (["--steps", "3"], "has no probe for step 3"),
    (["--steps", "99"], "step 99"),
    (["--images", "demo-999"], "not in store"),
    (["--images", "0:99"], "out of range; the store has"),
    (["--targets", "WRONG_SHAPE"], "shape"),
    (["--target", "depth"], "probes 'salient'"),
    (["--method", "telepathy"], "invalid choice"),
    (["--experiment", "../up"], "--experiment"),
    ([], "looks labels up by image id"),
])
def test_bad_input_one_line_error_store_unchanged(ivstore, tmp_path, capsys, extra, words):
    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(ivstore["uri"], uri)
    ids = open_store(uri).images["image"].values
    np.savez(tmp_path / "labels.npz", image_id=ids.astype(str),
             salient=np.zeros((len(ids), 64, 64), np.float32))
    np.savez(tmp_path / "bad.npz", **{i: np.zeros((32, 32)) for i in ids})
    extra = [str(tmp_path / "bad.npz") if e == "WRONG_SHAPE" else e for e in extra]
    argv = ["--store", uri, "--probe-run", ivstore["runs"]["salient"],
            "--layers", *LAYERS, "--steps", "0", "1",
            "--provider", f"array:{tmp_path / 'labels.npz'}"]
    if words != "looks labels up by image id":
        argv[-1] = "toyworld:/nonexistent"   # only reached if everything else passes
    before = tree_digest(uri)
    if words in ("invalid choice", "must be >= 0"):
        with pytest.raises(SystemExit):
            _cli(argv + extra)
        assert words in capsys.readouterr().err
    else:
        with pytest.raises(ActstoreError) as info:
            _cli(argv + extra)
        message = str(info.value)
        assert words in message and "\n" not in message, message
    assert tree_digest(uri) == before


def test_unreadable_provider_output_refused_before_writing(ivstore, tiny_model, tmp_path):
    class HalfSize(PixelLabels):
        def __call__(self, images):
            return {k: v[:, ::2, ::2] for k, v in super().__call__(images).items()}

    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(ivstore["uri"], uri)
    before = tree_digest(uri)
    with pytest.raises(ActstoreError, match=r"shape \(1, 32, 32\)"):
        run_interventions(uri, ivstore["runs"]["depth"],
                          IS(layers=LAYERS, steps=STEPS, provider=HalfSize()),
                          model=tiny_model, progress=False)
    assert tree_digest(uri) == before


def test_flow_runs_experiment(prefect_harness, ivstore, tmp_path):
    from flows.intervene import intervene_flow

    uri = str(tmp_path / "f.zarr")
    shutil.copytree(ivstore["uri"], uri)
    mask = np.zeros((64, 64), np.float32)
    mask[20:40, 8:30] = 1
    np.savez(tmp_path / "t.npz", **{"demo-015": mask})
    png = str(tmp_path / "grid.png")
    settings = IS(layers=LAYERS, steps=STEPS, images=["demo-015"],
                  targets=str(tmp_path / "t.npz"), provider=PixelLabels(), device="cpu")
    out = intervene_flow(store=uri, probe_run=ivstore["runs"]["salient"], settings=settings,
                         figure=png)
    assert out["complete"] and out["interventions"] == 1 and out["figure"] == png
    ds = open_intervention(uri, out["experiment_id"])
    assert np.array_equal(ds["target"].values[0, 0], mask)
    assert (ds["offset"].values == 0).all()
