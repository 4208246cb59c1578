"""The probe grid: one linear probe per (model, layer, step) for a target, fitted with Dask.

Reading plan, for each model variant and layer (one Zarr array each), with dask chunks =
storage shards (one block of images × every step):

1. **fit pass** over the blocks holding train images: each block task upcasts its tokens
   to float32 and returns per-fold sufficient statistics for *all* steps at once; the
   statistics are tree-summed and every step's ridge probe (λ by K-fold CV) is solved
   from them. Memory is one block plus the statistics, whatever the number of images.
   Binary targets then refine each step's probe to an L2 logistic regression by Newton
   (warm-started and its folds' Gram matrices taken from the same statistics), on that
   step's train tokens held in memory.
2. **score pass** over the blocks holding test images: predictions for all steps, scored
   per image at token resolution and, upsampled bilinearly, at label resolution.

A block read in the fit pass is read again in the score pass only if it mixes train and
test images. Results go to ``probes/<run_id>/`` (see :mod:`actstore.probe.runs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import dask
import numpy as np
from dask import delayed

from actstore import metrics as mt
from actstore.probe import solvers as pb
from actstore.store.view import StoreView
from actstore.errors import ActstoreError
from actstore.kinds import BINARY
from actstore.runtime import dask_threads

BINARY_METRICS = ("dice",)
CONTINUOUS_METRICS = ("rmse", "pearson", "spearman")
LEVELS = ("token", "label")
RESIDENT_LAYER_BYTES = 1 << 30  # a layer's train tokens, all steps, read once if this small


def metric_names(kind: str) -> list[str]:
    base = BINARY_METRICS if kind == BINARY else CONTINUOUS_METRICS
    return [f"{m}_{level}" for level in LEVELS for m in base]


@dataclass
class LayerFit:
    """Every step's probe for one (model, layer): weights (S, C), bias (S,), λ (S,)."""

    weights: np.ndarray
    bias: np.ndarray
    lam: np.ndarray
    cv_score: np.ndarray
    lambdas: np.ndarray
    solver: str
    ridge_fallback_steps: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Targets:
    """The labels a layer is probed against: token-resolution targets and full-res maps."""

    kind: str
    tokens: np.ndarray   # (image, h, w) in store order; binary: 0/1
    full: np.ndarray     # (image, H, W) in store order
    train: np.ndarray    # bool per image (store order)
    test: np.ndarray


