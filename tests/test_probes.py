"""Closed-form probes against sklearn fitted on the same materialised arrays."""

import warnings
from dataclasses import replace

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from threadpoolctl import threadpool_limits

from actstore.probe import shifted
from actstore.probe import solvers as probes
from actstore.probe import stats, upcast
from actstore.errors import ActstoreError
from actstore.probe import logistic as lg
from actstore.probe.logistic import fit_logistic, fit_logistic_cv
from actstore.probe.solvers import fit_ridge, fit_ridge_cv, predict
from actstore.probe.stats import FoldStats, accumulate, fold_of, image_stats

N_IMG, TOK, C = 40, 32, 12


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """One BLAS thread: on a shared 2-core box OpenBLAS threads spin against the
    background jobs and run these tiny products ~50x slower."""
    with threadpool_limits(1):
        yield


def make_cells(seed=0, n_img=N_IMG, tok=TOK, c=C, noise=1.0, steps=()):
    """Activations with per-image offsets, uneven channel scales and large channel means
    (as real attention outputs have), and a planted linear target."""
    rng = np.random.default_rng(seed)
    shape = steps + (n_img, tok, c)
    X = rng.normal(size=shape) * rng.uniform(0.3, 3.0, c) + rng.normal(size=c) * 4
    X += rng.normal(size=steps + (n_img, 1, c)) * 0.5
    w = rng.normal(size=c)
    signal = X @ w
    y = signal + noise * signal.std() * rng.normal(size=signal.shape) + 2.0
    return X.astype(np.float32), y, w


def fold_stats(X, y, k=5, first=0):
    return sum(image_stats(first + i, X[i], y[i], k) for i in range(len(X)))


def test_merged_blocks_equal_concatenated_data():
    X, y, _ = make_cells(steps=(3,))                       # batch of 3 cells (steps)
    Y = np.stack([y, -y], axis=-1)                         # two targets share XᵀX
    per_image = [accumulate(X[:, i], Y[:, i]) for i in range(N_IMG)]
    left = (per_image[0] + per_image[1]) + per_image[2]
    right = per_image[0] + (per_image[1] + per_image[2])
    np.testing.assert_allclose(left.sxx, right.sxx, rtol=1e-12)
    merged = sum(per_image)
    whole = accumulate(X.reshape(3, -1, C).astype(np.float64), Y.reshape(3, -1, 2))
    for name in ("n", "mean_x", "mean_y", "sxx", "sxy", "syy"):
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name),
                                   rtol=1e-6, atol=1e-6 * np.abs(getattr(whole, name)).max())
    mx = merged.mean_x
    raw = merged.sxx + merged.n[:, None, None] * mx[:, :, None] * mx[:, None, :]   # raw XᵀX
    Xd = X.reshape(3, -1, C).astype(np.float64)
    np.testing.assert_allclose(raw, np.swapaxes(Xd, 1, 2) @ Xd, rtol=1e-6)


def test_image_stats_of_many_images_equals_per_image_sum():
    X, y, _ = make_cells(steps=(2,))                       # (step, image, token, C)
    per_image = fold_stats(np.moveaxis(X, 1, 0), np.moveaxis(y, 1, 0))
    tokens = image_stats(np.repeat(np.arange(N_IMG), TOK), X.reshape(2, -1, C), y.reshape(2, -1))
    for a, b in zip(per_image.folds, tokens.folds):
        np.testing.assert_allclose(a.sxx, b.sxx, rtol=1e-6, atol=1e-6 * np.abs(b.sxx).max())
        np.testing.assert_allclose(a.sxy, b.sxy, rtol=1e-6, atol=1e-6 * np.abs(b.sxy).max())


def test_fold_stats_merge_and_assignment():
    X, y, _ = make_cells()
    a = fold_stats(X[:20], y[:20]) + fold_stats(X[20:], y[20:], first=20)
    b = fold_stats(X, y)
    for fa, fb in zip(a.folds, b.folds):
        np.testing.assert_allclose(fa.sxx, fb.sxx, rtol=1e-10)
    folds = fold_of(np.arange(1000), 5)
    assert [int(fold_of(i, 5)) for i in range(10)] == list(folds[:10])     # scalar == array
    assert np.bincount(folds).min() > 150                                  # roughly balanced
    assert sum(f.n for f in b.folds) == N_IMG * TOK


