"""Closed-form linear probes from sufficient statistics: the store is read once.

The authors fit each (layer, step) probe with Adam for 30 epochs, re-reading the data each
epoch. Least squares needs only second moments: :func:`accumulate` or :func:`image_stats`
per block, merge with ``+`` (associative: Dask can tree-reduce), and :func:`fit_ridge_cv`
solves every λ from one eigendecomposition, scoring image-level CV folds (:func:`fold_of`)
from their own statistics. Logistic probes run Newton on one cell's tokens in memory.

Statistics are centred (means and co-moments, merged by Chan's formula): raw XᵀX, Xᵀy, yᵀy
(XᵀX = sxx + n·mean_x·mean_xᵀ) without their cancellation when channel means are large.
Products in float32, sums in float64. Penalty α = λ·tr(S)/C, S the centred XᵀX of the
training tokens, so one λ grid suits any layer width, scale and token count; the bias is
unpenalised. Ridge minimises Σ(y - Xw - b)² + α‖w‖² (sklearn ``Ridge(alpha=α)``), logistic
Σ logloss + (α/2)‖w‖² (``LogisticRegression(C=1/α)``). X ``(..., n, C)``: leading axes
batch cells; y ``(..., n, T)`` fits T targets sharing XᵀX.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod
from typing import NamedTuple, Sequence

import numpy as np

from actstore.errors import ActstoreError

DEFAULT_LAMBDAS = np.logspace(-6, 1, 15)
LOGISTIC_LAMBDAS = np.logspace(-6, 0, 7)   # each λ costs Newton passes: one per decade
CHUNK_BYTES = 64 << 20      # bound on the float32 copy of X made per block
RESIDENT_BYTES = 1 << 30    # logistic keeps a float64 copy of X up to this size
HESSIAN_TOKENS = 256        # per channel: logistic Hessian refreshes use ≤ ~256·C tokens
PATH_TOL = 1e-4             # logistic tolerance along the λ path; the chosen λ gets ``tol``
PATH_MAX_ITER = 30          # separable tokens never converge; the chosen λ gets ``max_iter``


@dataclass(frozen=True)
class RidgeStats:
    """Count, means and centred co-moments of a token set. Weighted (count = Σw), the
    same object is the bias-reduced Hessian XᵀWX of an IRLS step."""

    n: np.ndarray        # (...)
    mean_x: np.ndarray   # (..., C)
    mean_y: np.ndarray   # (..., T)
    sxx: np.ndarray      # (..., C, C)
    sxy: np.ndarray      # (..., C, T)
    syy: np.ndarray      # (..., T)   centred Σy² per target (cross-target terms unused)
    vector_target: bool = True

    def __add__(self, o: "RidgeStats | int") -> "RidgeStats":
        if isinstance(o, int) and o == 0:   # lets sum() start from 0
            return self
        n = self.n + o.n
        fb = np.divide(o.n, n, out=np.zeros_like(n), where=n > 0)
        c = self.n * fb                       # n_a n_b / n
        dx, dy = o.mean_x - self.mean_x, o.mean_y - self.mean_y
        return replace(
            self, n=n, mean_x=self.mean_x + fb[..., None] * dx,
            mean_y=self.mean_y + fb[..., None] * dy,
            sxx=self.sxx + o.sxx + c[..., None, None] * dx[..., :, None] * dx[..., None, :],
            sxy=self.sxy + o.sxy + c[..., None, None] * dx[..., :, None] * dy[..., None, :],
            syy=self.syy + o.syy + c[..., None] * dy * dy)

    __radd__ = __add__


@dataclass(frozen=True)
class FoldStats:
    """Per-fold :class:`RidgeStats` (None for a fold with no image yet); ``+`` merges."""

    folds: tuple[RidgeStats | None, ...]

    def __add__(self, o: "FoldStats | int") -> "FoldStats":
        if isinstance(o, int) and o == 0:
            return self
        if len(o.folds) != len(self.folds):
            raise ActstoreError(f"cannot merge {len(self.folds)}- and {len(o.folds)}-fold stats")
        return FoldStats(tuple(b if a is None else a if b is None else a + b
                               for a, b in zip(self.folds, o.folds)))

    __radd__ = __add__

    def total(self) -> RidgeStats:
        return sum(f for f in self.folds if f is not None)


@dataclass(frozen=True)
class ProbeFit:
    """A fitted probe; ``lam``/``alpha`` the chosen relative/absolute penalty. ``cv_score``
    over ``lambdas`` (..., L[, T]), lower is better: CV MSE (ridge) or CV mean log-loss per
    token (logistic); None without CV."""

    weights: np.ndarray
    bias: np.ndarray
    lam: np.ndarray
    alpha: np.ndarray
    lambdas: np.ndarray
    cv_score: np.ndarray | None = None
    converged: bool = True


def fold_of(image_index: int | np.ndarray, n_folds: int = 5) -> np.ndarray:
    """Fold of each image, splitmix64(index) mod K: a hash, not ``index % K``, so folds stay
    mixed if images are stored in some order, and with no image count or seed involved a
    resumed or distributed pass puts every image in the same fold."""
    x, u = np.asarray(image_index).astype(np.uint64), np.uint64
    with np.errstate(over="ignore"):
        x = x + u(0x9E3779B97F4A7C15)
        x = (x ^ (x >> u(30))) * u(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> u(27))) * u(0x94D049BB133111EB)
    return ((x ^ (x >> u(31))) % u(n_folds)).astype(np.int64)


def _chunks(n: int, row_bytes: int) -> list[slice]:
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)] or [slice(0, 0)]


def _up(X: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Upcast for the products. float16 goes through torch, whose F16C conversion is ~10x
    numpy's astype; with numpy, converting would cost more than a narrow layer's XᵀX."""
    if X.dtype == np.float16:
        import torch
        X = torch.from_numpy(np.require(X, requirements=["C", "W"])).float().numpy()
    return X.astype(np.result_type(X.dtype, dtype), copy=False)


