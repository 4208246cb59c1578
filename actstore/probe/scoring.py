"""Per-image test scores of a block of predictions, at token and at label resolution.

The paper upsamples each prediction bilinearly to the label's size and scores it there, per
image. Upsampling by torch's rule (``align_corners=False``) is a fixed linear map per token
grid, U = A_h P A_wᵀ, so the moments that RMSE and Pearson need at label resolution come
from token-resolution arrays (``G = AᵀA``, ``a = Aᵀ1``)::

    ΣU = a_hᵀ P a_w        ΣU² = ⟨P, G_h P G_w⟩        ΣU·T = ⟨P, A_hᵀ T A_w⟩

where ``A_hᵀ T A_w`` is made once per image, not once per step. Only Dice (a threshold)
and Spearman (ranks) need the upsampled map itself; it is made by torch in float32, in
chunks of maps, as :func:`actstore.metrics.upsample` does, and each label is ranked once.
Predictions and labels are centred first (U of a constant is that constant), which keeps
the moments free of cancellation; a constant prediction or label has no correlation (NaN),
as :func:`actstore.metrics.pearson` says.

Everything the label side contributes is a :class:`LabelSide`: per image its mean, ΣT²,
``A_hᵀ T A_w`` for each token grid and, for masks, the mask as bits. It is made once per
test image and serves every layer and model of a run (at 512×512 labels, reading and
centring a label cost more than scoring one layer on it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from actstore import metrics as mt

BINARY_METRICS = ("dice",)
CONTINUOUS_METRICS = ("rmse", "pearson", "spearman")
LEVELS = ("token", "label")
UPSAMPLE_CHUNK_BYTES = 64 << 20   # float32 upsampled maps held at once


def metric_names(binary: bool, label_spearman: bool = False) -> list[str]:
    """Every metric at both levels, but Spearman at label resolution only on request: it
    ranks every upsampled map, O(HW log HW) per (image, step, layer), which alone cost
    several read passes (benchmarks/README.md); Spearman at token resolution stays."""
    base = BINARY_METRICS if binary else CONTINUOUS_METRICS
    return [f"{m}_{level}" for level in LEVELS for m in base
            if label_spearman or (m, level) != ("spearman", "label")]


@lru_cache(maxsize=32)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): torch's 1-D bilinear weights, read off by upsampling unit vectors."""
    eye = np.eye(n_in, dtype=np.float32)[:, :, None]          # n_in maps (n_in, 1)
    up = mt.upsample(eye, (n_out, 1))[:, :, 0]                # (n_in, n_out)
    out = up.T.astype(np.float64)
    out.setflags(write=False)
    return out