@pytest.mark.parametrize("lam", [1e-4, 1e-2, 1.0])
def test_ridge_matches_sklearn_batched_and_multitarget(lam):
    X, y, _ = make_cells(steps=(2,))
    Y = np.stack([y, y ** 2 / 10], axis=-1)
    fit = fit_ridge(sum(accumulate(X[:, i], Y[:, i]) for i in range(N_IMG)), lam)
    assert fit.weights.shape == (2, C, 2) and fit.bias.shape == (2, 2)
    for s in range(2):
        Xs = X[s].reshape(-1, C).astype(np.float64)
        alpha = lam * np.trace(np.cov(Xs.T, bias=True)) * len(Xs) / C      # the documented scale
        for t in range(2):
            np.testing.assert_allclose(fit.alpha[s, t], alpha, rtol=1e-6)
            ref = Ridge(alpha=alpha).fit(Xs, Y[s, ..., t].ravel())
            np.testing.assert_allclose(fit.weights[s, :, t], ref.coef_, rtol=1e-5,
                                       atol=1e-5 * np.abs(ref.coef_).max())
            np.testing.assert_allclose(fit.bias[s, t], ref.intercept_, rtol=1e-5, atol=1e-6)


def test_ridge_path_every_lambda_matches_sklearn():
    """Every λ of the path from one tridiagonal reduction, not only the chosen one."""
    X, y, _ = make_cells(5, steps=(2,))
    Y = np.stack([y, np.sin(y)], axis=-1)
    lambdas = np.logspace(-6, 1, 8)
    stats = sum(accumulate(X[:, i], Y[:, i]) for i in range(N_IMG))
    w, b, alpha = probes._path(stats, lambdas)               # (step, λ, C, T), (step, λ, T)
    for s in range(2):
        Xs = X[s].reshape(-1, C).astype(np.float64)
        for li in range(len(lambdas)):
            for t in range(2):
                ref = Ridge(alpha=alpha[s, li]).fit(Xs, Y[s, ..., t].ravel())
                np.testing.assert_allclose(w[s, li, :, t], ref.coef_, rtol=1e-6,
                                           atol=1e-6 * np.abs(ref.coef_).max())
                np.testing.assert_allclose(b[s, li, t], ref.intercept_, rtol=1e-6, atol=1e-8)