def _block(X: np.ndarray, Y: np.ndarray, w: np.ndarray) -> RidgeStats:
    Xf, n = _up(X), w.sum(-1)
    safe = np.where(n > 0, n, 1.0)[..., None]
    mx = np.einsum("...n,...nc->...c", w, Xf, dtype=np.float64) / safe
    my = np.einsum("...n,...nt->...t", w, Y) / safe
    Xs, Ys = Xf - mx.astype(Xf.dtype)[..., None, :], Y - my[..., None, :]
    if not (w == 1).all():
        root = np.sqrt(w)[..., None]
        Xs, Ys = Xs * root.astype(Xf.dtype), Ys * root
    XsT = np.swapaxes(Xs, -1, -2)
    return RidgeStats(n=n, mean_x=mx, mean_y=my, sxx=(XsT @ Xs).astype(np.float64),
                      sxy=(XsT @ Ys.astype(Xf.dtype)).astype(np.float64), syy=(Ys * Ys).sum(-2))


def _stats_by_fold(X, y, fold, n_groups, weights=None) -> list[RidgeStats | None]:
    """Statistics per fold of the tokens (axis -2 of X), given each token's fold, computed
    chunk by chunk so the float32 copy stays small."""
    X = np.asarray(X)
    if X.ndim < 2 or X.shape[-2] == 0:
        raise ActstoreError(f"activations must be shaped (..., tokens>0, channels), got {X.shape}")
    batch, n, C = X.shape[:-2], X.shape[-2], X.shape[-1]
    vector = y is None or np.ndim(y) == X.ndim - 1
    Y = np.zeros(batch + (n, 0)) if y is None else np.asarray(y, dtype=np.float64)
    Y = Y[..., None] if y is not None and vector else Y
    if Y.shape[:-1] != batch + (n,):
        raise ActstoreError(f"labels shaped {np.shape(y)} do not match activations {X.shape}")
    if not np.isfinite(Y).all():
        raise ActstoreError("labels contain NaN or inf; fix or mask them before fitting")
    w = np.broadcast_to(np.asarray(1.0 if weights is None else weights, np.float64), batch + (n,))

    def rows(a, i):   # select tokens along the token axis, without a copy if all are kept
        return a if np.ndim(i) and i.all() else a[(slice(None),) * len(batch) + (i,)]
    out: list[RidgeStats | None] = [None] * n_groups
    with np.errstate(invalid="ignore", over="ignore"):   # inf/NaN input is reported below
        for s in _chunks(n, 4 * C * prod(batch)):
            for g in range(n_groups):
                if (m := fold[s] == g).any():
                    st = _block(rows(rows(X, s), m), rows(rows(Y, s), m), rows(rows(w, s), m))
                    out[g] = st if out[g] is None else out[g] + st
    if not all(np.isfinite(o.mean_x).all() and np.isfinite(o.sxx).all() for o in out if o):
        raise ActstoreError("activations contain NaN or inf (float16 overflow?); cannot fit")
    return [o and replace(o, vector_target=vector) for o in out]


