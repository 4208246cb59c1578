"""The token sample that stands in for a layer's train tokens in logistic fits, against
sklearn fitted on every token."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from actstore.probe import sampling
from actstore.probe.logistic import (LOGISTIC_LAMBDAS, PATH_TOL, fit_logistic, fit_logistic_cv,
                                     lambda_window)
from actstore.probe.solvers import fit_ridge_cv
from actstore.probe.stats import image_stats


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def cells(seed, n_img, tok=48, c=8, steps=2, rare=0.85):
    """Two steps of tokens with a planted logistic signal and a rare positive class."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(steps, n_img, tok, c)) * rng.uniform(0.5, 2.0, c) + rng.normal(size=c)
    w = rng.normal(size=c)
    logit = X[0] @ w
    p = 1 / (1 + np.exp(-(logit - np.quantile(logit, rare))))
    y = (rng.random(p.shape) < p).astype(np.float64)
    return X.astype(np.float16), y


def test_class_rates():
    y = np.r_[np.zeros(900), np.ones(100)]
    r = sampling.class_rates(y, 400)        # 100 positives < 200: all kept, 300 negatives
    np.testing.assert_allclose(r, [300 / 900, 1.0])
    np.testing.assert_allclose(sampling.class_rates(y, 100), [50 / 900, 50 / 100])
    np.testing.assert_allclose(sampling.class_rates(y, 5000), [1.0, 1.0])
    np.testing.assert_allclose(sampling.class_rates(np.zeros(10), 4), [0.4, 0.0])


def test_sample_is_the_same_however_blocks_are_cut():
    X, y = cells(0, 12)
    steps, n_img, tok, c = X.shape
    rates = sampling.class_rates(y, 200)

    def block(a, b):
        x = X[:, a:b].reshape(steps, -1, c)
        return sampling.draw(x, y[a:b].ravel(), np.repeat(np.arange(a, b), tok),
                             np.tile(np.arange(tok), b - a), rates)
    whole = block(0, n_img)
    parts = sum(block(a, a + 3) for a in range(0, n_img, 3))
    for f in ("x", "y", "image", "weight"):
        np.testing.assert_array_equal(getattr(whole, f), getattr(parts, f))
    # about the budget, half per class; weights give back each class's count
    assert 150 < len(whole.y) < 250
    assert abs(whole.y.mean() - 0.5) < 0.15
    for cls in (0, 1):
        kept = whole.weight[whole.y == cls].sum()
        assert abs(kept - (y == cls).sum()) < 0.25 * (y == cls).sum()
    one = whole.step(1)
    np.testing.assert_array_equal(one.x[0], whole.x[1])


def _quality(w, b, X, y, n_img):
    z = X.astype(np.float64) @ w + b
    logloss = np.mean(np.logaddexp(0, z) - y * z)
    p, t = (z > 0).reshape(n_img, -1), (y > 0.5).reshape(n_img, -1)
    tot = p.sum(1) + t.sum(1)
    dice = np.where(tot == 0, 1.0, 2 * (p & t).sum(1) / np.maximum(tot, 1)).mean()
    return logloss, dice


def test_weighted_sample_fit_is_as_good_as_sklearn_on_every_token():
    """A quarter of the train tokens, class-balanced and weighted, λ searched in the window
    the ridge CV places (as the grid fits), scores on held-out images as well as sklearn's
    logistic regression fitted on all of them at the grid's best λ *for the test set* (an
    oracle that peeks), and as our own full-grid CV on all tokens."""
    X, y = cells(1, 400, rare=0.9)
    tr, te = slice(0, 200), slice(200, None)
    c = X.shape[-1]
    Xtr, ytr = X[0, tr].reshape(-1, c), y[tr].ravel()
    Xte, yte = X[0, te].reshape(-1, c), y[te].ravel()
    image = np.repeat(np.arange(200), X.shape[2])
    position = np.tile(np.arange(X.shape[2]), 200)
    stats = image_stats(image, Xtr, ytr)
    rates = sampling.class_rates(ytr, len(ytr) // 4)
    s = sampling.draw(Xtr[None], ytr, image, position, rates)
    assert len(s.y) < 0.3 * len(ytr)
    keep = lambda_window(float(fit_ridge_cv(stats).lam), ytr.mean())
    assert 2 <= keep.sum() < len(keep)
    ours = fit_logistic_cv(s.x[0], s.y, s.image, lambdas=LOGISTIC_LAMBDAS[keep], tol=PATH_TOL,
                           fold_stats=stats, weight=s.weight)
    got = _quality(ours.weights, ours.bias, Xte, yte, 200)
    scale = np.trace(np.cov(Xtr.T.astype(np.float64), bias=True)) * len(Xtr) / c
    oracle = min((_quality(m.coef_[0], m.intercept_[0], Xte, yte, 200) for m in (
        LogisticRegression(C=1 / (lam * scale), tol=1e-10, max_iter=10000).fit(
            Xtr.astype(np.float64), ytr) for lam in LOGISTIC_LAMBDAS)), key=lambda q: q[0])
    full = fit_logistic_cv(Xtr, ytr, image, fold_stats=stats)
    best = _quality(full.weights, full.bias, Xte, yte, 200)
    assert got[0] < 1.01 * oracle[0] and got[0] < 1.01 * best[0], (got, oracle, best)
    assert got[1] > oracle[1] - 0.01 and got[1] > best[1] - 0.01, (got, oracle, best)
    # and unweighted, the class-balanced sample would shift the logits: the weights matter
    raw = fit_logistic_cv(s.x[0], s.y, s.image)
    assert _quality(raw.weights, raw.bias, Xte, yte, 200)[0] > 1.05 * oracle[0]


def test_lambda_window():
    grid = np.logspace(-6, 0, 7)
    np.testing.assert_array_equal(lambda_window(1e-3, 0.5, grid),      # centre 2.5e-4
                                  (grid >= 2.5e-4 / 30) & (grid <= 2.5e-4 * 300))
    assert lambda_window(1e-3, 0.5, grid).sum() == 4              # 1e-5 ... 1e-2
    assert lambda_window(1e3, 0.5, grid).tolist() == [False] * 6 + [True]   # nearest point
    assert lambda_window(1e-12, 0.1, grid).tolist() == [True] + [False] * 6


def test_weights_match_sklearn_sample_weight():
    X, y = cells(2, 60)
    Xf, yf = X[0].reshape(-1, X.shape[-1]), y.ravel()
    wt = np.random.default_rng(0).uniform(0.5, 4.0, len(yf))
    fit = fit_logistic(Xf, yf, 1e-3, weight=wt)
    ref = LogisticRegression(C=1 / float(fit.alpha), tol=1e-10, max_iter=10000).fit(
        Xf.astype(np.float64), yf, sample_weight=wt)
    np.testing.assert_allclose(fit.weights, ref.coef_[0], rtol=1e-4,
                               atol=1e-4 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(fit.bias, ref.intercept_[0], rtol=1e-4, atol=1e-4)
    # integer weights are repeated tokens
    k = np.random.default_rng(1).integers(1, 4, len(yf))
    rep = fit_logistic(np.repeat(Xf, k, axis=0), np.repeat(yf, k), 1e-3)
    cnt = fit_logistic(Xf, yf, 1e-3, weight=k.astype(float))
    np.testing.assert_allclose(cnt.weights, rep.weights, rtol=1e-5, atol=1e-6)
