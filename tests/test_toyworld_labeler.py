"""The committed toy label model agrees with exact render labels on fixed held-out scenes
(tolerances are loose bounds under the accuracy reported in models/toy-labeler/README.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from actstore.toyworld.labeler import ToyLabeler
from actstore.toyworld.labeler_train import EVAL_SEED_OFFSET
from actstore.toyworld.render import render_batch

LABELER = Path(__file__).resolve().parents[1] / "models" / "toy-labeler"
SEEDS = range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + 8)

MIN_DICE = 0.75
MIN_DEPTH_SPEARMAN = 0.85
MAX_DEPTH_RMSE = 0.12
MIN_SHADING_PEARSON = 0.8


@pytest.fixture(scope="module")
def preds():
    if not (LABELER / "model.safetensors").exists():
        pytest.skip("toy label model not trained yet")
    lab = ToyLabeler.from_pretrained(LABELER)
    b = render_batch(SEEDS)
    return b, lab(b["rgb"]), lab


def test_interface(preds):
    b, p, lab = preds
    assert lab.name == "toyworld"
    assert lab.targets == {"depth": "continuous", "salient": "binary", "shading": "continuous"}
    for k in lab.targets:
        assert p[k].shape == (8, 64, 64) and p[k].dtype == np.float32
    assert set(np.unique(p["salient"])) <= {0.0, 1.0}
    big = lab(np.repeat(np.repeat(b["rgb"][:2], 2, 1), 2, 2))  # other sizes are resized
    assert big["depth"].shape == (2, 128, 128)


def test_accuracy_on_fixed_renders(preds):
    b, p, _ = preds
    m_t, m_p = b["salient"], p["salient"] > 0.5
    dice = 2 * (m_t & m_p).sum() / (m_t.sum() + m_p.sum())
    assert dice >= MIN_DICE
    rmse = np.sqrt(((p["depth"] - b["inv_depth"]) ** 2).mean())
    assert rmse <= MAX_DEPTH_RMSE
    rho = np.mean([spearmanr(p["depth"][i].ravel(), b["inv_depth"][i].ravel())[0]
                   for i in range(len(SEEDS))])
    assert rho >= MIN_DEPTH_SPEARMAN
    r = np.corrcoef(p["shading"].ravel(), b["shading"].ravel())[0, 1]
    assert r >= MIN_SHADING_PEARSON


def test_fine_tune_starts_from_the_given_model(tmp_path):
    """``labeler_train --init-from``: with a vanishing learning rate the fine-tuned weights
    stay the starting model's; from scratch they are a fresh initialisation."""
    import torch

    from actstore.toyworld.labeler_train import train_labeler

    if not (LABELER / "model.safetensors").exists():
        pytest.skip("toy label model not trained yet")
    start = ToyLabeler.from_pretrained(LABELER).net.state_dict()
    kw = dict(n_train=4, steps=2, batch=2, lr=1e-12, camera="varied")
    tuned = train_labeler(tmp_path / "ft", init_from=LABELER, **kw)
    scratch = train_labeler(tmp_path / "new", **kw)
    w = "head.weight"
    torch.testing.assert_close(tuned.net.state_dict()[w], start[w], rtol=0, atol=1e-6)
    assert not torch.allclose(scratch.net.state_dict()[w], start[w], atol=1e-3)
    assert tuned.config["train"]["init_from"] == str(LABELER)
    assert tuned.config["train"]["camera"] == "varied"
