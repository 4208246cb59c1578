"""Shifted solves (c·S + α·I)⁻¹ B, for many (c, α), from one reduction of a symmetric S.

Ridge CV needs the solution at every λ of its grid for every fold model, and a logistic
Newton step one per model and λ. An eigendecomposition gives them all, but at SD's widest
layers (C = 1280) it costs ~0.35 CPU s, and a probe run does K+1 of them per (layer,
step). Only its first part is needed: the Householder reduction S = Q·T·Qᵀ to a symmetric
tridiagonal T (LAPACK ``sytrd``, ~0.11 s at C = 1280, one thread), after which each shift
costs an O(C) tridiagonal solve and Q is applied from its reflectors (``ormqr``) in
O(C²) per column, never formed. With a single α a Cholesky factorisation is cheaper still
(~0.03 s): :func:`solve_spd`.

A shift that leaves the matrix singular or indefinite by rounding (α = 0 on a rank-
deficient S) falls back to the minimum-norm solution through T's eigenvalues, as the
eigendecomposition did.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.linalg as sl
from scipy.linalg import lapack

EIG_FLOOR = 1e-12   # eigenvalues below this share of the largest are round-off: taken as 0


@lru_cache(maxsize=64)
def _sytrd_work(n: int) -> int:
    work, info = lapack.dsytrd_lwork(n, lower=1)
    return max(1, int(work))


@lru_cache(maxsize=256)
def _ormqr_work(m: int, k: int) -> int:
    a, tau, c = np.eye(m, order="F"), np.zeros(m), np.zeros((m, k), order="F")
    work = lapack.dormqr("L", "N", a, tau, c, lwork=-1)[1]
    return max(1, k, int(work[0]))


class Tridiagonal:
    """S = Q·T·Qᵀ, T = tridiag(e, d, e), Q = diag(1, H₁⋯H_{C−1}) kept as reflectors."""

    def __init__(self, S: np.ndarray):
        S = np.asarray(S, np.float64)
        self.size = C = S.shape[-1]
        if C > 1:
            a, self.d, self.e, self.tau, info = lapack.dsytrd(S, lower=1, lwork=_sytrd_work(C))
            if info:
                raise np.linalg.LinAlgError(f"sytrd failed (info {info})")
            self.reflectors = np.asfortranarray(a[1:, :C - 1])
        else:
            self.d, self.e = S.reshape(-1).copy(), np.zeros(0)

    def _apply(self, B: np.ndarray, trans: str) -> np.ndarray:
        """Qᵀ·B (``trans`` "T") or Q·B ("N"), B (C, k)."""
        out = np.array(B, np.float64, order="F", copy=True)
        if self.size > 1 and out.shape[1]:
            m, k = out.shape[0] - 1, out.shape[1]
            out[1:] = lapack.dormqr("L", trans, self.reflectors, self.tau, out[1:],
                                    lwork=_ormqr_work(m, k))[0]
        return out

    def solve(self, B: np.ndarray, shift: np.ndarray, scale: np.ndarray | float = 1.0
              ) -> np.ndarray:
        """(scale_j·S + shift_j·I)⁻¹ B[:, j] for every column j: B (C, k), shift (k,)."""
        U = self._apply(B, "T")
        shift = np.asarray(shift, np.float64)
        scale = np.broadcast_to(np.asarray(scale, np.float64), shift.shape)
        for j in range(U.shape[1]):
            d, e = scale[j] * self.d + shift[j], scale[j] * self.e
            if self.size == 1:
                U[:, j] = U[:, j] / d if d[0] > 0 else 0.0
                continue
            _, _, u, info = lapack.dptsv(d, e, U[:, j])
            U[:, j] = u if info == 0 else self._pinv(d, e, U[:, j])
        return self._apply(U, "N")

    @staticmethod
    def _pinv(d: np.ndarray, e: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Minimum-norm solution of a singular or indefinite-by-rounding tridiagonal system,
        directions below :data:`EIG_FLOOR` of the largest eigenvalue dropped."""
        w, V = sl.eigh_tridiagonal(d, e)
        keep = w > EIG_FLOOR * max(w.max(), 0.0)
        return V[:, keep] @ ((V[:, keep].T @ b) / w[keep])


def solve_spd(S: np.ndarray, shift: float, B: np.ndarray) -> np.ndarray:
    """(S + shift·I)⁻¹ B by Cholesky; the tridiagonal route if it is not positive definite
    in floating point (a null direction at shift 0)."""
    A = np.array(S, np.float64, copy=True)
    A[np.diag_indices_from(A)] += shift
    try:
        return sl.cho_solve(sl.cho_factor(A, lower=True, overwrite_a=True, check_finite=False),
                            B, check_finite=False)
    except np.linalg.LinAlgError:
        B2 = np.reshape(B, (len(A), -1))
        out = Tridiagonal(S).solve(B2, np.full(B2.shape[1], shift))
        return out.reshape(np.shape(B))
