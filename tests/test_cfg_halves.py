"""Editing both halves of the guidance batch (``--halves both``): the unconditional half is
edited by the same rule from its own activations, the conditional half exactly as before,
the random control at each half's own norms; ``cond`` (the default) leaves the
unconditional half and every id as they were."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from actstore.errors import ActstoreError
from actstore.generation.sampling import GenerationConfig
from actstore.intervene.edits import (EditHook, direction_key, generate_edited, probe_predict,
                                      torch_probes)
from actstore.intervene.results import existing_settings, open_intervention
from actstore.intervene.plan import plan_interventions
from actstore.intervene.run import run_interventions
from actstore.intervene.settings import InterventionSettings as IS
from actstore.intervene.sweeprecords import settings_json
from actstore.intervene.tables import format_interventions
from actstore.probe.runs import load_probe
from actstore.store.view import open_store
from conftest import IV_LAYERS, IV_STEPS, TINY, iv_cli, small_experiment
from flows.cli_intervene import sweep_settings

ROWS = 3   # a probe row at strength 2, its random control, a strength-0 row


def _edit(halves: str, out: torch.Tensor, w, b, t) -> tuple[torch.Tensor, EditHook]:
    hook = EditHook("projection", "continuous", {"L": "ridge"}, {"L": {0: (w, b)}},
                    {"L": t}, ROWS, strengths=torch.tensor([2.0, 2.0, 0.0]),
                    random=torch.tensor([False, True, False]),
                    keys=[direction_key("img", 0, 0)] * ROWS, halves=halves)
    hook.step = 0
    return hook("L", out), hook


def test_both_edits_the_unconditional_half_by_its_own_reading_cond_leaves_it():
    g = torch.Generator().manual_seed(5)
    T, C = 30, 12
    u = torch.randn(1, T, C, generator=g).repeat(ROWS, 1, 1)
    c = u + 0.7 * torch.randn(1, T, C, generator=g).repeat(ROWS, 1, 1)   # another reading
    out = torch.cat([u, c])                                   # CFG batch: [uncond, cond]
    w, b = torch.randn(C, generator=g), torch.tensor(0.3)
    t = torch.randn(1, T, generator=g).repeat(ROWS, 1) * 3
    cond, hc = _edit("cond", out, w, b, t)
    both, hb = _edit("both", out, w, b, t)
    assert torch.equal(cond[:ROWS], u)                        # cond: uncond half untouched
    assert torch.equal(both[ROWS:], cond[ROWS:])              # the cond half's edit is the same
    assert np.array_equal(hb.stats(), hc.stats())             # stats: of the cond half
    assert torch.equal(both[2], u[2]) and torch.equal(both[ROWS + 2], c[2])   # strength 0
    # the unconditional half reads its own z + s(t - z), moved along w only
    zu = probe_predict(u[0], w, b)
    torch.testing.assert_close(probe_predict(both[0], w, b), zu + 2 * (t[0] - zu),
                               rtol=1e-5, atol=1e-4)
    d_probe = both[0] - u[0]
    w_hat = w / w.norm()
    torch.testing.assert_close(d_probe, (d_probe @ w_hat)[:, None] * w_hat, rtol=0, atol=1e-5)
    # the random row: each half at its own probe edit's norms, one direction in both
    d_rand, d_rand_c = both[1] - u[1], both[ROWS + 1] - c[1]
    torch.testing.assert_close(d_rand.norm(dim=-1), d_probe.norm(dim=-1), rtol=1e-5, atol=1e-6)
    cos = (d_rand * d_rand_c).sum(-1) / (d_rand.norm(dim=-1) * d_rand_c.norm(dim=-1))
    torch.testing.assert_close(cos.abs(), torch.ones(T), rtol=0, atol=1e-5)
    assert float((probe_predict(both[1], w, b) - zu).abs().mean()) < \
        0.5 * float((probe_predict(both[0], w, b) - zu).abs().mean())


class Watch:
    """Wraps an edit hook in generation and keeps, per (layer, step), whether the
    unconditional half it handed back differs from the one it got."""

    def __init__(self, hook: EditHook):
        self.hook, self.changed = hook, {}
        self.layers = hook.layers

    @property
    def step(self):
        return self.hook.step

    @step.setter
    def step(self, i):
        self.hook.step = i

    def __call__(self, layer, out):
        new = self.hook(layer, out)
        if new is not None:
            n = self.hook.n_images
            self.changed[(layer, self.step)] = not torch.equal(new[:n], out[:n])
        return new


def test_in_generation_both_changes_the_unconditional_half_and_cond_does_not(ivstore,
                                                                            tiny_model):
    uri = ivstore["uri"]
    view = open_store(uri)
    table = view.images.isel(image=slice(12, 14))
    prompts, seeds = [str(p) for p in table["prompt"].values], [int(s) for s in
                                                                 table["seed"].values]
    tprobes = torch_probes({la: load_probe(uri, ivstore["runs"]["depth"], la)
                            for la in IV_LAYERS}, IV_STEPS, torch.device("cpu"))
    rng = np.random.default_rng(1)
    targets = {la: torch.from_numpy(rng.normal(size=(2, int(np.prod(view[la].shape[2:4]))))
                                    .astype(np.float32) * 5) for la in IV_LAYERS}
    gen = GenerationConfig(steps=TINY["steps"])
    images, seen = {}, {}
    for halves in ("cond", "both"):
        watch = Watch(EditHook("projection", "continuous", {la: "ridge" for la in IV_LAYERS},
                               tprobes, targets, 2, halves=halves))
        images[halves] = generate_edited(tiny_model, prompts, seeds, gen, hook=watch)
        seen[halves] = watch.changed
    planned = {(la, s) for la in IV_LAYERS for s in IV_STEPS}
    assert set(seen["cond"]) == set(seen["both"]) == planned
    assert not any(seen["cond"].values()) and all(seen["both"].values())
    assert not np.array_equal(images["cond"], images["both"])


def test_both_is_recorded_and_named_cond_keeps_ids(ivstore, tiny_model, tmp_path):
    uri, run, base = small_experiment(ivstore, tmp_path)
    default = plan_interventions(uri, run, base)
    assert plan_interventions(uri, run, base.with_(halves="cond")).experiment_id == \
        default.experiment_id and "halves" not in default.record
    kw = dict(model=tiny_model, progress=False)
    out = run_interventions(uri, run, base.with_(halves="both"), **kw)
    assert out["complete"] and out["halves"] == "both"
    cond = run_interventions(uri, run, base, **kw)     # the same edit, one half: other images
    both_images, cond_images = (open_intervention(uri, r["experiment_id"])["output"].values
                                for r in (out, cond))
    assert not np.array_equal(both_images, cond_images)
    assert out["experiment_id"].startswith("depth-projection-both-halves-")
    assert existing_settings(uri, out["experiment_id"])["halves"] == "both"
    assert "on both CFG halves" in format_interventions(out).splitlines()[0]
    edit, rnd = out["dose"][0]["probe"]["edit"], out["dose"][0]["random"]["edit"]
    assert edit["probe_error_after"] < 1e-3 < edit["probe_error_before"]
    assert np.isclose(rnd["token_relative_change"], edit["token_relative_change"], rtol=0.05)
    # sweeps: recorded only when both, so default sweeps keep their ids
    common = ["sweep", "--store", "s.zarr", "--probe-run", "r"]
    plain = settings_json(sweep_settings(iv_cli(common)))
    assert "halves" not in plain["base"]
    assert settings_json(sweep_settings(iv_cli(common + ["--halves", "cond"]))) == plain
    assert settings_json(sweep_settings(iv_cli(common + ["--halves", "both"])))["base"][
        "halves"] == "both"


def test_unknown_halves_is_refused_in_one_line():
    with pytest.raises(ActstoreError) as info:
        IS(halves="uncond")
    assert "--halves 'uncond'" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SystemExit):
        iv_cli(["intervene", "--store", "s.zarr", "--probe-run", "r", "--halves", "uncond"])
