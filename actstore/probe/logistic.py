"""L2 logistic probes by Newton, for mask targets, on tokens held in memory.

Objective Σ wᵢ·logloss + (α/2)‖w‖² (sklearn ``LogisticRegression(C=1/α)`` with
``sample_weight``), bias unpenalised, α = λ·tr(S)/C as for ridge
(:mod:`actstore.probe.solvers`). Token weights let a class-balanced subsample of a cell's
tokens (:mod:`actstore.probe.sampling`) stand in for all of them: a token kept with
probability r weighs 1/r, so the weighted objective is an unbiased estimate of the full
one, and a cell small enough to be kept whole is fitted exactly.

The λ path runs quasi-Newton steps (L-BFGS pairs over a Hessian approximation,
:mod:`actstore.probe.newton`) for the K fold models and the full model at once, and for
several cells at once (a layer's steps: :func:`fit_logistic_cv_cells`); the chosen λ's
full model alone is then polished, its pairs carried over.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from actstore.errors import ActstoreError
from actstore.probe import newton as nt
from actstore.probe.solvers import ProbeFit
from actstore.probe.stats import FoldStats, RidgeStats, fold_of, pool, stats_by_fold
from actstore.probe.upcast import as_tensor, upcast

LOGISTIC_LAMBDAS = np.logspace(-6, 0, 7)   # each λ costs Newton passes: one per decade
RESIDENT_BYTES = 1 << 30    # logistic keeps a copy of X for its passes up to this size
HESSIAN_TOKENS = 256        # per channel: logistic Hessian refreshes use ≤ ~256·C tokens
TOL = 1e-6                  # Newton's default tolerance (largest relative step left)
PATH_TOL = 1e-4             # logistic tolerance along the λ path; the chosen λ gets ``tol``
PATH_DTYPE = np.float32     # the λ path's passes over X; a polish below PATH_TOL: float64
PATH_MAX_ITER = 30          # separable tokens never converge; the chosen λ gets ``max_iter``
WINDOW = (1 / 30, 300)      # λ searched around the ridge's, see :func:`lambda_window`


class Moments(NamedTuple):
    """What a model needs of its training set's statistics besides the Hessian: count,
    label mean, centred Xᵀy (C,) and the penalty scale tr(S)/C."""
    n: float
    mean_y: float
    sxy: np.ndarray
    scale: float


def moments(parts: Sequence[RidgeStats]) -> Moments:
    """:class:`Moments` of the union of ``parts`` (one cell's statistics, one target), by
    Chan's formula without forming the union's C×C matrix: a fold model's statistics cost
    O(C) here instead of K−2 merges of C×C (at C = 1280 ~10 ms each, 19 per cell)."""
    k = [np.asarray(p.n, np.float64) for p in parts]   # leading cell axes broadcast
    n = sum(k)
    mx = sum(c[..., None] * p.mean_x for c, p in zip(k, parts)) / n[..., None]
    my = sum(c * p.mean_y[..., 0] for c, p in zip(k, parts)) / n
    sxy = sum(p.sxy[..., 0] + c[..., None] * (p.mean_x - mx) * (p.mean_y[..., 0] - my)[..., None]
              for c, p in zip(k, parts))
    tr = sum(np.trace(p.sxx, axis1=-2, axis2=-1, dtype=np.float64)
             + c * np.sum((p.mean_x - mx) ** 2, -1) for c, p in zip(k, parts))
    return Moments(n, my, sxy, tr / mx.shape[-1])


def _logistic(X, y, fold, n_groups, cv, lambdas, tol, max_iter, stats,
              weight=None) -> list[ProbeFit]:
    """Regularisation paths, strong to weak λ with warm starts, for the K fold models and
    the full model of every cell together (:class:`newton.Lockstep`): X (S, n, C) the
    cells' tokens (same labels, folds and weights), ``lambdas`` one grid per cell,
    ``stats`` per-fold statistics with a leading cell axis. Each pass over a cell's X
    serves its K+1 models; the chosen λ's full model alone is then polished."""
    X, y = np.asarray(X), np.asarray(y, np.float64)
    lambdas = [np.asarray(lam, np.float64) for lam in lambdas]
    if X.ndim != 3 or y.shape != X.shape[1:2] or len(lambdas) != len(X):
        raise ActstoreError(f"logistic probe needs X (n, C), y (n,), got {X.shape[1:]}, {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all() or any((lam <= 0).any() or not lam.size
                                               for lam in lambdas):
        raise ActstoreError("logistic probe needs labels in {0, 1} (pooled mask > 0.5) and λ > 0")
    wt = np.ones(len(y)) if weight is None else np.asarray(weight, np.float64)
    if wt.shape != y.shape or not (wt > 0).all():
        raise ActstoreError(f"token weights need one positive entry per token, got {wt.shape}")
    F = list(getattr(stats, "folds", stats)) if stats else \
        stats_by_fold(X, np.broadcast_to(y, X.shape[:2]), fold, n_groups,
                       None if weight is None else wt)
    if len(F) != n_groups:
        raise ActstoreError(f"fold_stats has {len(F)} folds, expected {n_groups}")
    present = [g for g in range(n_groups) if F[g] is not None]
    held = present if cv else []
    if cv and len(held) < 2:
        raise ActstoreError(f"cross-validation needs ≥ 2 non-empty folds, got {len(held)}")
    train = np.stack([fold != g for g in held] + [np.ones(len(y), bool)], axis=1) * wt[:, None]
    S, n, C = X.shape

    # each model's training set: all folds but its own (the last model: all); only the
    # full model's C×C matrix is formed
    full = pool([F[j] for j in present])
    T = [moments([F[j] for j in present if j != g]) for g in held] + [moments([full])]
    scale = np.stack([t.scale for t in T], -1)   # (S, M) each model's α = λ·scale
    share = np.stack([t.n for t in T], -1) / T[-1].n[:, None]
    ybar = np.clip(np.stack([t.mean_y for t in T], -1), 1e-6, 1 - 1e-6)
    # the full model's exact Hessian at the intercept-only model
    H = nt.Hess.of(full.sxx, full.mean_x, full.n, share, ybar[:, -1] * (1 - ybar[:, -1]))

    Xp = upcast(X, PATH_DTYPE) if X.size * np.dtype(PATH_DTYPE).itemsize <= RESIDENT_BYTES else X
    # Hessian refreshes: XᵀWX at the full model's weights, on a strided subsample of
    # ≤ ~256·C tokens (it only preconditions; the exact gradient decides), taken on a
    # cell's first refresh (most C = 1280 cells make none) from the path's float32 copy.
    k = max(1, n // (HESSIAN_TOKENS * C))
    wt_sub, sub = k * wt[::k], {}

    def hessian(cell, z, c):
        if cell not in sub:
            sub[cell] = Xp[cell, ::k] if Xp.dtype == np.float32 else upcast(X[cell, ::k])
        p = 0.5 + 0.5 * np.tanh(0.5 * z[::k])
        h = stats_by_fold(sub[cell], None, np.zeros(len(wt_sub), np.int64), 1,
                           wt_sub * p * (1 - p))[0]
        return nt.Hess.of(h.sxx[None], h.mean_x[None], np.asarray(h.n)[None], c[cell][None],
                          np.ones(1))

    def cost(models):   # a refresh (~n_s·C² + 4·C³) against a pass (2·n·C·M): _Refresher
        return (len(wt_sub) * C + 4.0 * C ** 2) / (4.0 * n * models)

    # Warm start = first Newton step from the intercept-only model = the ridge solution at
    # α/(p̄(1-p̄)), divided by p̄(1-p̄): the linear-probability model mapped to logits.
    top = np.array([lam.max() for lam in lambdas])[:, None] * scale
    W = -H.solve(top, -np.stack([t.sxy for t in T], 1), np.zeros(scale.shape))[0]
    B = np.log(ybar / (1 - ybar)) - (W @ H.mu[..., None])[..., 0]
    L = max(len(lam) for lam in lambdas)
    order = [np.argsort(-lam) for lam in lambdas]
    alphas = np.ones((S, L) + scale.shape[1:])
    for c, (lam, o) in enumerate(zip(lambdas, order)):
        alphas[c, :len(lam)] = lam[o][:, None] * scale[c]
    path_w, path_b = np.zeros((S, L) + W.shape[1:]), np.zeros((S, L) + B.shape[1:])
    score, done = np.full((S, L), np.nan), np.zeros((S, L), bool)
    held_at = [np.flatnonzero(fold == g) for g in held]

    def record(c, i, w, b, z, ok):   # validation loss is flat at the optimum: PATH_TOL will do
        li = order[c][i]
        path_w[c, li], path_b[c, li], done[c, li] = w, b, ok
        if cv:
            score[c, li] = sum(((np.logaddexp(0.0, z[m, ix]) - y[ix] * z[m, ix]) * wt[ix]).sum()
                               for m, ix in enumerate(held_at)) / wt.sum()
    path = nt.Lockstep(Xp, y, np.ascontiguousarray(train.T), H, nt.Pairs(S, len(T), C + 1), W, B,
                       lambda c, z: hessian(c, z, share), cost(len(T)))
    path.run(alphas, np.array([len(lam) for lam in lambdas]), max(tol, PATH_TOL),
             min(max_iter, PATH_MAX_ITER), record)

    best = [int(np.nanargmin(score[c, :len(lam)])) if cv else 0 for c, lam in enumerate(lambdas)]
    cells = np.arange(S)
    W, B = path_w[cells, best][:, -1:], path_b[cells, best][:, -1:]
    alpha, ok = (np.array([lambdas[c][b] for c, b in enumerate(best)]) * scale[:, -1])[:, None], \
        done[cells, best].copy()
    # the fold models served the CV: only the full model is polished to ``tol``, on from the
    # path's curvature pairs, in float64 if tighter than the path
    polish = np.flatnonzero(np.full(S, tol < PATH_TOL) | ~ok)
    if len(polish):
        dt = np.float64 if tol < PATH_TOL else PATH_DTYPE
        Xs = X[polish] if Xp is X else Xp[polish]
        if Xs.size * np.dtype(dt).itemsize <= RESIDENT_BYTES and Xs.dtype != dt:
            # torch's allocation: numpy's huge pages cost more to touch than the polish
            Xs = as_tensor(Xs).to(as_tensor(np.empty(0, dt)).dtype).numpy()
        one = np.ones((S, 1))
        last = slice(-1, None)

        def polished(c, i, w, b, z, conv):
            W[polish[c]], B[polish[c]], ok[polish[c]] = w, b, conv
        solo = nt.Lockstep(Xs, y, np.ascontiguousarray(train.T[-1:]),
                           nt.Hess.stack(path.final_H, polish, last),
                           nt.Pairs.stack(path.final_pairs, polish, last), W[polish],
                           B[polish], lambda c, z: hessian(polish[c], z, one), cost(1))
        solo.run(alpha[polish][:, None], np.ones(len(polish), int), tol, max_iter, polished)
    return [ProbeFit(W[c, -1], np.float64(B[c, -1]), np.float64(lambdas[c][best[c]]),
                     np.float64(alpha[c, 0]), lambdas[c], score[c, :len(lambdas[c])] if cv
                     else None, bool(ok[c])) for c in cells]


def fit_logistic(X: np.ndarray, y: np.ndarray, lam: float, *, tol: float = TOL,
                 max_iter: int = 100, stats: RidgeStats | None = None,
                 weight: np.ndarray | None = None) -> ProbeFit:
    """L2 logistic probe at one λ on one cell's tokens held in memory (read from the store
    once), X ``(n, C)`` float16/32, y ``(n,)`` in {0, 1}, ``weight`` ``(n,)`` per token.
    ``stats``, this cell's (weighted) :func:`accumulate` from the ridge pass, saves one
    pass over X."""
    fold, F = np.zeros(len(X), np.int64), None if stats is None else [stats.cell(None)]
    return _logistic(_one(X), y, fold, 1, False, [[lam]], tol, max_iter, F, weight)[0]


def _one(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ActstoreError(f"logistic probe needs X (n, C), got {X.shape}")
    return X[None]


def fit_logistic_cv(X: np.ndarray, y: np.ndarray, image_index: np.ndarray,
                    *, lambdas: Sequence[float] | np.ndarray = LOGISTIC_LAMBDAS, n_folds: int = 5,
                    tol: float = TOL, max_iter: int = 100,
                    fold_stats: FoldStats | None = None,
                    weight: np.ndarray | None = None) -> ProbeFit:
    """L2 logistic probe with λ chosen by image-level K-fold CV (validation log-loss).
    ``image_index`` ``(n,)`` gives each token's image, hence its fold (:func:`fold_of`);
    ``fold_stats`` from the ridge pass over the same tokens (or, with ``weight``, over the
    tokens these stand for) saves one pass over X; the CV score is the weighted mean
    validation log-loss."""
    F = fold_stats and [f and f.cell(None) for f in getattr(fold_stats, "folds", fold_stats)]
    return fit_logistic_cv_cells(_one(X), y, image_index, [lambdas], n_folds=n_folds, tol=tol,
                                 max_iter=max_iter, fold_stats=F, weight=weight)[0]


def fit_logistic_cv_cells(X: np.ndarray, y: np.ndarray, image_index: np.ndarray,
                          lambdas: Sequence[np.ndarray], *, n_folds: int = 5,
                          tol: float = TOL, max_iter: int = 100,
                          fold_stats: FoldStats | Sequence[RidgeStats | None] | None = None,
                          weight: np.ndarray | None = None) -> list[ProbeFit]:
    """:func:`fit_logistic_cv` of several cells sharing their tokens' labels, images and
    weights (a layer's steps): X ``(S, n, C)``, one λ grid per cell, ``fold_stats`` with a
    leading cell axis. The cells are fitted in lockstep (:mod:`actstore.probe.newton`),
    each as it would be alone, in one pass per step over all of them."""
    fold = fold_of(np.asarray(image_index), n_folds)
    if np.shape(fold) != np.shape(X)[1:2]:
        raise ActstoreError(f"image_index needs one entry per token, got {np.shape(fold)}")
    return _logistic(X, y, fold, n_folds, True, lambdas, tol, max_iter, fold_stats, weight)


def lambda_window(ridge_lam: float, positive: float,
                  lambdas: np.ndarray = LOGISTIC_LAMBDAS) -> np.ndarray:
    """Which ``lambdas`` a logistic CV needs to try, given the λ that ridge CV chose on the
    same cell's 0/1 labels (exact, from all tokens' statistics) and the share of positive
    tokens p̄. Near the constant model the logistic Hessian is p̄(1-p̄)·S, so ridge's
    penalty corresponds to λ·p̄(1-p̄) for the logistic probe; the window [1/30, 300] times
    that held the full grid's CV choice on every real cell tried (benchmarks/README.md),
    and trying 3-4 λ instead of 7 halves the Newton passes. Never empty: the nearest
    grid point if none falls inside."""
    lambdas = np.asarray(lambdas, np.float64)
    centre = ridge_lam * positive * (1 - positive)
    keep = (lambdas >= WINDOW[0] * centre) & (lambdas <= WINDOW[1] * centre)
    if not keep.any():
        keep[np.argmin(np.abs(np.log(lambdas / max(centre, 1e-300))))] = True
    return keep