def _block_tokens(x: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """(b, S_all, h, w, C) block → (S, b·h·w, C) tokens of the chosen steps."""
    x = x[:, steps]
    b, s, h, w, c = x.shape
    return x.transpose(1, 0, 2, 3, 4).reshape(s, b * h * w, c)


def _fit_block(x: np.ndarray, rows: np.ndarray, positions: np.ndarray, y: np.ndarray,
               steps: np.ndarray, n_folds: int):
    """Map step: per-fold statistics of one block's train images, for every step."""
    if not rows.any():
        return 0
    X = _block_tokens(x[rows], steps)
    tokens = y[rows].reshape(-1).astype(np.float32)
    index = np.repeat(positions[rows], y.shape[1] * y.shape[2])
    return pb.image_stats(index, X, np.broadcast_to(tokens, X.shape[:2]), n_folds)


def _tree_sum(parts: list):
    while len(parts) > 1:
        parts = [delayed(sum)(parts[i:i + 2]) for i in range(0, len(parts), 2)]
    return parts[0]


def _blocks(view: StoreView, layer: str):
    """(delayed block, store positions of its images) for each image block of a layer."""
    data = view[layer].data
    data = data.rechunk({k: -1 for k in range(1, data.ndim)})  # one task per image block
    starts = np.cumsum((0,) + data.chunks[0])
    blocks = data.to_delayed().reshape(-1)
    return [(blk, view.image_index[a:b]) for blk, a, b in zip(blocks, starts[:-1], starts[1:])]


def fit_layer(view: StoreView, layer: str, targets: Targets, steps: np.ndarray,
              n_folds: int = 5, lambdas: np.ndarray = pb.DEFAULT_LAMBDAS,
              scheduler=None) -> LayerFit:
    """Fit every requested step of one layer from one pass over its train blocks."""
    parts = [delayed(_fit_block)(blk, targets.train[pos], pos, targets.tokens[pos], steps,
                                 n_folds)
             for blk, pos in _blocks(view, layer) if targets.train[pos].any()]
    if not parts:
        raise ActstoreError(f"store {view.uri}: no train images; set split=train on some rows")
    (stats,) = dask.compute(_tree_sum(parts), scheduler=scheduler)
    ridge = pb.fit_ridge_cv(stats, lambdas)
    fit = LayerFit(ridge.weights, ridge.bias, ridge.lam, ridge.cv_score, ridge.lambdas,
                   "ridge")
    if targets.kind == BINARY:
        fit = _refine_logistic(view, layer, targets, steps, stats, fit, n_folds, scheduler)
    return fit


def _step_stats(stats: pb.FoldStats, s: int) -> pb.FoldStats:
    """One step's slice of statistics batched over steps."""
    def take(r: pb.RidgeStats | None):
        if r is None:
            return None
        return replace(r, **{f.name: getattr(r, f.name)[s] for f in fields(r)
                             if isinstance(getattr(r, f.name), np.ndarray)})
    return pb.FoldStats(tuple(take(f) for f in stats.folds))


def _logistic_cell(x: np.ndarray, y: np.ndarray, index: np.ndarray, n_folds: int,
                   fold_stats: pb.FoldStats) -> pb.ProbeFit | None:
    """One step's logistic probe, or None where it is undefined (a single class seen, as
    on a layer too coarse for the mask, or a diverging fit)."""
    if not 0 < y.mean() < 1:
        return None
    out = pb.fit_logistic_cv(x.reshape(-1, x.shape[-1]), y, index, n_folds=n_folds,
                             fold_stats=fold_stats)
    return out if np.isfinite(out.weights).all() and np.isfinite(out.bias) else None


def _refine_logistic(view, layer, targets, steps, stats, fit, n_folds, scheduler) -> LayerFit:
    train_pos = np.flatnonzero(targets.train)
    lazy = view[layer].data[np.searchsorted(view.image_index, train_pos)][:, steps]
    if lazy.nbytes <= RESIDENT_LAYER_BYTES:  # one read serves every step
        (lazy,) = dask.compute(lazy, scheduler=scheduler)
    h, w = targets.tokens.shape[1:]
    y = targets.tokens[train_pos].reshape(-1)
    index = np.repeat(train_pos, h * w)
    cells = [delayed(_logistic_cell)(lazy[:, k], y, index, n_folds, _step_stats(stats, k))
             for k in range(len(steps))]
    # The cells work on tokens already in this process: threads here, not a cluster that
    # would be shipped the whole layer inside the task graph.
    local = scheduler if scheduler in ("sync", "synchronous") else "threads"
    outs = dask.compute(*cells, scheduler=local, num_workers=dask_threads())
    lambdas = np.asarray(pb.LOGISTIC_LAMBDAS)
    weights, bias, lam, cv, fallback = [], [], [], [], []
    for k, out in enumerate(outs):
        if out is None:
            # keep the ridge probe on 0/1, shifted so that "score > 0" still means "mask"
            fallback.append(int(steps[k]))
            out = pb.ProbeFit(fit.weights[k], fit.bias[k] - 0.5, fit.lam[k], np.nan, lambdas,
                              np.full(len(lambdas), np.nan))
        weights.append(out.weights)
        bias.append(out.bias)
        lam.append(out.lam)
        cv.append(out.cv_score)
    return LayerFit(np.stack(weights), np.stack(bias), np.stack(lam), np.stack(cv), lambdas,
                    "logistic", fallback)


def _score_block(x: np.ndarray, rows: np.ndarray, tokens: np.ndarray, full: np.ndarray,
                 weights: np.ndarray, bias: np.ndarray, steps: np.ndarray, kind: str):
    """Score pass: per-image metrics (metric, image, step) of one block's test images."""
    if not rows.any():
        return None
    X = _block_tokens(x[rows], steps)                  # (S, n, C)
    pred = pb.predict(weights[..., None], bias[..., None], X)[..., 0]   # (S, n)
    b, (h, w) = int(rows.sum()), tokens.shape[1:]
    pred = pred.reshape(len(steps), b, h, w).transpose(1, 0, 2, 3)   # (b, S, h, w)
    return per_image_scores(pred, tokens[rows], full[rows], kind)


def per_image_scores(pred: np.ndarray, tokens: np.ndarray, full: np.ndarray,
                     kind: str) -> np.ndarray:
    """(metric, image, step) for predictions (image, step, h, w) against both resolutions.

    Binary predictions are logits: the mask is logit > 0, upsampled as logits first.
    """
    n, s, h, w = pred.shape
    up = mt.upsample(pred.reshape(n * s, h, w), full.shape[1:]).reshape(n, s, *full.shape[1:])
    out = []
    for p, t in ((pred, tokens), (up, full)):
        p, t = p.reshape(n, s, -1), t.reshape(n, -1)
        if kind == BINARY:
            out.append(mt.dice((p > 0).reshape(n * s, -1),
                               np.repeat(t > 0.5, s, axis=0)).reshape(n, s))
        else:
            # per (image, step), as the metrics' per-image definitions; a label is centred
            # and ranked once, not once per step (Spearman = Pearson of ranks)
            out += [mt.rmse(p.reshape(n * s, -1), np.repeat(t, s, axis=0)).reshape(n, s),
                    mt.step_correlations(p, t), mt.step_correlations(mt.rank(p), mt.rank(t))]
    return np.stack(out)


def score_layer(view: StoreView, layer: str, targets: Targets, steps: np.ndarray,
                fit: LayerFit, scheduler=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-image test scores (metric, test image, step) and the test images' positions."""
    parts, order = [], []
    for blk, pos in _blocks(view, layer):
        rows = targets.test[pos]
        if rows.any():
            parts.append(delayed(_score_block)(blk, rows, targets.tokens[pos], targets.full[pos],
                                               fit.weights, fit.bias, steps, targets.kind))
            order.append(pos[rows])
    if not parts:
        raise ActstoreError(f"store {view.uri}: no test images; set split=test on some rows")
    results = dask.compute(*parts, scheduler=scheduler)
    return np.concatenate(results, axis=1), np.concatenate(order)