def accumulate(X: np.ndarray, y: np.ndarray | None = None,
               weights: np.ndarray | None = None) -> RidgeStats:
    """Statistics of one block of tokens (one image, or any token set), in bounded memory.
    X ``(..., n, C)``, float16 fine; y ``(..., n)``, ``(..., n, T)`` or None (X moments
    only, as for a Hessian); ``weights`` ``(..., n)`` for weighted moments."""
    return _stats_by_fold(X, y, np.zeros(np.shape(X)[-2], np.int64), 1, weights)[0]


def image_stats(image_index: int | np.ndarray, X: np.ndarray, y: np.ndarray,
                n_folds: int = 5) -> FoldStats:
    """The map step of the one-pass reduce: statistics of one image (scalar index) or of
    several images' tokens concatenated along axis -2 (index per token), by fold."""
    fold = fold_of(np.broadcast_to(image_index, np.shape(X)[-2:-1]), n_folds)
    return FoldStats(tuple(_stats_by_fold(X, y, fold, n_folds)))


def _scale(s: RidgeStats) -> np.ndarray:
    return np.trace(s.sxx, axis1=-2, axis2=-1) / s.sxx.shape[-1]


def _eigh(sxx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, V = np.linalg.eigh(sxx)   # round-off negatives and near-null directions -> 0
    return np.where(d > 1e-12 * d.max(-1, keepdims=True), d, 0.0), V


def _path(s: RidgeStats, lambdas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge solutions for every λ from one eigendecomposition: w (..., L, C, T),
    b (..., L, T), α (..., L). λ = 0 gives the minimum-norm least-squares solution."""
    d, V = _eigh(s.sxx)
    alpha = np.multiply.outer(_scale(s), lambdas)
    den = d[..., None, :] + alpha[..., :, None]
    inv = np.divide(1.0, den, out=np.zeros_like(den), where=den > 0)
    z = np.swapaxes(V, -1, -2) @ s.sxy
    w = V[..., None, :, :] @ (inv[..., :, :, None] * z[..., None, :, :])
    b = s.mean_y[..., None, :] - np.einsum("...c,...lct->...lt", s.mean_x, w)
    return w, b, alpha


def _sse(v: RidgeStats, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared error of (w, b) on the tokens summarised by ``v``, from ``v`` alone."""
    r0 = v.mean_y[..., None, :] - np.einsum("...c,...lct->...lt", v.mean_x, w) - b
    quad = np.einsum("...lct,...lct->...lt", w, v.sxx[..., None, :, :] @ w)
    lin = np.einsum("...lct,...ct->...lt", w, v.sxy)
    return v.syy[..., None, :] - 2 * lin + quad + v.n[..., None, None] * r0 * r0


def _finish(s: RidgeStats, w, b, alpha, lambdas, best, cv) -> ProbeFit:
    """Pick λ index ``best`` (..., T) per target and drop the target axis for 1-D y."""
    w = np.take_along_axis(w, best[..., None, None, :], axis=-3)[..., 0, :, :]
    b = np.take_along_axis(b, best[..., None, :], axis=-2)[..., 0, :]
    a = np.take_along_axis(alpha, best, axis=-1)
    sq = (lambda x: x if x is None or not s.vector_target else x[..., 0])
    return ProbeFit(sq(w), sq(b), sq(lambdas[best]), sq(a), lambdas, sq(cv))


def fit_ridge(stats: RidgeStats, lam: float) -> ProbeFit:
    """Ridge probe at one relative penalty λ (α = λ·tr(S)/C), bias unpenalised."""
    lambdas = np.asarray([lam], dtype=np.float64)
    best = np.zeros(stats.n.shape + stats.mean_y.shape[-1:], int)
    return _finish(stats, *_path(stats, lambdas), lambdas, best, None)


def fit_ridge_cv(fold_stats: FoldStats | Sequence[RidgeStats | None],
                 lambdas: Sequence[float] | np.ndarray = DEFAULT_LAMBDAS) -> ProbeFit:
    """Ridge probe with λ chosen per target by K-fold CV, then refit on all folds. Fold
    k's model is fitted on the other folds merged (α scaled by *their* trace) and scored
    on fold k's statistics; the criterion is the pooled validation MSE."""
    present = [f for f in getattr(fold_stats, "folds", fold_stats) if f is not None]
    if len(present) < 2:
        raise ActstoreError(f"cross-validation needs ≥ 2 non-empty folds, got {len(present)}")
    lambdas, sse, n = np.asarray(lambdas, dtype=np.float64), 0.0, 0.0
    for k, held in enumerate(present):
        w, b, _ = _path(sum(f for j, f in enumerate(present) if j != k), lambdas)
        sse, n = sse + _sse(held, w, b), n + held.n
    cv = sse / n[..., None, None]
    total = sum(present)
    return _finish(total, *_path(total, lambdas), lambdas, cv.argmin(-2), cv)


def predict(weights: np.ndarray, bias: np.ndarray | float, X: np.ndarray) -> np.ndarray:
    """Probe output for X ``(..., n, C)``: ``(..., n)`` for weights ``(..., C)``, ``(..., n, T)``
    for ``(..., C, T)`` (so read when the second-last axis is C); batch axes broadcast.
    Logistic probes give logits (mask = logit > 0). float32 chunks: no float16 matmul."""
    X, w = np.asarray(X), np.asarray(weights)
    vector = w.ndim < 2 or w.shape[-2] != X.shape[-1]
    W = (w[..., None] if vector else w).astype(np.result_type(X.dtype, np.float32))
    b = np.asarray(bias, dtype=np.float64)
    b = b[..., None, None] if vector else b[..., None, :]
    rows = _chunks(X.shape[-2], 4 * X.shape[-1] * prod(X.shape[:-2]))
    out = np.concatenate([_up(X[..., s, :]) @ W for s in rows], axis=-2) + b
    return out[..., 0] if vector else out


class _Hess(NamedTuple):
    """Per-model Hessian h·S, the bias eliminated by its Schur complement; h turns
    unweighted stats into the Hessian at the constant model (h = p̄(1-p̄)), else 1."""
    A: np.ndarray    # (M, C, C) h·S
    mu: np.ndarray   # (M, C) (weighted) mean of X: the bias coupling
    n: np.ndarray    # (M,) h·(weighted) count

    @classmethod
    def of(cls, stats: list[RidgeStats], h: np.ndarray | float = 1.0) -> "_Hess":
        h = np.broadcast_to(h, (len(stats),))
        return cls(h[:, None, None] * np.stack([s.sxx for s in stats]),
                   np.stack([s.mean_x for s in stats]), h * np.array([s.n for s in stats]))

    def solve(self, alpha: np.ndarray, gw: np.ndarray, gb: np.ndarray):
        """Newton direction for (w, b) given gradients, penalty α on w only."""
        A = self.A + alpha[:, None, None] * np.eye(self.A.shape[-1])
        dw = np.linalg.solve(A, (gw - self.mu * gb[:, None])[..., None])[..., 0]
        return dw, gb / self.n - (self.mu * dw).sum(1)


# Gradient passes are O(nC) and memory-bound, so float64 costs little; float32 rounding
# would stall Newton at ~1e-6. Only the O(nC²) Hessian uses float32: it may be approximate.
def _forward(X: np.ndarray, W: np.ndarray, B: np.ndarray) -> np.ndarray:
    return np.concatenate([_up(X[s], np.float64) @ W.T
                           for s in _chunks(len(X), 8 * X.shape[1])]) + B


def _backward(X: np.ndarray, R: np.ndarray) -> np.ndarray:
    return sum(R[s].T @ _up(X[s], np.float64) for s in _chunks(len(X), 8 * X.shape[1]))


def _newton(X, y, train, refresh, W, B, Z, H, alpha, tol, max_iter):
    """Newton at one α for all models at once, halving a model's step while its objective
    rises; the Hessian is refreshed only when a model converges slower than 4x per step."""
    def objective(Z, W):   # penalised log-loss of each model on its own training tokens
        return ((np.logaddexp(0.0, Z) - y[:, None] * Z) * train).sum(0) + alpha / 2 * (W * W).sum(1)
    loss = objective(Z, W)
    active, prev = np.ones(len(W), bool), np.full(len(W), np.inf)
    for _ in range(max_iter):
        R = (0.5 + 0.5 * np.tanh(0.5 * Z) - y[:, None]) * train
        dw, db = H.solve(alpha, _backward(X, R) + alpha[:, None] * W, R.sum(0))
        dw[~active], db[~active] = 0.0, 0.0
        size = np.maximum(np.abs(dw).max(1), np.abs(db)) / np.maximum(1.0, np.abs(W).max(1))
        Zd, t = _forward(X, dw, db), np.ones(len(W))
        for _ in range(40):
            new = objective(Z - t * Zd, W - t[:, None] * dw)
            bad = active & (new > loss + 1e-13 * np.abs(loss))
            if not bad.any():
                break
            t[bad] *= 0.5
        t[bad] = 0.0          # no decrease at any step size: at the precision limit
        W, B, Z, loss = W - t[:, None] * dw, B - t * db, Z - t * Zd, np.where(bad, loss, new)
        active &= (size > tol) & ~bad
        if not active.any():
            break
        slow, prev = (size > 0.25 * prev) | (t < 1), size
        if (slow & active).any() and t[-1] * size[-1] > 0:
            H = refresh(Z[:, -1])
    return W, B, Z, H, not active.any()


def _logistic(X, y, fold, n_groups, cv, lambdas, tol, max_iter, stats) -> ProbeFit:
    """Regularisation path, strong to weak λ with warm starts, for the K fold models and
    the full model together, so each pass over the in-memory X serves all K+1 of them."""
    X, y, lambdas = np.asarray(X), np.asarray(y, np.float64), np.asarray(lambdas, np.float64)
    if X.ndim != 2 or y.shape != X.shape[:1]:
        raise ActstoreError(f"logistic probe needs X (n, C), y (n,), got {X.shape}, {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all() or (lambdas <= 0).any():
        raise ActstoreError("logistic probe needs labels in {0, 1} (pooled mask > 0.5) and λ > 0")
    F = list(getattr(stats, "folds", stats)) if stats else _stats_by_fold(X, y, fold, n_groups)
    if len(F) != n_groups:
        raise ActstoreError(f"fold_stats has {len(F)} folds, expected {n_groups}")
    present = [g for g in range(n_groups) if F[g] is not None]
    held = present if cv else []
    if cv and len(held) < 2:
        raise ActstoreError(f"cross-validation needs ≥ 2 non-empty folds, got {len(held)}")
    train = np.stack([fold != g for g in held] + [np.ones(len(y), bool)], axis=1)

    def per_model(S):     # training-set statistics of each model: all folds but its own
        return [sum(S[j] for j in present if j != g) for g in held] + [sum(S[j] for j in present)]

    # Hessian refreshes: per-fold XᵀWX at the full model's weights, on a strided subsample
    # of ≤ ~256·C tokens (it only preconditions; the exact gradient decides), upcast once.
    k = max(1, len(y) // (HESSIAN_TOKENS * X.shape[1]))
    X_sub, fold_sub = _up(X[::k]), fold[::k]

    def refresh(z):
        p = 0.5 + 0.5 * np.tanh(0.5 * z[::k])
        return _Hess.of(per_model(_stats_by_fold(X_sub, None, fold_sub, n_groups,
                                                 k * p * (1 - p))))

    T = per_model(F)
    scale = np.array([_scale(t) for t in T])   # each model's α = λ·scale, its own training set
    ybar = np.clip([float(t.mean_y[0]) for t in T], 1e-6, 1 - 1e-6)
    H = _Hess.of(T, ybar * (1 - ybar))   # the exact Hessian at the intercept-only model
    # Warm start = first Newton step from the intercept-only model = the ridge solution at
    # α/(p̄(1-p̄)), divided by p̄(1-p̄): the linear-probability model mapped to logits.
    W = -H.solve(lambdas.max() * scale, -np.stack([t.sxy[:, 0] for t in T]), np.zeros(len(T)))[0]
    B = np.log(ybar / (1 - ybar)) - (H.mu * W).sum(1)
    X64 = _up(X, np.float64) if X.size * 8 <= RESIDENT_BYTES else X
    Z = _forward(X64, W, B)
    path_w, path_b = np.zeros((len(lambdas),) + W.shape), np.zeros((len(lambdas), len(B)))
    score, converged = np.full(len(lambdas), np.nan), True
    for li in np.argsort(-lambdas):   # validation loss is flat at the optimum: PATH_TOL will do
        W, B, Z, H, ok = _newton(X64, y, train, refresh, W, B, Z, H, lambdas[li] * scale,
                                 max(tol, PATH_TOL), min(max_iter, PATH_MAX_ITER))
        converged &= ok
        path_w[li], path_b[li] = W, B
        if cv:
            ll = np.logaddexp(0.0, Z) - y[:, None] * Z
            score[li] = sum(ll[fold == g, m].sum() for m, g in enumerate(held)) / len(y)
    best = int(np.nanargmin(score)) if cv else 0
    W, B = path_w[best], path_b[best]   # polish the chosen λ's models to ``tol``
    W, B, _, _, ok = _newton(X64, y, train, refresh, W, B, _forward(X64, W, B), H,
                             lambdas[best] * scale, tol, max_iter)
    return ProbeFit(W[-1], np.float64(B[-1]), np.float64(lambdas[best]),
                    np.float64(lambdas[best] * scale[-1]), lambdas, score if cv else None,
                    bool(converged and ok))


def fit_logistic(X: np.ndarray, y: np.ndarray, lam: float, tol: float = 1e-6,
                 max_iter: int = 100, stats: RidgeStats | None = None) -> ProbeFit:
    """L2 logistic probe at one λ on one cell's tokens held in memory (read from the store
    once), X ``(n, C)`` float16/32, y ``(n,)`` in {0, 1}. ``stats``, this cell's
    :func:`accumulate` from the ridge pass, saves one pass over X."""
    fold, F = np.zeros(len(X), np.int64), None if stats is None else [stats]
    return _logistic(X, y, fold, 1, False, [lam], tol, max_iter, F)


def fit_logistic_cv(X: np.ndarray, y: np.ndarray, image_index: np.ndarray,
                    lambdas: Sequence[float] | np.ndarray = LOGISTIC_LAMBDAS, n_folds: int = 5,
                    tol: float = 1e-6, max_iter: int = 100,
                    fold_stats: FoldStats | None = None) -> ProbeFit:
    """L2 logistic probe with λ chosen by image-level K-fold CV (validation log-loss).
    ``image_index`` ``(n,)`` gives each token's image, hence its fold (:func:`fold_of`);
    ``fold_stats`` from the ridge pass over the same tokens saves one pass over X."""
    fold = fold_of(np.asarray(image_index), n_folds)
    if np.shape(fold) != (len(X),):
        raise ActstoreError(f"image_index needs one entry per token, got {np.shape(fold)}")
    return _logistic(X, y, fold, n_folds, True, lambdas, tol, max_iter, fold_stats)
