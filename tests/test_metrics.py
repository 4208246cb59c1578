"""Metrics against scipy/sklearn oracles on random data, image by image."""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, mean_squared_error

from actstore.errors import ActstoreError
from actstore.metrics import dice, pearson, pool, rmse, spearman, summarize, upsample

rng = np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """One BLAS thread: on a shared 2-core box OpenBLAS threads spin against the
    background jobs and run these tiny products ~50x slower."""
    with threadpool_limits(1):
        yield


def test_dice_matches_f1_including_empty_masks():
    t = rng.random((6, 16, 16)) > 0.6
    p = rng.random((6, 16, 16)) > 0.5
    t[3] = False                     # label empty, prediction not -> 0
    p[4] = False                     # prediction empty, label not -> 0
    t[5] = p[5] = False              # both empty -> 1 by convention
    want = [f1_score(t[i].ravel(), p[i].ravel(), zero_division=1.0) for i in range(6)]
    got = dice(p, t)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[3] == 0 and got[4] == 0 and got[5] == 1


def test_rmse_matches_sklearn_and_accepts_fp16():
    p, t = rng.normal(size=(5, 8, 8)), rng.normal(size=(5, 8, 8))
    want = [np.sqrt(mean_squared_error(t[i].ravel(), p[i].ravel())) for i in range(5)]
    np.testing.assert_allclose(rmse(p, t), want, rtol=1e-12)
    p16 = p.astype(np.float16)
    np.testing.assert_allclose(rmse(p16, t), rmse(p16.astype(np.float64), t), rtol=0)


def test_correlations_match_scipy_with_ties():
    p = rng.normal(size=(5, 8, 8))
    t = p + rng.normal(size=p.shape)
    t[:, :2] = np.round(t[:, :2])    # ties for the rank correlation
    np.testing.assert_allclose(pearson(p, t), [pearsonr(p[i].ravel(), t[i].ravel())[0]
                                               for i in range(5)], rtol=1e-10)
    np.testing.assert_allclose(spearman(p, t), [spearmanr(p[i].ravel(), t[i].ravel())[0]
                                                for i in range(5)], rtol=1e-10)


def test_constant_image_is_nan_and_summarize_skips_it():
    p, t = rng.normal(size=(3, 4, 4)), rng.normal(size=(3, 4, 4))
    p[1] = 2.0
    r = pearson(p, t)
    assert np.isnan(r[1]) and np.isfinite(r[[0, 2]]).all()
    s = summarize(r)
    assert s["n"] == 2 and s["n_undefined"] == 1
    assert s["mean"] == pytest.approx(np.mean(r[[0, 2]]))
    assert summarize([1.0, 2.0, 10.0]) == {"mean": 13 / 3, "median": 2.0, "n": 3,
                                           "n_undefined": 0}


def test_upsample_is_torch_bilinear_and_preserves_constants():
    x = rng.normal(size=(2, 8, 8)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=(64, 64),
                                           mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(upsample(x, 64), want.numpy(), rtol=1e-6)
    assert upsample(np.full((1, 4, 4), 3.0), (16, 32)).shape == (1, 16, 32)
    np.testing.assert_allclose(upsample(np.full((1, 4, 4), 3.0), 16), 3.0)


def test_pool_is_block_mean_and_binary_fraction():
    lab = rng.random((2, 32, 32)) > 0.5
    got = pool(lab, 8)
    want = lab.reshape(2, 8, 4, 8, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(got, want)
    assert got.min() >= 0 and got.max() <= 1
    y = rng.normal(size=(1, 16, 16))
    assert pool(y, 4).mean() == pytest.approx(y.mean())       # area average keeps the mean
    with pytest.raises(ActstoreError):
        pool(y, 5)


def test_shape_mismatch_is_a_user_error():
    with pytest.raises(ActstoreError):
        rmse(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


def test_rank_matches_scipy_rankdata_with_heavy_ties():
    from scipy.stats import rankdata

    from actstore.metrics import rank

    a = rng.integers(0, 5, size=(7, 3, 50)).astype(np.float32)   # many ties per row
    a[0, 0] = 1.0                                                 # one all-tied row
    b = rng.normal(size=(4, 33))
    for x in (a, b, b.astype(np.float16)):
        np.testing.assert_array_equal(rank(x), rankdata(x, axis=-1))


def test_step_correlations_equal_per_image_pearson():
    from actstore.metrics import step_correlations

    p, t = rng.normal(size=(3, 4, 20)), rng.normal(size=(3, 20))
    p[1, 2] = 1.0                              # a constant prediction: NaN, as pearson
    expected = pearson(p.reshape(12, 20), np.repeat(t, 4, axis=0)).reshape(3, 4)
    np.testing.assert_allclose(step_correlations(p, t), expected, rtol=1e-12)
    assert np.isnan(step_correlations(p, t)[1, 2])
