"""Quasi-Newton steps for L2 logistic models, many cells in lockstep.

A mask target's probe run fits one logistic model per (layer, step) cell, K + 1 models at
once per cell (:mod:`actstore.probe.logistic`), by a few dozen passes over the cell's
tokens. At the toy's widths (C ≤ 64, ≤ 10k tokens) a pass is small, and what a cell cost
(6–35 CPU ms) was mostly Python per step and the page faults of fresh temporaries
(numpy's ~0.5 MB arrays come from the kernel anew: ``np.exp(-np.abs(Z))`` cost 7× the
``exp``). Here every cell of one layer (each step: the same tokens, labels and folds, its
own activations) moves in lockstep: a tick makes one quasi-Newton step of every cell
still running, through batched products and preallocated buffers, while each cell's
arithmetic is what it would be alone: its own α sequence, curvature pairs, Hessian
refreshes, line search and stopping, the same operations in the same order.

Objective per model Σ wᵢ·logloss + (α/2)‖w‖², bias unpenalised; quasi-Newton directions
are L-BFGS pairs (:class:`Pairs`) over the Hessian h·S of the constant model
(:class:`Hess`), refreshed when the passes since the last cost twice a refresh.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import numpy.typing as npt

from actstore.probe.shifted import EIG_FLOOR, Tridiagonal
from actstore.probe.upcast import row_chunks, upcast

EIGEN_MAX_C = 256   # narrower Hessians by eigendecomposition: every cell's solve in one product


class Hess:
    """Per cell, the full model's h·S (eigendecomposition up to :data:`EIGEN_MAX_C`
    channels, else its tridiagonal reduction, :mod:`shifted`), the bias eliminated by its
    Schur complement. Model m uses c_m times it, c_m its share of the training tokens:
    one factorisation per refresh serves every model and every α."""

    def __init__(self, sxx: np.ndarray, mu: np.ndarray, c: np.ndarray, n: np.ndarray):
        self.mu, self.c, self.n = np.array(mu, np.float64), c, n   # (S, C), (S, M), (S, M)
        self.eig = sxx.shape[-1] <= EIGEN_MAX_C
        if self.eig:
            self.d, self.V = np.linalg.eigh(np.asarray(sxx, np.float64))
        else:
            self.tri = [Tridiagonal(s) for s in sxx]

    @classmethod
    def of(cls, sxx: np.ndarray, mu: np.ndarray, n: np.ndarray, c: np.ndarray,
           h: npt.ArrayLike) -> "Hess":
        """h·S of statistics (sxx (S, C, C), mean mu (S, C), count n (S,)), shares c."""
        h = np.asarray(h, np.float64)
        return cls(h[:, None, None] * sxx, mu, c, c * h[:, None] * n[:, None])

    def set(self, k: int, one: "Hess") -> None:
        """Cell k refreshed (``one``: a single cell)."""
        self.mu[k], self.n[k] = one.mu[0], one.n[0]
        if self.eig:
            self.d[k], self.V[k] = one.d[0], one.V[0]
        else:
            self.tri[k] = one.tri[0]

    @staticmethod
    def stack(parts: dict, idx: np.ndarray, models: slice = slice(None)) -> "Hess":
        """The single-cell Hessians ``parts[i]`` of cells ``idx`` as one."""
        one = [parts[i].take([0], models) for i in idx]
        out = object.__new__(Hess)
        out.eig = one[0].eig
        for name in ("mu", "c", "n") + (("d", "V") if out.eig else ()):
            setattr(out, name, np.concatenate([getattr(h, name) for h in one]))
        if not out.eig:
            out.tri = [h.tri[0] for h in one]
        return out

    def take(self, idx: np.ndarray | list[int], models: slice = slice(None)) -> "Hess":
        out = object.__new__(Hess)
        out.mu, out.c, out.n = self.mu[idx], self.c[idx, models], self.n[idx, models]
        out.eig = self.eig
        if self.eig:
            out.d, out.V = self.d[idx], self.V[idx]
        else:
            out.tri = [self.tri[i] for i in idx]
        return out

    def solve(self, alpha: np.ndarray, gw: np.ndarray,
              gb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Newton direction for (w, b) of each cell's models: alpha, gb (S, M), gw (S, M, C)."""
        g = gw - self.mu[:, None, :] * gb[..., None]
        if self.eig:
            den = self.c[..., None] * self.d[:, None, :] + alpha[..., None]
            u = g @ self.V
            keep = den > EIG_FLOOR * den.max(-1, keepdims=True)
            u = np.divide(u, den, out=np.zeros_like(u), where=keep)
            dw = u @ np.swapaxes(self.V, -1, -2)
        else:
            dw = np.stack([t.solve(gi.T, a, c).T
                           for t, gi, a, c in zip(self.tri, g, alpha, self.c)])
        return dw, gb / self.n - (dw @ self.mu[..., None])[..., 0]