def test_shifted_solves_match_dense_solves():
    rng = np.random.default_rng(6)
    A = rng.normal(size=(60, 25)) * rng.uniform(0.01, 10, 25)
    S, B = A.T @ A, rng.normal(size=(25, 4))
    shift, scale = np.array([1e-6, 1e-2, 1.0, 30.0]), np.array([1.0, 0.3, 2.0, 1.0])
    got = shifted.Tridiagonal(S).solve(B, shift, scale)
    for j in range(4):
        want = np.linalg.solve(scale[j] * S + shift[j] * np.eye(25), B[:, j])
        np.testing.assert_allclose(got[:, j], want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
        np.testing.assert_allclose(shifted.solve_spd(scale[j] * S, shift[j], B[:, j]), want,
                                   rtol=1e-9, atol=1e-12 * np.abs(want).max())
    # a rank-deficient S at shift 0: the minimum-norm solution, by either route
    low = A[:10].T @ A[:10]                                   # rank 10 of 25
    rhs = low @ rng.normal(size=25)                          # in its range
    want = np.linalg.pinv(low, rcond=1e-12) @ rhs
    for got in (shifted.Tridiagonal(low).solve(rhs[:, None], np.zeros(1))[:, 0],
                shifted.solve_spd(low, 0.0, rhs)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    one = shifted.Tridiagonal(np.array([[4.0]])).solve(np.array([[2.0]]), np.array([1.0]))
    assert one[0, 0] == pytest.approx(0.4)


def test_lambda_zero_is_the_minimum_norm_least_squares_fit():
    rng = np.random.default_rng(8)
    X, y = rng.normal(size=(2, 6, C)), rng.normal(size=(2, 6))     # 6 tokens < C channels
    fit = fit_ridge(accumulate(X, y), 0.0)
    for s in range(2):
        Xc, yc = X[s] - X[s].mean(0), y[s] - y[s].mean()
        want = np.linalg.lstsq(Xc, yc, rcond=None)[0]
        np.testing.assert_allclose(fit.weights[s], want, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(fit.bias[s], y[s].mean() - X[s].mean(0) @ want, atol=1e-8)


def test_removing_a_fold_equals_merging_the_others():
    X, y, _ = make_cells(7, steps=(2,))
    folds = fold_stats(np.moveaxis(X, 1, 0), np.moveaxis(y, 1, 0)).folds
    total = sum(folds)
    for k in range(5):
        rest, want = total - folds[k], sum(f for j, f in enumerate(folds) if j != k)
        for name in ("n", "mean_x", "mean_y", "sxx", "sxy", "syy"):
            np.testing.assert_allclose(getattr(rest, name), getattr(want, name), rtol=1e-9,
                                       atol=1e-9 * np.abs(getattr(want, name)).max())


def test_pooling_parts_equals_their_concatenated_tokens():
    """stats.pool (K parts in one step) and logistic.moments (no C×C) against the
    statistics of the concatenated tokens in float64."""
    X, y, _ = make_cells(8, steps=(2,))
    cuts = [0, 5, 17, 18, 31, N_IMG]
    parts = [accumulate(X[:, a:b].reshape(2, -1, C), y[:, a:b].reshape(2, -1))
             for a, b in zip(cuts[:-1], cuts[1:])]
    whole = accumulate(X.reshape(2, -1, C).astype(np.float64), y.reshape(2, -1))
    pooled = stats.pool(parts)
    for name in ("n", "mean_x", "mean_y", "sxx", "sxy", "syy"):
        np.testing.assert_allclose(getattr(pooled, name), getattr(whole, name), rtol=1e-6,
                                   atol=1e-6 * np.abs(getattr(whole, name)).max())
    cell = [replace(p, **{f: getattr(p, f)[1] for f in ("n", "mean_x", "mean_y", "sxx",
                                                        "sxy", "syy")}) for p in parts]
    m = lg.moments(cell)
    np.testing.assert_allclose([m.n, m.mean_y, m.scale],
                               [whole.n[1], whole.mean_y[1, 0], np.trace(whole.sxx[1]) / C],
                               rtol=1e-6)
    np.testing.assert_allclose(m.sxy, whole.sxy[1, :, 0], rtol=1e-6,
                               atol=1e-6 * np.abs(whole.sxy[1]).max())


def brute_force_cv(X, y, lambdas, k, fit_one, score_one):
    """Image-level K-fold with sklearn, fold per image from fold_of: pooled val score."""
    folds = fold_of(np.arange(len(X)), k)
    total, n = np.zeros(len(lambdas)), 0
    for f in range(k):
        tr, va = folds != f, folds == f
        Xt, yt = X[tr].reshape(-1, C).astype(np.float64), y[tr].ravel()
        Xv, yv = X[va].reshape(-1, C).astype(np.float64), y[va].ravel()
        scale = np.trace(np.cov(Xt.T, bias=True)) * len(Xt) / C
        total += [score_one(fit_one(lam * scale, Xt, yt), Xv, yv) for lam in lambdas]
        n += len(yv)
    return total / n


def test_ridge_cv_matches_sklearn_brute_force():
    X, y, _ = make_cells(noise=3.0)
    lambdas = np.logspace(-5, 1, 7)
    fit = fit_ridge_cv(fold_stats(X, y), lambdas)
    want = brute_force_cv(X, y, lambdas, 5, lambda a, Xt, yt: Ridge(alpha=a).fit(Xt, yt),
                          lambda m, Xv, yv: ((m.predict(Xv) - yv) ** 2).sum())
    np.testing.assert_allclose(fit.cv_score, want, rtol=1e-6)
    assert fit.lam == lambdas[np.argmin(want)]
    ref = fit_ridge(fold_stats(X, y).total(), float(fit.lam))
    np.testing.assert_allclose(fit.weights, ref.weights, rtol=1e-12)


def sk_logistic(alpha, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegression(C=1.0 / alpha, tol=1e-10, max_iter=10000).fit(X, y)


def binary_cells(seed=1):
    X, y, _ = make_cells(seed, noise=0.7)
    return X, (y > np.median(y)).astype(np.float64)


@pytest.mark.parametrize("lam", [1e-4, 1e-2, 1.0])
def test_logistic_matches_sklearn(lam):
    X, yb = binary_cells()
    Xf = X.reshape(-1, C)
    fit = fit_logistic(Xf, yb.ravel(), lam)
    ref = sk_logistic(float(fit.alpha), Xf.astype(np.float64), yb.ravel())
    assert fit.converged
    np.testing.assert_allclose(fit.weights, ref.coef_[0], rtol=1e-4,
                               atol=1e-4 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(fit.bias, ref.intercept_[0], rtol=1e-4, atol=1e-4)


def test_memory_bounds_do_not_change_results(monkeypatch):
    """Tiny chunks, no resident float64 copy and a subsampled Newton Hessian: same answer."""
    X, yb = binary_cells()
    Xf, yf = X.reshape(-1, C), yb.ravel()
    ref_r, ref_l = fit_ridge(accumulate(Xf, yf), 1e-3), fit_logistic(Xf, yf, 1e-3)
    monkeypatch.setattr(upcast, "CHUNK_BYTES", 4 * C * 100)
    monkeypatch.setattr(lg, "RESIDENT_BYTES", 0)
    monkeypatch.setattr(lg, "HESSIAN_TOKENS", 20)
    got_r, got_l = fit_ridge(accumulate(Xf, yf), 1e-3), fit_logistic(Xf, yf, 1e-3)
    np.testing.assert_allclose(got_r.weights, ref_r.weights, rtol=1e-6,
                               atol=1e-6 * np.abs(ref_r.weights).max())
    np.testing.assert_allclose(got_l.weights, ref_l.weights, rtol=1e-5, atol=1e-6)
    assert got_l.converged


def test_logistic_cv_matches_sklearn_brute_force():
    X, yb = binary_cells(2)
    lambdas = np.logspace(-4, 0, 5)
    img = np.repeat(np.arange(N_IMG), TOK)
    fit = fit_logistic_cv(X.reshape(-1, C), yb.ravel(), img, lambdas=lambdas,
                          fold_stats=fold_stats(X, yb))
    want = brute_force_cv(X, yb, lambdas, 5, sk_logistic,
                          lambda m, Xv, yv: -(m.predict_log_proba(Xv)[np.arange(len(yv)),
                                                                      yv.astype(int)]).sum())
    np.testing.assert_allclose(fit.cv_score, want, rtol=1e-5)
    assert fit.lam == lambdas[np.argmin(want)] and fit.converged
    ref = fit_logistic(X.reshape(-1, C), yb.ravel(), float(fit.lam))
    np.testing.assert_allclose(fit.weights, ref.weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eigen_max", [256, 0])   # narrow Hessians by eigh / tridiagonal
def test_logistic_cells_in_lockstep_match_sklearn_cell_by_cell(monkeypatch, eigen_max):
    """A layer's steps fitted in lockstep (same labels and images, each step its own
    activations and λ grid, of different lengths, so cells finish at different ticks and
    the working set shrinks), against sklearn's brute-force CV and fit of each cell, and
    against each cell fitted alone."""
    from actstore.probe import newton
    monkeypatch.setattr(newton, "EIGEN_MAX_C", eigen_max)
    X, yb = binary_cells(3)
    noise = np.random.default_rng(4).normal(size=(4,) + X.shape).astype(np.float32)
    Xs = X + noise * np.array([0.0, 0.3, 1.0, 3.0], np.float32)[:, None, None, None]
    grids = [np.logspace(-4, 0, 5), np.logspace(-3, -1, 3), np.array([1e-2]),
             np.logspace(-4, -2, 2)]
    img = np.repeat(np.arange(N_IMG), TOK)
    stats = sum(image_stats(i, Xs[:, i], np.broadcast_to(yb[i], (4, TOK))) for i in range(N_IMG))
    fits = lg.fit_logistic_cv_cells(Xs.reshape(4, -1, C), yb.ravel(), img, grids,
                                    fold_stats=stats)
    for k, (fit, lambdas) in enumerate(zip(fits, grids)):
        want = brute_force_cv(Xs[k], yb, lambdas, 5, sk_logistic,
                              lambda m, Xv, yv: -(m.predict_log_proba(Xv)[np.arange(len(yv)),
                                                                          yv.astype(int)]).sum())
        np.testing.assert_allclose(fit.cv_score, want, rtol=1e-5)
        assert fit.lam == lambdas[np.argmin(want)] and fit.converged
        ref = sk_logistic(float(fit.alpha), Xs[k].reshape(-1, C).astype(np.float64), yb.ravel())
        np.testing.assert_allclose(fit.weights, ref.coef_[0], rtol=1e-4,
                                   atol=1e-4 * np.abs(ref.coef_).max())
        step = FoldStats(tuple(replace(f, **{a: getattr(f, a)[k] for a in (
            "n", "mean_x", "mean_y", "sxx", "sxy", "syy")}) for f in stats.folds))
        alone = fit_logistic_cv(Xs[k].reshape(-1, C), yb.ravel(), img, lambdas=lambdas,
                                fold_stats=step)
        assert alone.lam == fit.lam
        np.testing.assert_allclose(fit.weights, alone.weights, rtol=1e-6,
                                   atol=1e-6 * np.abs(alone.weights).max())
        np.testing.assert_allclose(fit.cv_score, alone.cv_score, rtol=1e-8)


def r2(pred, y):
    return 1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()


def test_planted_signal_recovered_on_held_out_images():
    X, y, w = make_cells(3, n_img=300, tok=64, c=32, noise=0.8)
    tr, te = slice(0, 150), slice(150, None)
    fit = fit_ridge_cv(fold_stats(X[tr], y[tr]))
    got = r2(predict(fit.weights, fit.bias, X[te]), y[te])
    planted = r2(X[te].astype(np.float64) @ w + 2.0, y[te])    # the true map on the same tokens
    assert abs(got - planted) < 0.01
    assert abs(planted - 1 / (1 + 0.8 ** 2)) < 0.02              # population value, as designed
    # logistic: the planted direction comes back
    yb = (y > np.median(y)).astype(float)
    lf = fit_logistic_cv(X[tr].reshape(-1, 32), yb[tr].ravel(), np.repeat(np.arange(150), 64),
                         lambdas=np.logspace(-5, -1, 3))
    assert lf.weights @ w / np.linalg.norm(lf.weights) / np.linalg.norm(w) > 0.99


def test_float16_input_matches_float32():
    X, y, _ = make_cells(4)
    X16 = X.astype(np.float16)
    a = fit_ridge_cv(fold_stats(X16, y))
    b = fit_ridge_cv(fold_stats(X16.astype(np.float32), y))
    np.testing.assert_array_equal(a.weights, b.weights)                 # fp16 is just upcast
    c = fit_ridge_cv(fold_stats(X, y))                                   # unrounded activations
    np.testing.assert_allclose(a.weights, c.weights, rtol=2e-2, atol=2e-2 * np.abs(c.weights).max())
    assert abs(r2(predict(a.weights, a.bias, X16), y) - r2(predict(c.weights, c.bias, X), y)) < 1e-3
    yb = (y > np.median(y)).astype(float).ravel()
    l16, l32 = fit_logistic(X16.reshape(-1, C), yb, 1e-2), fit_logistic(X.reshape(-1, C), yb, 1e-2)
    np.testing.assert_allclose(l16.weights, l32.weights, rtol=2e-2,
                               atol=2e-2 * np.abs(l32.weights).max())


def test_float32_fold_statistics_match_float64_brute_force(monkeypatch):
    """A block's fold co-moments stay float32 (their mean correction by BLAS ``sger``, in
    place) until merged, and merges are float64: a wide float16 layer with large channel
    means, in several chunks, against float64 sums over the same float16 values."""
    monkeypatch.setattr(upcast, "CHUNK_BYTES", 300 * 4 * 320)   # ~300 tokens per chunk
    rng = np.random.default_rng(7)
    n_img, tok, c = 12, 100, 320                                  # c ≥ 256: the BLAS path
    X = (rng.normal(size=(n_img * tok, c)) * rng.uniform(0.3, 3, c)
         + rng.normal(size=c) * 30).astype(np.float16)
    y = rng.normal(size=n_img * tok)
    image = np.repeat(np.arange(n_img), tok)
    block = image_stats(image, X, y)
    one = image_stats(image[:tok], X[:tok], y[:tok])                   # one chunk, one fold
    assert [f.sxx.dtype for f in one.folds if f] == [np.float32]
    Xd = X.astype(np.float64)
    for k, f in enumerate(block.folds):
        if f is None:
            continue
        rows = fold_of(image) == k
        ref = np.cov(Xd[rows].T, bias=True) * rows.sum()
        np.testing.assert_allclose(f.sxx, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_allclose(f.mean_x, Xd[rows].mean(0), rtol=1e-9)
    total = block.total()
    assert total.sxx.dtype == np.float64
    np.testing.assert_allclose(total.sxx, np.cov(Xd.T, bias=True) * len(Xd), rtol=1e-5,
                               atol=1e-5 * np.abs(total.sxx).max())


def test_scratch_upcast_is_exact_reused_and_never_the_callers_array():
    """Transient upcasts reuse one buffer per thread; statistics centre a copy of float32
    input, not the caller's array; predictions through the buffer equal float64 products."""
    X, y, _ = make_cells(3)
    X16 = X.astype(np.float16)
    a = upcast.upcast(X16[0], scratch=True)
    np.testing.assert_array_equal(a, X16[0].astype(np.float32))
    b = upcast.upcast(X16[1], scratch=True)
    assert np.shares_memory(a, b)                                    # the same buffer
    assert np.shares_memory(upcast.upcast(X[0], scratch=True), X[0])   # no conversion: no copy
    before = X.copy()
    image_stats(np.repeat(np.arange(N_IMG), TOK), X.reshape(-1, C), y.ravel())
    np.testing.assert_array_equal(X, before)
    w = np.random.default_rng(0).normal(size=C)
    np.testing.assert_allclose(predict(w, 0.5, X16.reshape(-1, C)),
                               X16.reshape(-1, C).astype(np.float64) @ w + 0.5, rtol=1e-5,
                               atol=1e-5)


def test_predict_shapes():
    X, y, _ = make_cells(steps=(2,))
    fit = fit_ridge(sum(accumulate(X[:, i], y[:, i]) for i in range(N_IMG)), 1e-3)
    out = predict(fit.weights, fit.bias, X[:, 0])                       # (2, TOK)
    np.testing.assert_allclose(out[1], X[1, 0].astype(np.float64) @ fit.weights[1] + fit.bias[1],
                               rtol=1e-5)
    multi = predict(fit.weights[0][:, None], fit.bias[0][None], X[0, 0])
    assert multi.shape == (TOK, 1)


def test_bad_input_is_a_user_error():
    X, y, _ = make_cells()
    with pytest.raises(ActstoreError, match="NaN"):
        accumulate(X[0], np.where(np.arange(TOK) == 3, np.nan, y[0]))
    with pytest.raises(ActstoreError, match="NaN"):
        accumulate(np.full((4, C), np.inf, np.float16), np.zeros(4))
    with pytest.raises(ActstoreError, match="do not match"):
        accumulate(X[0], y[0][:-1])
    with pytest.raises(ActstoreError, match="labels in"):
        fit_logistic(X.reshape(-1, C), y.ravel(), 1e-2)
    with pytest.raises(ActstoreError, match="2 non-empty folds"):
        fit_ridge_cv(FoldStats((accumulate(X[0], y[0]), None)))
