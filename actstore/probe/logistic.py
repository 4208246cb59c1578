"""L2 logistic probes by Newton, for mask targets, on tokens held in memory.

Objective Σ wᵢ·logloss + (α/2)‖w‖² (sklearn ``LogisticRegression(C=1/α)`` with
``sample_weight``), bias unpenalised, α = λ·tr(S)/C as for ridge
(:mod:`actstore.probe.solvers`). Token weights let a class-balanced subsample of a cell's
tokens (:mod:`actstore.probe.sampling`) stand in for all of them: a token kept with
probability r weighs 1/r, so the weighted objective is an unbiased estimate of the full
one, and a cell small enough to be kept whole is fitted exactly.

The λ path runs quasi-Newton steps (L-BFGS pairs over a Hessian approximation kept as a
tridiagonal reduction) for the K fold models and the full model at once; the chosen λ's
full model alone is then polished, its pairs carried over.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from actstore.errors import ActstoreError
from actstore.probe.shifted import Tridiagonal
from actstore.probe.solvers import (FoldStats, ProbeFit, RidgeStats, _chunks, _stats_by_fold,
                                    _up, fold_of, pool)

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
    n = sum(float(p.n) for p in parts)
    mx = sum(float(p.n) * p.mean_x for p in parts) / n
    my = sum(float(p.n) * float(p.mean_y[0]) for p in parts) / n
    sxy = sum(p.sxy[:, 0] + float(p.n) * (p.mean_x - mx) * (float(p.mean_y[0]) - my)
              for p in parts)
    tr = sum(np.trace(p.sxx, dtype=np.float64) + float(p.n) * np.sum((p.mean_x - mx) ** 2) for p in parts)
    return Moments(n, my, sxy, float(tr) / len(mx))


class _Hess(NamedTuple):
    """The full model's Hessian h·S as its tridiagonal reduction (:mod:`shifted`), the bias
    eliminated by its Schur complement; h turns unweighted stats into the Hessian at the
    constant model (h = p̄(1-p̄)), else 1. Fold model m uses c_m times it, c_m its share of
    the training tokens: one reduction per refresh then serves every model and every α
    (C = 1280 at SD's widest layers), and the fold models, whose Hessians differ from it
    by their fold's share, converge linearly, not quadratically: the exact gradient
    decides."""
    tri: Tridiagonal   # of the full model's h·S
    c: np.ndarray      # (M,) each model's share of it
    mu: np.ndarray     # (C,) (weighted) mean of X: the bias coupling
    n: np.ndarray      # (M,) h·(weighted) count of each model's tokens

    @classmethod
    def of(cls, full: RidgeStats, c: np.ndarray, h: float = 1.0) -> "_Hess":
        return cls(Tridiagonal(h * full.sxx), c, full.mean_x, c * h * full.n)

    def solve(self, alpha: np.ndarray, gw: np.ndarray, gb: np.ndarray):
        """Newton direction for (w, b) of each model given gradients, penalty α on w only."""
        g = gw - self.mu * gb[:, None]
        dw = self.tri.solve(g.T, alpha, self.c).T
        return dw, gb / self.n - dw @ self.mu


# Gradient passes are O(nC) and memory-bound: float64 doubles their cost, but float32
# rounding (~1e-7 of each product) would stall Newton near 1e-6. So the λ path, which stops
# at PATH_TOL, passes in float32 (half the bytes per pass, the most frequent work at SD's
# widths), and only a polish to a tighter tolerance (the chosen λ of a cell fitted on all
# its tokens) in float64; a sample fit stops at PATH_TOL (its sampling error is far
# larger). Z and the sums stay float64 either way. The O(nC²) Hessian is float32: it may
# be approximate.
def _forward(X: np.ndarray, W: np.ndarray, B: np.ndarray, dt=np.float64) -> np.ndarray:
    Wt = W.T.astype(dt)
    return np.concatenate([(_up(X[s], dt, scratch=True) @ Wt).astype(np.float64, copy=False)
                           for s in _chunks(len(X), 8 * X.shape[1])]) + B


def _backward(X: np.ndarray, R: np.ndarray, dt=np.float64) -> np.ndarray:
    return sum((R[s].T.astype(dt) @ _up(X[s], dt, scratch=True)).astype(np.float64, copy=False)
               for s in _chunks(len(X), 8 * X.shape[1]))


def _loss_and_prob(Z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token log-loss and σ(Z) from one exp: the Newton loop's elementwise work."""
    e = np.exp(-np.abs(Z))
    loss = np.maximum(Z, 0.0) + np.log1p(e) - y[:, None] * Z
    inv = 1.0 / (1.0 + e)
    return loss, np.where(Z >= 0, inv, e * inv)


class _Refresher:
    """Hessian refreshes paid for by the passes they save. A refresh (XᵀWX of the
    subsample and a reduction: ~n_s·C² + 4·C³ multiply-adds) is made only once the Newton
    passes since the last one (2·n·C·M each, in float64 for M models) cost about twice as
    much, counting a float64 pass's multiply-add as twice a float32 Gram's: ~3 passes at
    C = 64, ~60 at C = 1280, where one refresh on the 25k-token sample costs ~0.6 CPU s
    and a pass ~25 ms. Measured on cells of both (benchmarks/README.md): on a toy layer
    (C = 64) as fast as refreshing whenever convergence slows, at C = 1280 ~25% faster."""

    def __init__(self, make, n_sub: int, n: int, channels: int, models: int):
        self.make, self.passes = make, 0.0
        self.cost = (n_sub * channels + 4.0 * channels ** 2) / (4.0 * n * models)

    def __call__(self, z: np.ndarray, H: "_Hess") -> "_Hess":
        if self.passes < self.cost:
            return H
        self.passes = 0.0
        return self.make(z)


class _Pairs:
    """Curvature pairs (s, y) of the last steps of each model, for L-BFGS directions
    preconditioned by the Hessian approximation H (the two-loop recursion with H⁻¹ as its
    initial inverse). With H fixed at h·S, Newton converges linearly (25-30 steps at weak λ
    on SD's C = 1280 cells); the pairs, O(C) each per step, make it superlinear without a
    Hessian refresh. Kept along the λ path: a pair's y moves by Δα·s when α changes."""

    def __init__(self, memory: int = 8):
        self.memory, self.alpha = memory, None
        self.s = self.y = self.rho = None

    def add(self, s: np.ndarray, y: np.ndarray) -> None:
        """One pair per model (M, C+1); one without positive curvature (a model that did not
        move, or rounding) gets ρ = 0, which leaves it out of the recursion."""
        if self.s is None:
            self.s, self.y = s[None], y[None]
        else:
            self.s = np.concatenate([self.s, s[None]])[-self.memory:]
            self.y = np.concatenate([self.y, y[None]])[-self.memory:]
        self._rho()

    def last(self) -> "_Pairs":
        """The last model's pairs alone (the full model, polished after the path)."""
        out = _Pairs(self.memory)
        if self.s is not None:
            out.s, out.y, out.alpha = self.s[:, -1:].copy(), self.y[:, -1:].copy(), self.alpha[-1:]
            out._rho()
        return out

    def _rho(self) -> None:
        sy = (self.s * self.y).sum(-1)
        big = 1e-10 * np.sqrt((self.s ** 2).sum(-1) * (self.y ** 2).sum(-1))
        self.rho = np.where(sy > big, 1.0 / np.where(sy > big, sy, 1.0), 0.0)

    def at(self, alpha: np.ndarray) -> None:
        if self.s is not None and self.alpha is not None and not np.array_equal(alpha,
                                                                                self.alpha):
            self.y[..., :-1] += (alpha - self.alpha)[None, :, None] * self.s[..., :-1]
            self._rho()
        self.alpha = alpha

    def direction(self, H: "_Hess", alpha: np.ndarray, gw: np.ndarray, gb: np.ndarray):
        if self.s is None:
            return H.solve(alpha, gw, gb)
        q, a = np.concatenate([gw, gb[:, None]], axis=1), []
        for i in range(len(self.s) - 1, -1, -1):
            a.append(self.rho[i] * (self.s[i] * q).sum(-1))
            q -= a[-1][:, None] * self.y[i]
        dw, db = H.solve(alpha, q[:, :-1], q[:, -1])
        r = np.concatenate([dw, db[:, None]], axis=1)
        for i, ai in zip(range(len(self.s)), reversed(a)):
            r += (ai - self.rho[i] * (self.y[i] * r).sum(-1))[:, None] * self.s[i]
        return r[:, :-1], r[:, -1]


def _newton(X, y, train, refresh, W, B, Z, H, alpha, tol, max_iter, dt, pairs=None):
    """Quasi-Newton at one α for all models at once (:class:`_Pairs` on top of H), halving
    a model's step while its objective rises; H is refreshed (:class:`_Refresher`) only
    when the full model converges slower than 4x per step."""
    def objective(Z, W):   # penalised log-loss of each model on its own training tokens, σ(Z)
        ll, p = _loss_and_prob(Z, y)
        return (ll * train).sum(0) + alpha / 2 * (W * W).sum(1), p
    pairs = _Pairs() if pairs is None else pairs
    pairs.at(alpha)
    loss, p = objective(Z, W)
    active, prev, last = np.ones(len(W), bool), np.full(len(W), np.inf), None
    for _ in range(max_iter):
        R = (p - y[:, None]) * train
        gw, gb = _backward(X, R, dt) + alpha[:, None] * W, R.sum(0)
        g = np.concatenate([gw, gb[:, None]], axis=1)
        if last is not None:
            pairs.add(last[0], g - last[1])
        dw, db = pairs.direction(H, alpha, gw, gb)
        dw[~active], db[~active] = 0.0, 0.0
        size = np.maximum(np.abs(dw).max(1), np.abs(db)) / np.maximum(1.0, np.abs(W).max(1))
        Zd, t = _forward(X, dw, db, dt), np.ones(len(W))
        for _ in range(40):
            new, p_new = objective(Z - t * Zd, W - t[:, None] * dw)
            bad = active & (new > loss + 1e-13 * np.abs(loss))
            if not bad.any():
                break
            t[bad] *= 0.5
        t[bad] = 0.0          # no decrease at any step size: at the precision limit
        W, B, Z, loss = W - t[:, None] * dw, B - t * db, Z - t * Zd, np.where(bad, loss, new)
        p = np.where(bad, p, p_new) if bad.any() else p_new
        last = (-t[:, None] * np.concatenate([dw, db[:, None]], axis=1), g)
        active &= (size > tol) & ~bad
        if not active.any():
            break
        slow, prev = (size > 0.25 * prev) | (t < 1), size
        refresh.passes += 1
        if slow[-1] and active[-1] and t[-1] * size[-1] > 0:
            H = refresh(Z[:, -1], H)
    return W, B, Z, H, not active.any()


def _logistic(X, y, fold, n_groups, cv, lambdas, tol, max_iter, stats, weight=None) -> ProbeFit:
    """Regularisation path, strong to weak λ with warm starts, for the K fold models and
    the full model together, so each pass over the in-memory X serves all K+1 of them."""
    X, y, lambdas = np.asarray(X), np.asarray(y, np.float64), np.asarray(lambdas, np.float64)
    if X.ndim != 2 or y.shape != X.shape[:1]:
        raise ActstoreError(f"logistic probe needs X (n, C), y (n,), got {X.shape}, {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all() or (lambdas <= 0).any():
        raise ActstoreError("logistic probe needs labels in {0, 1} (pooled mask > 0.5) and λ > 0")
    wt = np.ones(len(y)) if weight is None else np.asarray(weight, np.float64)
    if wt.shape != y.shape or not (wt > 0).all():
        raise ActstoreError(f"token weights need one positive entry per token, got {wt.shape}")
    F = list(getattr(stats, "folds", stats)) if stats else \
        _stats_by_fold(X, y, fold, n_groups, None if weight is None else wt)
    if len(F) != n_groups:
        raise ActstoreError(f"fold_stats has {len(F)} folds, expected {n_groups}")
    present = [g for g in range(n_groups) if F[g] is not None]
    held = present if cv else []
    if cv and len(held) < 2:
        raise ActstoreError(f"cross-validation needs ≥ 2 non-empty folds, got {len(held)}")
    train = np.stack([fold != g for g in held] + [np.ones(len(y), bool)], axis=1) * wt[:, None]

    # each model's training set: all folds but its own (the last model: all); only the
    # full model's C×C matrix is formed
    full = pool([F[j] for j in present])
    T = [moments([F[j] for j in present if j != g]) for g in held] + [moments([full])]
    scale = np.array([t.scale for t in T])   # each model's α = λ·scale, its own training set
    share = np.array([t.n for t in T]) / T[-1].n
    ybar = np.clip([t.mean_y for t in T], 1e-6, 1 - 1e-6)
    # the full model's exact Hessian at the intercept-only model
    H = _Hess.of(full, share, ybar[-1] * (1 - ybar[-1]))

    dt = PATH_DTYPE
    Xp = _up(X, dt) if X.size * np.dtype(dt).itemsize <= RESIDENT_BYTES else X
    # Hessian refreshes: XᵀWX at the full model's weights, on a strided subsample of
    # ≤ ~256·C tokens (it only preconditions; the exact gradient decides), taken on the
    # first refresh (most C = 1280 cells make none) from the path's float32 copy.
    k = max(1, len(y) // (HESSIAN_TOKENS * X.shape[1]))
    wt_sub, sub = k * wt[::k], []

    def hessian(z, c=share):
        if not sub:
            sub.append(Xp[::k] if Xp.dtype == np.float32 else _up(X[::k]))
        p = 0.5 + 0.5 * np.tanh(0.5 * z[::k])
        return _Hess.of(_stats_by_fold(sub[0], None, np.zeros(len(wt_sub), np.int64), 1,
                                       wt_sub * p * (1 - p))[0], c)
    refresh = _Refresher(hessian, len(wt_sub), len(y), X.shape[1], len(T))

    # Warm start = first Newton step from the intercept-only model = the ridge solution at
    # α/(p̄(1-p̄)), divided by p̄(1-p̄): the linear-probability model mapped to logits.
    W = -H.solve(lambdas.max() * scale, -np.stack([t.sxy for t in T]),
                 np.zeros(len(T)))[0]
    B = np.log(ybar / (1 - ybar)) - W @ H.mu
    Z = _forward(Xp, W, B, dt)
    path_w, path_b = np.zeros((len(lambdas),) + W.shape), np.zeros((len(lambdas), len(B)))
    score, done = np.full(len(lambdas), np.nan), np.zeros(len(lambdas), bool)
    pairs = _Pairs()
    for li in np.argsort(-lambdas):   # validation loss is flat at the optimum: PATH_TOL will do
        W, B, Z, H, done[li] = _newton(Xp, y, train, refresh, W, B, Z, H, lambdas[li] * scale,
                                       max(tol, PATH_TOL), min(max_iter, PATH_MAX_ITER), dt,
                                       pairs)
        path_w[li], path_b[li] = W, B
        if cv:
            ll = (np.logaddexp(0.0, Z) - y[:, None] * Z) * wt[:, None]
            score[li] = sum(ll[fold == g, m].sum() for m, g in enumerate(held)) / wt.sum()
    best = int(np.nanargmin(score)) if cv else 0
    # the fold models served the CV: only the full model is polished to ``tol``
    W, B, ok = path_w[best][-1:], path_b[best][-1:], bool(done[best])
    alpha, one = lambdas[best] * scale[-1:], np.ones(1)
    if tol < PATH_TOL or not ok:   # on from the path's curvature pairs, float64 to polish
        if tol < PATH_TOL:
            dt = np.float64
            Xp = _up(X, dt) if X.size * 8 <= RESIDENT_BYTES else X
        solo = _Refresher(lambda z: hessian(z, one), len(wt_sub), len(y), X.shape[1], 1)
        W, B, _, _, ok = _newton(Xp, y, train[:, -1:], solo, W, B, _forward(Xp, W, B, dt),
                                 H._replace(c=one, n=H.n[-1:]), alpha, tol, max_iter, dt,
                                 pairs.last())
    return ProbeFit(W[-1], np.float64(B[-1]), np.float64(lambdas[best]), np.float64(alpha[0]),
                    lambdas, score if cv else None, bool(ok))


def fit_logistic(X: np.ndarray, y: np.ndarray, lam: float, *, tol: float = TOL,
                 max_iter: int = 100, stats: RidgeStats | None = None,
                 weight: np.ndarray | None = None) -> ProbeFit:
    """L2 logistic probe at one λ on one cell's tokens held in memory (read from the store
    once), X ``(n, C)`` float16/32, y ``(n,)`` in {0, 1}, ``weight`` ``(n,)`` per token.
    ``stats``, this cell's (weighted) :func:`accumulate` from the ridge pass, saves one
    pass over X."""
    fold, F = np.zeros(len(X), np.int64), None if stats is None else [stats]
    return _logistic(X, y, fold, 1, False, [lam], tol, max_iter, F, weight)


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
    fold = fold_of(np.asarray(image_index), n_folds)
    if np.shape(fold) != (len(X),):
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
