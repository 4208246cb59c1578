"""Sufficient statistics of token sets: what the store's one read pass leaves behind.

Least squares needs only second moments: :func:`accumulate` or :func:`image_stats` per
block, merged with ``+`` (associative: Dask can tree-reduce) or :func:`pool`; image-level
CV folds (:func:`fold_of`) keep their own statistics, so every fold model comes from the
total minus one fold (:mod:`actstore.probe.solvers`).

Statistics are centred (means and co-moments, merged by Chan's formula): raw XᵀX, Xᵀy, yᵀy
(XᵀX = sxx + n·mean_x·mean_xᵀ) without their cancellation when channel means are large.
Products in float32, sums in float64; a block's co-moments stay float32 until merged.
X ``(..., n, C)``: leading axes batch cells; y ``(..., n, T)`` carries T targets sharing XᵀX.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod
from typing import Sequence

import numpy as np
import numpy.typing as npt
from scipy.linalg.blas import dgemm as _dgemm
from scipy.linalg.blas import dger as _dger
from scipy.linalg.blas import sger as _sger

from actstore.errors import ActstoreError
from actstore.probe.upcast import PIECE_BYTES, copy_into, row_chunks, scratch_buffer


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
        return self._moved(o, n, fb, self.n * fb, 1.0)      # c = n_a n_b / n

    def __sub__(self, o: "RidgeStats") -> "RidgeStats":
        """The statistics of this token set without ``o``'s tokens (a subset of them): a
        fold model's training set from the total in one step instead of K-2 merges."""
        n = self.n - o.n
        fb = np.divide(o.n, n, out=np.zeros_like(n), where=n > 0)
        return self._moved(o, n, -fb, self.n * fb, -1.0)    # c = n n_o / (n - n_o)

    def _moved(self, o, n, fb, c, sign) -> "RidgeStats":
        """Chan's merge (sign +1) or its inverse (-1): means move by fb·(o's - ours), the
        co-moments add or lose o's and the spread of the two means. The C×C update is done
        in place on one new array: at C = 1280 these merges cost as much as a block's
        Gram product."""
        dx, dy = o.mean_x - self.mean_x, o.mean_y - self.mean_y
        sxx = (np.add if sign > 0 else np.subtract)(self.sxx, o.sxx, dtype=np.float64)
        _rank1(sxx, dx, sign * c)
        return replace(
            self, n=n, mean_x=self.mean_x + fb[..., None] * dx,
            mean_y=self.mean_y + fb[..., None] * dy, sxx=sxx,
            sxy=(self.sxy + sign * o.sxy) + (sign * c)[..., None, None] * dx[..., :, None]
            * dy[..., None, :],
            syy=self.syy + sign * o.syy + (sign * c)[..., None] * dy * dy)

    __radd__ = __add__

    def cell(self, key: int | slice | np.ndarray | None) -> "RidgeStats":
        """The statistics of the cells ``key`` picks on the leading (cell) axes: an index
        or slice of steps, or ``None`` for a new leading axis of one cell."""
        return replace(self, **{f: np.asarray(getattr(self, f))[key] for f in _ARRAYS})


_ARRAYS = ("n", "mean_x", "mean_y", "sxx", "sxy", "syy")   # RidgeStats' per-cell fields


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

    def cell(self, key: int | slice | np.ndarray | None) -> "FoldStats":
        """Every fold's :meth:`RidgeStats.cell`."""
        return FoldStats(tuple(f and f.cell(key) for f in self.folds))

    def total(self) -> RidgeStats:
        return pool([f for f in self.folds if f is not None])