def _chunks(n_maps: int, map_bytes: int):
    step = max(1, UPSAMPLE_CHUNK_BYTES // max(map_bytes, 1))
    return [slice(i, min(i + step, n_maps)) for i in range(0, n_maps, step)]


def _upsampled(pred: np.ndarray, size: tuple[int, int]):
    """Yield (image slice, upsampled maps (k, S, H·W)) a few images at a time."""
    n, s = pred.shape[:2]
    for sl in _chunks(n, 4 * s * size[0] * size[1]):
        k = sl.stop - sl.start
        up = mt.upsample(pred[sl].reshape(k * s, *pred.shape[2:]), size)
        yield sl, up.reshape(k, s, -1)


def _dice(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Dice of masks (n, S, P) against (n, P): :func:`actstore.metrics.dice` per step."""
    inter = (p & t[:, None]).sum(-1)
    total = p.sum(-1) + t.sum(-1)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


@dataclass(frozen=True)
class LabelSide:
    """What the label-resolution metrics need of labels (n, H, W), per image: ``mean``,
    ``stt`` = Σ(T - mean)², ``proj[(h, w)]`` = A_hᵀ (T - mean) A_w for each token grid,
    ``constant`` (no correlation), and for masks ``bits`` (T > 0.5, packed). ``[rows]``
    selects images."""

    size: tuple[int, int]
    mean: np.ndarray
    stt: np.ndarray
    constant: np.ndarray
    proj: dict
    bits: np.ndarray | None = None

    def __getitem__(self, rows) -> "LabelSide":
        return LabelSide(self.size, self.mean[rows], self.stt[rows], self.constant[rows],
                         {g: p[rows] for g, p in self.proj.items()},
                         None if self.bits is None else self.bits[rows])

    @staticmethod
    def concat(parts: "list[LabelSide]") -> "LabelSide":
        """The images of several blocks' summaries, in order (same size and grids)."""
        if len(parts) == 1:
            return parts[0]
        cat = (lambda xs: None if xs[0] is None else np.concatenate(xs))
        return LabelSide(parts[0].size, *(cat([getattr(p, f) for p in parts])
                                          for f in ("mean", "stt", "constant")),
                         {g: np.concatenate([p.proj[g] for p in parts]) for g in parts[0].proj},
                         cat([p.bits for p in parts]))

    def mask(self) -> np.ndarray:
        """(n, H·W) bool: the label > 0.5."""
        n, P = len(self.mean), self.size[0] * self.size[1]
        return np.unpackbits(self.bits, axis=-1, count=P).astype(bool).reshape(n, P)


def label_side(full: np.ndarray, grids: Iterable[tuple[int, int]], binary: bool) -> LabelSide:
    """The :class:`LabelSide` of labels (n, H, W) for token grids ``grids`` ((h, w), ...)."""
    n, H, W = full.shape
    if binary:   # Dice needs the mask only
        bits = np.packbits((full > 0.5).reshape(n, -1), axis=-1)
        empty = np.zeros(n)
        return LabelSide((H, W), empty, empty, np.zeros(n, bool), {}, bits)
    T = full.astype(np.float64)
    mt_ = T.mean(axis=(-2, -1))
    T = T - mt_[:, None, None]
    proj = {(h, w): bilinear_matrix(h, H).T @ T @ bilinear_matrix(w, W)
            for h, w in dict.fromkeys(map(tuple, grids))}
    return LabelSide((H, W), mt_, np.einsum("nhw,nhw->n", T, T),
                     np.ptp(full.reshape(n, -1), axis=-1) == 0, proj)


def _label_moments(pred: np.ndarray, side: LabelSide):
    """RMSE and Pearson of the upsampled predictions (n, S, h, w) against labels (n, H, W),
    from token-resolution moments."""
    n, s, h, w = pred.shape
    H, W = side.size
    Ah, Aw = bilinear_matrix(h, H), bilinear_matrix(w, W)
    P = pred.astype(np.float64)
    mp = P.mean(axis=(-2, -1))
    P = P - mp[..., None, None]
    mt_ = side.mean
    N = H * W
    su = np.einsum("h,nshw,w->ns", Ah.sum(0), P, Aw.sum(0))
    suu = np.einsum("nshw,nshw->ns", P, (Ah.T @ Ah) @ P @ (Aw.T @ Aw))
    sut = np.einsum("nshw,nhw->ns", P, side.proj[(h, w)])
    stt = side.stt[:, None]
    d = (mp - mt_[:, None])
    sq = suu - 2 * sut + stt + 2 * d * su + N * d * d
    rmse = np.sqrt(np.maximum(sq, 0.0) / N)
    var_u = np.maximum(suu - su * su / N, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = sut / np.sqrt(var_u * stt)
    return rmse, np.clip(r, -1.0, 1.0)


def _undefined(pred: np.ndarray, label_constant: np.ndarray) -> np.ndarray:
    """(n, S): a constant prediction or label has no correlation. Decided on the values
    themselves: the mean of a constant, or its float32 upsampling, can differ from it by
    rounding and make a spurious correlation of that rounding."""
    n, s = pred.shape[:2]
    return (np.ptp(pred.reshape(n, s, -1), axis=-1) == 0) | label_constant[:, None]


def _constant(x: np.ndarray) -> np.ndarray:
    return np.ptp(x.reshape(len(x), -1), axis=-1) == 0


def block_scores(pred: np.ndarray, tokens: np.ndarray, full: np.ndarray | LabelSide,
                 binary: bool, label_spearman: bool = False) -> np.ndarray:
    """(metric, image, step), metrics as :func:`metric_names`, for predictions (image, step,
    h, w) against token-resolution targets (image, h, w) and labels (image, H, W), or their
    :class:`LabelSide` (which cannot rank: label Spearman needs the labels).

    Binary predictions are logits: the mask is logit > 0, upsampled as logits first.
    """
    n, s, h, w = pred.shape
    side = full if isinstance(full, LabelSide) else label_side(full, [(h, w)], binary)
    p_tok = pred.reshape(n, s, -1)
    t_tok = tokens.reshape(n, -1)
    if binary:
        out = np.empty((2, n, s))
        out[0] = _dice(p_tok > 0, t_tok > 0.5)
        mask = side.mask()
        for sl, up in _upsampled(pred, side.size):
            out[1, sl] = _dice(up > 0, mask[sl])
        return out
    out = np.empty((6 if label_spearman else 5, n, s))
    out[0] = mt.rmse(p_tok.reshape(n * s, -1), np.repeat(t_tok, s, axis=0)).reshape(n, s)
    out[1] = mt.step_correlations(p_tok, t_tok)
    out[2] = mt.step_correlations(mt.rank(p_tok), mt.rank(t_tok))
    out[3], out[4] = _label_moments(pred, side)
    if label_spearman:
        if isinstance(full, LabelSide):
            raise ValueError("label Spearman ranks the labels: pass them, not a LabelSide")
        t_rank = mt.rank(full.reshape(n, -1))
        for sl, up in _upsampled(pred, side.size):
            out[5, sl] = mt.step_correlations(mt.rank(up), t_rank[sl])
    out[[1, 2]] = np.where(_undefined(pred, _constant(tokens)), np.nan, out[[1, 2]])
    out[4:] = np.where(_undefined(pred, side.constant), np.nan, out[4:])
    return out
