"""Per-image probe metrics and the resolution changes between tokens and pixels.

The paper scores each test image separately and then averages, so every metric here maps
arrays shaped ``(N, H, W)`` (or ``(N, P)``) to one value per image, shape ``(N,)``; the
caller reduces them with :func:`summarize`, which reports the median beside the mean
because per-image scores of weak probes are skewed.

Probes predict at a layer's token resolution (64², 32², 16² or 8²) while labels live at
image resolution. :func:`upsample` takes predictions up to the label size (what the paper
does before its metrics) and :func:`pool` takes labels down to token resolution (what the
probe is fitted against), so a metric can be reported at either resolution.
"""

from __future__ import annotations

import numpy as np

from actstore.errors import ActstoreError

__all__ = ["dice", "rmse", "pearson", "spearman", "rank", "step_correlations", "summarize",
           "upsample", "pool"]


def _per_image(a: np.ndarray, b: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Flatten everything after the image axis, checking the two inputs agree."""
    a = np.asarray(a)
    if a.ndim < 2:
        raise ActstoreError(f"metrics need arrays shaped (N, ...) per image, got shape {a.shape}")
    if b is None:
        return a.reshape(a.shape[0], -1), None
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ActstoreError(f"prediction shape {a.shape} does not match label shape {b.shape}")
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)


def dice(pred_mask: np.ndarray, true_mask: np.ndarray) -> np.ndarray:
    """Dice overlap 2|A∩B| / (|A|+|B|) per image, inputs cast to bool.

    An image where both masks are empty scores 1.0: the probe correctly found no salient
    object, and scoring it 0 or NaN would punish or hide a correct answer (this equals
    sklearn's ``f1_score(..., zero_division=1.0)``). If only one mask is empty the score
    is 0, as the formula gives.
    """
    p, t = _per_image(pred_mask, true_mask)
    p, t = p.astype(bool), t.astype(bool)
    inter = np.count_nonzero(p & t, axis=1)
    total = np.count_nonzero(p, axis=1) + np.count_nonzero(t, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def rmse(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Root mean squared error per image, computed in float64 so fp16 inputs don't round."""
    p, t = _per_image(pred, target)
    d = p.astype(np.float64) - t.astype(np.float64)
    return np.sqrt(np.mean(d * d, axis=1))


def pearson(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson correlation per image.

    A constant prediction or label has no correlation; those images get NaN (as scipy
    does) rather than a made-up 0, and :func:`summarize` skips them and counts them.
    """
    p, t = _per_image(pred, target)
    p = p.astype(np.float64) - p.mean(axis=1, keepdims=True, dtype=np.float64)
    t = t.astype(np.float64) - t.mean(axis=1, keepdims=True, dtype=np.float64)
    num = np.sum(p * t, axis=1)
    den = np.sqrt(np.sum(p * p, axis=1) * np.sum(t * t, axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    return np.where(den > 0, np.clip(r, -1.0, 1.0), np.nan)


def rank(a: np.ndarray) -> np.ndarray:
    """Average-tie ranks (1-based) along the last axis: ``scipy.stats.rankdata(a, axis=-1)``.

    scipy sorts with a stable mergesort, several times slower than numpy's default sort on
    the millions of pixels a score pass ranks; tied values share their positions' mean
    whatever order the unstable sort leaves them in, so the result is the same.
    """
    a = np.asarray(a)
    order = np.argsort(a, axis=-1)
    ordered = np.take_along_axis(a, order, axis=-1)
    n = a.shape[-1]
    pos = np.broadcast_to(np.arange(n), a.shape)
    starts = np.ones(a.shape, bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    out = np.empty(a.shape, np.float64)
    if starts.all():   # no ties: the usual case for continuous predictions
        np.put_along_axis(out, order, pos + 1.0, axis=-1)
        return out
    ends = np.ones(a.shape, bool)
    ends[..., :-1] = starts[..., 1:]
    first = np.maximum.accumulate(np.where(starts, pos, 0), axis=-1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, pos, n), -1), axis=-1), -1)
    np.put_along_axis(out, order, (first + last) / 2.0 + 1.0, axis=-1)
    return out


def step_correlations(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson of each image's several predictions ``(N, S, P)`` with its one label
    ``(N, P)``: :func:`pearson` per (image, step), with the label centred once instead of
    once per step (the score pass correlates 15 steps with each label)."""
    p = np.asarray(pred, np.float64)
    t = np.asarray(target, np.float64)
    p = p - p.mean(axis=-1, keepdims=True)
    t = t - t.mean(axis=-1, keepdims=True)
    num = np.einsum("nsp,np->ns", p, t)
    den = np.sqrt(np.einsum("nsp,nsp->ns", p, p) * np.einsum("np,np->n", t, t)[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    return np.where(den > 0, np.clip(r, -1.0, 1.0), np.nan)


def spearman(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Spearman rank correlation per image: Pearson of average-tie ranks, as scipy."""
    p, t = _per_image(pred, target)
    return pearson(rank(p), rank(t))


def summarize(per_image: np.ndarray) -> dict[str, float]:
    """Mean and median over images, ignoring NaN (undefined correlations), with counts."""
    v = np.asarray(per_image, dtype=np.float64).ravel()
    ok = v[np.isfinite(v)]
    if ok.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "n": 0, "n_undefined": int(v.size)}
    return {"mean": float(ok.mean()), "median": float(np.median(ok)),
            "n": int(ok.size), "n_undefined": int(v.size - ok.size)}


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def upsample(pred: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of token-resolution maps ``(N, h, w)`` to ``(N, H, W)``.

    Uses ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``, the
    PyTorch default the authors' code relies on: pixel centres are aligned, so an
    upsampled map is not shifted by half a token. Computed in float32. For binary probes
    upsample the logits and threshold at 0 afterwards (thresholding first would give
    blocky masks).
    """
    a = np.asarray(pred)
    if a.ndim != 3:
        raise ActstoreError(f"upsample needs maps shaped (N, h, w), got shape {a.shape}")
    import torch   # here: the readers that import this module (show, probe runs) need no torch

    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None]
    out = torch.nn.functional.interpolate(t, size=_size2(size), mode="bilinear",
                                          align_corners=False)
    return out[:, 0].numpy()


def pool(label: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Area-average a full-resolution label ``(N, H, W)`` down to tokens ``(N, h, w)``.

    Each token's target is the mean of the pixels it covers, so a binary mask pools to the
    fraction of salient pixels in the token; the binary probe target is ``pool(...) > 0.5``.
    The image side must be a multiple of the token side (512 = 8 × 64 in SD v1.x): an
    exact block mean keeps every pixel's weight equal, which interpolation would not.
    Returns float64 to keep fractions exact.
    """
    a = np.asarray(label)
    if a.ndim != 3:
        raise ActstoreError(f"pool needs labels shaped (N, H, W), got shape {a.shape}")
    (h, w), (H, W) = _size2(size), a.shape[1:]
    if H % h or W % w:
        raise ActstoreError(f"label size {H}x{W} is not a multiple of token size {h}x{w}")
    blocks = a.reshape(a.shape[0], h, H // h, w, W // w)
    return blocks.mean(axis=(2, 4), dtype=np.float64)