def _rank1(A: np.ndarray, x: np.ndarray, c: np.ndarray | float) -> None:
    """A += c·x·xᵀ in place for symmetric A (..., C, C) (BLAS ``ger`` on A's transpose, a
    Fortran view of the same memory): no C×C temporary, one pass over A instead of three."""
    c = np.broadcast_to(np.asarray(c, np.float64), A.shape[:-2])
    if A.shape[-1] < 256:   # narrow: one vectorised update beats a BLAS call per cell
        A += (c[..., None, None] * x[..., :, None]) * x[..., None, :]
        return
    ger = {np.dtype(np.float64): _dger, np.dtype(np.float32): _sger}.get(A.dtype)
    for i in np.ndindex(A.shape[:-2]):
        a = A[i]
        if ger is not None and a.flags.c_contiguous and c[i] != 0:
            out = ger(float(c[i]), x[i], x[i], a=a.T, overwrite_a=1)
            if not np.may_share_memory(out, a):
                a[...] = out.T   # pragma: no cover  (BLAS made a copy after all)
        elif c[i] != 0:
            a += (c[i] * x[i][:, None]) * x[i][None, :]


def _lowrank(A: np.ndarray, D: np.ndarray) -> None:
    """A += D·Dᵀ in place for float64 A (..., C, C), D (..., C, k): BLAS ``gemm`` with β = 1
    on A's transpose (A is symmetric), one pass over A where ``A += D @ Dᵀ`` makes a C×C
    temporary and two more."""
    if A.shape[-1] < 256:
        A += D @ np.swapaxes(D, -1, -2)
        return
    for i in np.ndindex(A.shape[:-2]):
        out = _dgemm(1.0, D[i], D[i], beta=1.0, c=A[i].T, trans_b=1, overwrite_c=1)
        if not np.may_share_memory(out, A[i]):
            A[i] = out.T   # pragma: no cover  (BLAS made a copy after all)


def pool(parts: Sequence[RidgeStats]) -> RidgeStats:
    """The statistics of the union of disjoint token sets in one step: Chan's formula for
    K parts at once, ΣS_j + Σ n_j·d_j·d_jᵀ with d_j = mean_j − pooled mean, the K rank-one
    terms as one product. At C = 1280 a merge of two C×C statistics costs as much as a
    4-image Gram product; pooling K of them costs K additions, not K−1 merges."""
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]
    n = sum(p.n for p in parts)
    safe = np.where(n > 0, n, 1.0)
    share = [p.n / safe for p in parts]
    mx = sum(f[..., None] * p.mean_x for f, p in zip(share, parts))
    my = sum(f[..., None] * p.mean_y for f, p in zip(share, parts))
    root = [np.sqrt(p.n)[..., None] for p in parts]
    dx = np.stack([r * (p.mean_x - mx) for r, p in zip(root, parts)], axis=-1)   # (..., C, K)
    dy = np.stack([r * (p.mean_y - my) for r, p in zip(root, parts)], axis=-1)   # (..., T, K)
    sxx = np.array(parts[0].sxx, np.float64, copy=True)
    for p in parts[1:]:
        sxx += p.sxx
    _lowrank(sxx, dx)
    return replace(parts[0], n=n, mean_x=mx, mean_y=my, sxx=sxx,
                   sxy=sum(p.sxy for p in parts) + dx @ np.swapaxes(dy, -1, -2),
                   syy=sum(p.syy for p in parts) + (dy * dy).sum(-1))


def fold_of(image_index: int | np.ndarray, n_folds: int = 5) -> np.ndarray:
    """Fold of each image, splitmix64(index) mod K: a hash, not ``index % K``, so folds stay
    mixed if images are stored in some order, and with no image count or seed involved a
    resumed or distributed pass puts every image in the same fold."""
    return (splitmix64(np.asarray(image_index)) % np.uint64(n_folds)).astype(np.int64)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function of each key: well-mixed uint64 from consecutive keys."""
    x, u = np.asarray(x).astype(np.uint64), np.uint64
    with np.errstate(over="ignore"):
        x = x + u(0x9E3779B97F4A7C15)
        x = (x ^ (x >> u(30))) * u(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> u(27))) * u(0x94D049BB133111EB)
    return x ^ (x >> u(31))


CENTRE_ROWS = 256   # tokens of a chunk, evenly spaced, whose mean is its centring point c
RUN_BYTES = 64 << 10   # shorter runs of one fold (mean, float32) are put in order by a copy


def _runs(f: np.ndarray, bounds: np.ndarray) -> list[tuple[int, int, int, int]]:
    """A chunk's runs of consecutive tokens of one group (source start, stop, destination
    start, group) in a stable group order whose groups span [bounds[g], bounds[g+1]): a
    block's tokens come image by image, so its runs are its images at most."""
    edges = np.flatnonzero(f[1:] != f[:-1]) + 1
    cursor = bounds[:-1].copy()
    runs = []
    for a, b in zip(np.r_[0, edges].tolist(), np.r_[edges, len(f)].tolist()):
        g = int(f[a])
        runs.append((a, b, int(cursor[g]), g))
        cursor[g] += b - a
    return runs


