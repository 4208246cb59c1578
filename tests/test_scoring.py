"""Per-image scores of the score pass against scipy/sklearn and a plain per-image loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score

from actstore.probe.scoring import bilinear_matrix, block_scores, metric_names


def _up(p: np.ndarray, size) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(p, np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear",
                                           align_corners=False)[0, 0].numpy()


@pytest.mark.parametrize("h,w,H,W", [(8, 8, 64, 64), (4, 2, 32, 16), (2, 2, 64, 64)])
def test_bilinear_matrix_is_torch_upsampling(h, w, H, W):
    p = np.random.default_rng(0).normal(size=(h, w))
    ours = bilinear_matrix(h, H) @ p @ bilinear_matrix(w, W).T
    np.testing.assert_allclose(ours, _up(p, (H, W)), atol=1e-5)


def _brute(pred, tokens, full, binary):
    n, s = pred.shape[:2]
    names = metric_names(binary, label_spearman=True)
    out = np.full((len(names), n, s), np.nan)
    for i in range(n):
        for k in range(s):
            # the upsampling of a constant is that constant (torch's float32 one may differ
            # by rounding, whose correlation means nothing)
            const = np.ptp(pred[i, k]) == 0
            for level, p, t in (("token", pred[i, k], tokens[i]),
                                ("label", _up(pred[i, k], full.shape[1:]), full[i])):
                p, t = p.ravel().astype(np.float64), t.ravel().astype(np.float64)
                if binary:
                    out[names.index(f"dice_{level}"), i, k] = f1_score(
                        t > 0.5, p > 0, zero_division=1.0)
                    continue
                out[names.index(f"rmse_{level}"), i, k] = np.sqrt(np.mean((p - t) ** 2))
                if not const and np.ptp(t) > 0:
                    out[names.index(f"pearson_{level}"), i, k] = pearsonr(p, t)[0]
                    out[names.index(f"spearman_{level}"), i, k] = spearmanr(p, t)[0]
    return out


@pytest.mark.parametrize("binary", [False, True])
def test_block_scores_match_scipy_and_sklearn(binary):
    rng = np.random.default_rng(1)
    n, s, h, w, H, W = 3, 4, 8, 8, 64, 64
    full = np.kron(rng.normal(size=(n, h, w)), np.ones((H // h, W // w))) + \
        0.3 * rng.normal(size=(n, H, W))
    tokens = full.reshape(n, h, H // h, w, W // w).mean(axis=(2, 4))
    pred = tokens[:, None] + 0.5 * rng.normal(size=(n, s, h, w)) + 0.2
    pred[0, 1] = 0.7           # a constant prediction: no correlation
    full[2] = 1.5              # a constant label: no correlation
    tokens[2] = 1.5
    if binary:
        full, tokens = (full > 0.3).astype(np.float32), (tokens > 0.3).astype(np.float32)
        full[1] = 0.0          # no salient pixel: both empty scores 1, else 0
        tokens[1] = 0.0
        pred[1, 0] = -1.0
    ours = block_scores(pred, tokens.astype(np.float32), full.astype(np.float32), binary,
                        label_spearman=True)
    ref = _brute(pred, tokens, full, binary)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours, ref, atol=2e-6, equal_nan=True)


def test_label_spearman_only_on_request():
    rng = np.random.default_rng(2)
    pred, tokens, full = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 4, 4)), \
        rng.normal(size=(2, 16, 16))
    full_set = block_scores(pred, tokens, full, False, label_spearman=True)
    default = block_scores(pred, tokens, full, False)
    assert metric_names(False) == [m for m in metric_names(False, True) if m != "spearman_label"]
    np.testing.assert_array_equal(default, full_set[:5])


@pytest.mark.parametrize("binary", [False, True])
def test_label_side_of_a_block_serves_every_grid_and_row(binary):
    """The per-run label summary (every token grid at once, made for a whole block, then
    rows taken) scores exactly as the labels themselves do."""
    from actstore.probe.scoring import LabelSide, label_side
    rng = np.random.default_rng(3)
    full = rng.normal(size=(5, 32, 32)).astype(np.float32)
    full[3] = 0.25                                         # constant: no correlation
    if binary:
        full = (full > 0.2).astype(np.float32)
    side = label_side(full, [(8, 8), (4, 2), (16, 16)], binary)
    rows = np.array([True, False, True, True, False])
    for h, w in [(8, 8), (4, 2), (16, 16)]:
        pred = rng.normal(size=(3, 2, h, w))
        tokens = rng.normal(size=(3, h, w)).astype(np.float32)
        want = block_scores(pred, tokens, full[rows], binary)
        got = block_scores(pred, tokens, side[rows], binary)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(got, want)
    if not binary:
        with pytest.raises(ValueError, match="Spearman"):
            block_scores(pred, tokens, side[rows], False, label_spearman=True)
    # a span of blocks (one score task) joins the blocks' summaries: as if made at once
    joined = LabelSide.concat([label_side(full[:2], [(8, 8), (4, 2)], binary),
                               label_side(full[2:], [(8, 8), (4, 2)], binary)])
    whole = label_side(full, [(8, 8), (4, 2)], binary)
    for name in ("mean", "stt", "constant", "bits"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(whole, name))
    for g in whole.proj:
        np.testing.assert_array_equal(joined.proj[g], whole.proj[g])