class Pairs:
    """Curvature pairs (s, y) of each cell's last steps, per model, for L-BFGS directions
    preconditioned by :class:`Hess` (the two-loop recursion, H⁻¹ its initial inverse).
    With H fixed at h·S, Newton converges linearly (25-30 steps at weak λ on SD's C = 1280
    cells); the pairs, O(C) each per step, make it superlinear without a refresh. Kept
    along the λ path: a pair's y moves by Δα·s when α changes. Slots are newest last; a
    cell's empty slots are zeros with ρ = 0, which the recursion passes over unchanged."""

    def __init__(self, cells: int, models: int, width: int, memory: int = 8):
        self.s = np.zeros((cells, memory, models, width))
        self.y = np.zeros_like(self.s)
        self.rho = np.zeros(self.s.shape[:-1])
        self.alpha = np.full((cells, models), np.nan)

    @staticmethod
    def stack(parts: dict, idx: np.ndarray, models: slice = slice(None)) -> "Pairs":
        """The single-cell pairs ``parts[i]`` of cells ``idx`` as one."""
        one = [parts[i].take([0], models) for i in idx]
        out = object.__new__(Pairs)
        for name in ("s", "y", "rho", "alpha"):
            setattr(out, name, np.concatenate([getattr(p, name) for p in one]))
        return out

    def take(self, idx: np.ndarray | list[int], models: slice = slice(None)) -> "Pairs":
        out = object.__new__(Pairs)
        out.s, out.y = self.s[idx][:, :, models].copy(), self.y[idx][:, :, models].copy()
        out.rho, out.alpha = self.rho[idx][:, :, models].copy(), self.alpha[idx][:, models].copy()
        return out

    def add(self, cells: np.ndarray, s: np.ndarray, y: np.ndarray) -> None:
        """One pair per model of each cell in the mask ``cells``; a pair without positive
        curvature (a model that did not move, or rounding) gets ρ = 0."""
        if not cells.any():
            return
        self.s[cells, :-1], self.y[cells, :-1] = self.s[cells, 1:], self.y[cells, 1:]
        self.s[cells, -1], self.y[cells, -1] = s[cells], y[cells]
        self._rho()

    def _rho(self) -> None:
        sy = (self.s * self.y).sum(-1)
        big = 1e-10 * np.sqrt((self.s ** 2).sum(-1) * (self.y ** 2).sum(-1))
        self.rho = np.where(sy > big, 1.0 / np.where(sy > big, sy, 1.0), 0.0)

    def at(self, cells: np.ndarray, alpha: np.ndarray) -> None:
        """α of the cells in the mask ``cells`` (alpha (S, M)) set, their pairs moved."""
        moved = cells & ~np.isnan(self.alpha).any(-1)
        if moved.any():
            delta = (alpha - self.alpha)[moved]
            self.y[moved, ..., :-1] += delta[:, None, :, None] * self.s[moved, ..., :-1]
            self._rho()
        self.alpha[cells] = alpha[cells]

    def direction(self, H: Hess, alpha: np.ndarray, gw: np.ndarray,
                  gb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q, a = np.concatenate([gw, gb[..., None]], axis=-1), []
        for i in range(self.s.shape[1] - 1, -1, -1):
            a.append(self.rho[:, i] * (self.s[:, i] * q).sum(-1))
            q -= a[-1][..., None] * self.y[:, i]
        dw, db = H.solve(alpha, q[..., :-1], q[..., -1])
        r = np.concatenate([dw, db[..., None]], axis=-1)
        for i, ai in zip(range(self.s.shape[1]), reversed(a)):
            r += (ai - self.rho[:, i] * (self.y[:, i] * r).sum(-1))[..., None] * self.s[:, i]
        return r[..., :-1], r[..., -1]


# Gradient passes are O(nC) and memory-bound: float64 doubles their cost, but float32
# rounding (~1e-7 of each product) would stall Newton near 1e-6. So the λ path, which stops
# at PATH_TOL, passes in float32, and only a polish to a tighter tolerance in float64.
# Z and the sums stay float64 either way. Logits are model-major (S, M, n): the
# elementwise work runs along tokens, contiguous. The products go through torch: at
# M = 6 models numpy's BLAS made them 1.5-3x slower (10k × 32 tokens: 0.15 → 0.06 ms
# forward, 0.10 → 0.03 backward; 25.6k × 1280: 25 → 19 and 31 → 17 ms, one thread).
def _torch(a: np.ndarray):
    import torch
    return torch.from_numpy(np.require(a, requirements=["W"]))


def forward(X: np.ndarray, W: np.ndarray, B: np.ndarray, dt: npt.DTypeLike,
            out: np.ndarray | None = None) -> np.ndarray:
    """Logits (S, M, n) of models W (S, M, C), B (S, M) on X (S, n, C)."""
    Wt = _torch(np.ascontiguousarray(W, dtype=dt))
    S, n = X.shape[:2]
    out = np.empty((S, W.shape[1], n)) if out is None else out
    for s in row_chunks(n, 8 * X.shape[2] * S):
        prod = (Wt @ _torch(upcast(X[:, s], dt, scratch=True)).transpose(1, 2)).numpy()
        np.add(prod, B[..., None], out=out[..., s])
    return out


def backward(X: np.ndarray, R: np.ndarray, dt: npt.DTypeLike) -> np.ndarray:
    """Σ over tokens of R (S, M, n) times X (S, n, C): (S, M, C)."""
    return sum((_torch(R[..., s].astype(dt)) @ _torch(upcast(X[:, s], dt, scratch=True))
                ).numpy().astype(np.float64, copy=False)
               for s in row_chunks(X.shape[1], 8 * X.shape[2] * len(X)))


class Lockstep:
    """Quasi-Newton for every cell at each α of its own sequence, in lockstep ticks.

    X (S, n, C) each cell's tokens (float32 or float64: the passes' precision), y (n,),
    train (M, n) each model's token weights (0 off its training set), W (S, M, C), B
    (S, M) the starting models; ``refresh(k, z)`` a single-cell :class:`Hess` of cell k
    at its full model's logits z; ``cost`` passes a refresh is worth. :meth:`run` takes
    alphas (S, L, M) and lengths (S,) and calls ``done(k, i, W, B, Z, converged)`` as
    cell k finishes its i-th α."""

    def __init__(self, X, y, train, H: Hess, pairs: Pairs, W, B, refresh: Callable,
                 cost: float):
        self.X, self.y, self.train, self.H, self.pairs = X, y, train, H, pairs
        self.W, self.B, self.refresh, self.cost = W, B, refresh, cost
        self.dt = X.dtype
        self.final_H, self.final_pairs = {}, {}   # per cell, as it finished its last α
        shape = (len(X), W.shape[1], X.shape[1])
        self.buf = {k: np.empty(shape) for k in ("Z", "Zt", "Zd", "p", "pt", "e", "ll", "R")}
        forward(X, W, B, self.dt, out=self.buf["Z"])

    def objective(self, Z: np.ndarray, W: np.ndarray, alpha: np.ndarray,
                  p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Penalised log-loss of each model on its own training tokens (S, M), the
        unpenalised part, and σ(Z) into ``p`` (one exp per entry for both, no where)."""
        e, ll = self.buf["e"][:len(Z)], self.buf["ll"][:len(Z)]
        np.abs(Z, out=e)
        np.negative(e, out=e)
        np.exp(e, out=e)
        np.maximum(Z, 0.0, out=ll)
        ll += np.log1p(e, out=p)
        ll -= np.multiply(self.y, Z, out=p)
        ll *= self.train
        part = ll.sum(-1)
        np.add(e, 1.0, out=p)
        np.divide(1.0, p, out=p)                      # 1/(1+e^-|z|)
        np.exp(np.minimum(Z, 0.0, out=ll), out=ll)    # 1 where z ≥ 0, e^-|z| below
        p *= ll
        return part + alpha / 2 * (W * W).sum(-1), part

    def run(self, alphas: np.ndarray, lengths: np.ndarray, tol: float, max_iter: int,
            done: Callable) -> None:
        S, M = self.W.shape[:2]
        cells = np.arange(S)                               # working set → cell ids
        li, it = np.zeros(S, int), np.zeros(S, int)
        run, start = lengths > 0, np.zeros(S, bool)
        passes = np.zeros(S)
        alpha = alphas[np.arange(S), 0]
        self.pairs.at(run, alpha)
        loss, part = self.objective(self.buf["Z"], self.W, alpha, self.buf["p"])
        active, prev = np.ones((S, M), bool), np.full((S, M), np.inf)
        last_s = last_g = None
        has_last = np.zeros(S, bool)
        while run.any():
            b = self.buf
            if start.any():   # a new α: its objective from the last evaluation's parts
                self.pairs.at(start, alpha)
                w = self.W[start]
                loss[start] = part[start] + alpha[start] / 2 * (w * w).sum(-1)
                active[start], prev[start], has_last[start] = True, np.inf, False
                start[:] = False
            Z, p, R, W = b["Z"], b["p"], b["R"], self.W
            np.subtract(p, self.y, out=R)
            R *= self.train
            gw, gb = backward(self.X, R, self.dt) + alpha[..., None] * W, R.sum(-1)
            g = np.concatenate([gw, gb[..., None]], axis=-1)
            if last_s is not None:
                self.pairs.add(has_last & run, last_s, g - last_g)
            dw, db = self.pairs.direction(self.H, alpha, gw, gb)
            dw[~active], db[~active] = 0.0, 0.0
            size = np.maximum(np.abs(dw).max(-1), np.abs(db)) / np.maximum(1.0, np.abs(W).max(-1))
            Zd, Zt, pt = forward(self.X, dw, db, self.dt, out=b["Zd"]), b["Zt"], b["pt"]
            t = np.ones((len(W), M))
            for _ in range(40):
                np.subtract(Z, np.multiply(Zd, t[..., None], out=Zt), out=Zt)
                new, part_new = self.objective(Zt, W - t[..., None] * dw, alpha, pt)
                bad = active & (new > loss + 1e-13 * np.abs(loss))
                if not bad.any():
                    break
                t[bad] *= 0.5
            if bad.any():      # no decrease at any step size: at the precision limit
                t[bad] = 0.0
                np.subtract(Z, np.multiply(Zd, t[..., None], out=Zt), out=Zt)
                np.copyto(pt, p, where=bad[..., None])
            self.W, self.B = W - t[..., None] * dw, self.B - t * db
            loss, part = np.where(bad, loss, new), np.where(bad, part, part_new)
            b["Z"], b["Zt"], b["p"], b["pt"] = Zt, Z, pt, p
            last_s = -t[..., None] * np.concatenate([dw, db[..., None]], axis=-1)
            last_g, has_last = g, run.copy()
            active &= (size > tol) & ~bad
            it += run
            going = run & active.any(-1)
            slow = (size > 0.25 * prev) | (t < 1)
            prev = size
            passes += going
            for k in np.flatnonzero(going & slow[:, -1] & active[:, -1]
                                    & (t[:, -1] * size[:, -1] > 0) & (passes >= self.cost)):
                passes[k] = 0.0
                self.H.set(k, self.refresh(cells[k], b["Z"][k, -1]))
            for k in np.flatnonzero(run & (~going | (it >= max_iter))):
                done(cells[k], li[k], self.W[k], self.B[k], b["Z"][k], not active[k].any())
                li[k], it[k] = li[k] + 1, 0
                if li[k] < lengths[k]:
                    start[k], alpha[k] = True, alphas[k, li[k]]
                else:
                    run[k], active[k] = False, False
                    self.final_H[cells[k]] = self.H.take([k])
                    self.final_pairs[cells[k]] = self.pairs.take([k])
            if 1 < len(run) and run.sum() <= len(run) // 2:   # fewer, smaller buffers
                keep = np.flatnonzero(run)
                cells, li, it, run, start, passes = (a[keep] for a in (cells, li, it, run, start,
                                                                       passes))
                alpha, alphas, lengths, loss, part = (a[keep] for a in (alpha, alphas, lengths,
                                                                        loss, part))
                active, prev, has_last = active[keep], prev[keep], has_last[keep]
                last_s, last_g = last_s[keep], last_g[keep]
                self.X, self.W, self.B = self.X[keep], self.W[keep], self.B[keep]
                self.H, self.pairs = self.H.take(keep), self.pairs.take(keep)
                self.buf["Z"][:len(keep)] = self.buf["Z"][keep]
                self.buf["p"][:len(keep)] = self.buf["p"][keep]
                self.buf = {k: v[:len(keep)] for k, v in self.buf.items()}
