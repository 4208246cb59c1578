"""Work made piece by piece on float16 tokens against float64 brute force over the same
values: fold statistics from one centred, fold-ordered copy (``stats._centred_copy``) and
predictions (``solvers.predict``)."""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from actstore.errors import ActstoreError
from actstore.probe import solvers, stats, upcast
from actstore.probe.stats import fold_of, image_stats, stats_by_fold


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def _layer(seed, n_img, tok, c, steps=(2,)):
    """float16 tokens, image by image, with large uneven channel means and per-image
    offsets; two targets."""
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=steps + (n_img, tok, c)) * rng.uniform(0.3, 3, c)
         + rng.normal(size=steps + (n_img, 1, c)) + rng.normal(size=c) * 30)
    y = X[..., :3].sum(-1, keepdims=True) * [1.0, -0.5] + rng.normal(size=X.shape[:-1] + (2,))
    return (X.reshape(steps + (n_img * tok, c)).astype(np.float16),
            y.reshape(steps + (n_img * tok, 2)))


def _brute(X, y, w, rows):
    """Weighted count, means and centred co-moments in float64 of the tokens ``rows``."""
    Xd, wd = X[..., rows, :].astype(np.float64), w[..., rows, None]
    yd = y[..., rows, :]
    n = wd.sum(-2)[..., 0]
    mx, my = (wd * Xd).sum(-2) / n[..., None], (wd * yd).sum(-2) / n[..., None]
    dx, dy = Xd - mx[..., None, :], yd - my[..., None, :]
    return dict(n=n, mean_x=mx, mean_y=my, sxx=np.swapaxes(wd * dx, -1, -2) @ dx,
                sxy=np.swapaxes(wd * dx, -1, -2) @ dy, syy=(wd * dy * dy).sum(-2))


@pytest.mark.parametrize("run_bytes", [1, 1 << 40], ids=["runs", "sorted-copy"])
@pytest.mark.parametrize("weighted", [False, True])
def test_pieces_runs_and_chunks_match_float64_brute_force(monkeypatch, run_bytes, weighted):
    """Every path: image runs copied to their fold's place, or short runs put in order
    first; pieces smaller than a run and runs cut across chunks; with and without token
    weights."""
    c, tok, n_img = 300, 50, 17                        # c ≥ 256: the BLAS rank-one path
    monkeypatch.setattr(stats, "RUN_BYTES", run_bytes)
    monkeypatch.setattr(stats, "PIECE_BYTES", 2 * 4 * 21 * c)     # 21 tokens of 2 steps
    monkeypatch.setattr(upcast, "CHUNK_BYTES", 4 * 2 * c * 230)    # ~4.6 images per chunk
    X, y = _layer(3, n_img, tok, c)
    image = np.repeat(np.arange(100, 100 + n_img), tok)
    fold = fold_of(image, 5)
    assert len(np.flatnonzero(np.diff(fold))) > 5            # folds interleave
    rng = np.random.default_rng(1)
    w = rng.uniform(0.2, 3.0, X.shape[:-1]) if weighted else np.ones(X.shape[:-1])
    got = stats_by_fold(X, y, fold, 5, w if weighted else None)
    for k, f in enumerate(got):
        rows = fold == k
        if not rows.any():
            assert f is None
            continue
        ref = _brute(X, y, w, rows)
        np.testing.assert_allclose(f.n, ref["n"], rtol=1e-12)
        np.testing.assert_allclose(f.mean_x, ref["mean_x"], rtol=1e-9)
        np.testing.assert_allclose(f.mean_y, ref["mean_y"], rtol=1e-9)
        np.testing.assert_allclose(f.syy, ref["syy"], rtol=1e-9)
        for name in ("sxx", "sxy"):
            want = ref[name]
            np.testing.assert_allclose(getattr(f, name), want, rtol=1e-5,
                                       atol=1e-5 * np.abs(want).max())


def test_image_stats_of_a_block_in_any_image_order():
    """A block's statistics do not depend on where its images sit in it (the copy puts
    each image's tokens at its fold's place): the same images reversed."""
    X, y = _layer(5, 12, 40, 64, steps=())
    image = np.repeat(np.arange(12), 40)
    back = np.arange(len(image)).reshape(12, 40)[::-1].ravel()
    a, b = image_stats(image, X, y[:, 0]), image_stats(image[back], X[back], y[back, 0])
    for fa, fb in zip(a.folds, b.folds):
        assert (fa is None) == (fb is None)
        if fa is not None:
            np.testing.assert_allclose(fa.mean_x, fb.mean_x, rtol=1e-12)
            np.testing.assert_allclose(fa.sxx, fb.sxx, rtol=1e-5, atol=1e-5 * np.abs(fa.sxx).max())


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_one_bad_token_in_a_wide_layer_is_reported(bad):
    """Only finite means and Gram diagonals are checked: one inf or NaN anywhere still
    stops the fit."""
    X, y = _layer(2, 6, 30, 320, steps=())
    X[97, 211] = bad
    with pytest.raises(ActstoreError, match="NaN or inf"):
        image_stats(np.repeat(np.arange(6), 30), X, y[:, 0])


@pytest.mark.parametrize("piece_bytes", [4 * 2 * 64 * 7, 512 << 10])
def test_predictions_in_pieces_match_float64_products(monkeypatch, piece_bytes):
    """Several pieces (7 tokens each) or one; per-step weights over (step, token) float16
    tokens, one weight vector broadcast over steps, and several targets."""
    monkeypatch.setattr(solvers, "PIECE_BYTES", piece_bytes)
    X, _ = _layer(4, 5, 20, 64)                                    # (2 steps, 100, 64)
    Xd = X.astype(np.float64)
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=(2, 64)), rng.normal(size=2)
    got = solvers.predict(w, b, X)
    assert got.shape == (2, 100)
    np.testing.assert_allclose(got, np.einsum("snc,sc->sn", Xd, w) + b[:, None], rtol=1e-5,
                               atol=1e-5)
    one = solvers.predict(w[0], 0.25, X)
    np.testing.assert_allclose(one, Xd @ w[0] + 0.25, rtol=1e-5, atol=1e-5)
    multi = solvers.predict(w.T, b, X[0])                          # (C, T) weights, 2 targets
    assert multi.shape == (100, 2)
    np.testing.assert_allclose(multi, Xd[0] @ w.T + b, rtol=1e-5, atol=1e-5)