def _centred_copy(X: np.ndarray, w: np.ndarray, f: np.ndarray, bounds: np.ndarray,
                  R: np.ndarray, weighted: bool):
    """X's tokens in group order (``bounds``), upcast and centred on c, in this thread's
    scratch buffer, with each group's float64 sums Σw·x of the values before centring and
    Σ(x − c)·r of the rows ``R`` (in group order: the targets' weighted residuals); made
    piece by piece (:data:`PIECE_BYTES`) so that converting, summing, centring and
    multiplying a piece is one trip to memory, not four passes over the chunk, and with
    no float16 copy to put it in order. c is the mean of :data:`CENTRE_ROWS` spread tokens:
    any point near the groups' means serves (their offsets from c are corrected exactly),
    and c must be known before the first piece is centred."""
    Xf = scratch_buffer(X.shape, np.result_type(X.dtype, np.float32))
    if Xf[..., :1, :].nbytes * len(f) < RUN_BYTES * (np.count_nonzero(f[1:] != f[:-1]) + 1):
        order = np.argsort(f, kind="stable")   # short runs: a call each costs more than a copy
        X, w, f = X[..., order, :], w[..., order], f[order]
    probe = np.linspace(0, X.shape[-2] - 1, min(X.shape[-2], CENTRE_ROWS)).round().astype(int)
    c = X[..., probe, :].mean(-2, dtype=np.float64).astype(Xf.dtype)
    n_groups, batch, C = len(bounds) - 1, X.shape[:-2], X.shape[-1]
    sums, sxy = np.zeros((n_groups,) + batch + (C,)), np.zeros((n_groups,) + batch + (C, R.shape[-1]))
    step = max(1, PIECE_BYTES // (Xf.itemsize * prod(batch) * C))
    for a, b, d, g in _runs(f, bounds):
        for i in range(a, b, step):
            j = min(i + step, b)
            dst = Xf[..., d + i - a:d + j - a, :]
            copy_into(dst, X[..., i:j, :])
            sums[g] += (np.einsum("...n,...nc->...c", w[..., i:j], dst, dtype=np.float64)
                        if weighted else dst.sum(-2, dtype=np.float64))
            dst -= c[..., None, :]
            sxy[g] += np.swapaxes(dst, -1, -2) @ R[..., d + i - a:d + j - a, :]
    return Xf, sums, sxy, c


def _grouped(X: np.ndarray, Y: np.ndarray, w: np.ndarray, f: np.ndarray, n_groups: int,
             weighted: bool) -> list[RidgeStats | None]:
    """Statistics of each group of one chunk's tokens (axis -2; ``f`` each token's group),
    from one upcast copy in group order centred on a point c (:func:`_centred_copy`):
    each group's co-moments are the Gram product of its rows (a view, no copy) corrected
    by its mean's offset d = mean − c, Σ(x − mean)(x − mean)ᵀ = Σ(x − c)(x − c)ᵀ − n·d·dᵀ;
    c is near every group's mean, so nothing cancels. Means are summed in float64, Xᵀy
    in float32 per piece, in float64 across pieces."""
    order = np.argsort(f, kind="stable")
    Y, ws = Y[..., order, :], w[..., order]
    bounds = np.r_[0, np.cumsum(np.bincount(f, minlength=n_groups))]
    groups = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    n = [ws[..., g].sum(-1) for g in groups]
    safe = [np.where(k > 0, k, 1.0)[..., None] for k in n]
    my = [np.einsum("...n,...nt->...t", ws[..., g], Y[..., g, :]) / sf
          for g, sf in zip(groups, safe)]
    Ys = np.concatenate([Y[..., g, :] - m[..., None, :] for g, m in zip(groups, my)], -2)
    R = (Ys * ws[..., None] if weighted else Ys).astype(np.result_type(X.dtype, np.float32))
    Xf, sums, sxy, c = _centred_copy(X, w, f, bounds, R, weighted)
    if weighted:
        Xf *= np.sqrt(ws)[..., None].astype(Xf.dtype)   # the Gram products weigh w
    out: list[RidgeStats | None] = []
    for g, k, sf, m, sm, sy in zip(groups, n, safe, my, sums, sxy):
        if g.start == g.stop:
            out.append(None)
            continue
        d = sm / sf - c
        sxx = np.swapaxes(Xf[..., g, :], -1, -2) @ Xf[..., g, :]   # float32 (merges promote):
        _rank1(sxx, d, -k)         # no float64 copy of K C×C per task; the offset by BLAS ger
        wy = Ys[..., g, :] * np.sqrt(ws[..., g])[..., None] if weighted else Ys[..., g, :]
        out.append(RidgeStats(n=k, mean_x=sm / sf, mean_y=m, sxx=sxx, sxy=sy,
                              syy=(wy * wy).sum(-2)))
    return out


def stats_by_fold(X: npt.ArrayLike, y: npt.ArrayLike | None, fold: np.ndarray, n_groups: int,
                  weights: np.ndarray | None = None) -> list[RidgeStats | None]:
    """Statistics per fold of the tokens (axis -2 of X), given each token's fold, computed
    chunk by chunk so the float32 copy stays small. A chunk's tokens are put in fold order
    as they are upcast (:func:`_centred_copy`), so each fold is a slice of one copy."""
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
    weighted = weights is not None and not (np.asarray(weights) == 1).all()
    w = np.broadcast_to(np.asarray(1.0 if weights is None else weights, np.float64), batch + (n,))
    fold = np.asarray(fold)
    out: list[RidgeStats | None] = [None] * n_groups
    with np.errstate(invalid="ignore", over="ignore"):   # inf/NaN input is reported below
        for s in row_chunks(n, 4 * C * prod(batch)):
            groups = _grouped(X[..., s, :], Y[..., s, :], w[..., s], fold[s], n_groups, weighted)
            for g, st in enumerate(groups):
                if st is not None:
                    out[g] = st if out[g] is None else out[g] + st
    # finite means mean finite input; with it a Gram product's diagonal bounds the rest
    if not all(np.isfinite(o.mean_x).all() and np.isfinite(np.diagonal(o.sxx, 0, -2, -1)).all()
               for o in out if o):
        raise ActstoreError("activations contain NaN or inf (float16 overflow?); cannot fit")
    return [o and replace(o, vector_target=vector) for o in out]


def accumulate(X: np.ndarray, y: np.ndarray | None = None,
               weights: np.ndarray | None = None) -> RidgeStats:
    """Statistics of one block of tokens (one image, or any token set), in bounded memory.
    X ``(..., n, C)``, float16 fine; y ``(..., n)``, ``(..., n, T)`` or None (X moments
    only, as for a Hessian); ``weights`` ``(..., n)`` for weighted moments."""
    return stats_by_fold(X, y, np.zeros(np.shape(X)[-2], np.int64), 1, weights)[0]


def image_stats(image_index: int | np.ndarray, X: np.ndarray, y: np.ndarray,
                n_folds: int = 5) -> FoldStats:
    """The map step of the one-pass reduce: statistics of one image (scalar index) or of
    several images' tokens concatenated along axis -2 (index per token), by fold."""
    fold = fold_of(np.broadcast_to(image_index, np.shape(X)[-2:-1]), n_folds)
    return FoldStats(tuple(stats_by_fold(X, y, fold, n_folds)))
