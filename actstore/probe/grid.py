"""The probe grid: one linear probe per (model, layer, step) for a target, fitted with Dask.

One task graph per (model, layer); its tasks are handed a store URI, array paths and image
ranges, never arrays, and read their blocks (activations and labels) from the store where
they run, so on a cluster only the sufficient statistics, the probes and the scores move:

1. **fit** over the blocks holding train images: each block task upcasts its tokens to
   float32 and returns per-fold sufficient statistics for *all* steps at once; they are
   tree-summed and every step's ridge probe (λ by K-fold CV) is solved from them, in a task.
   Binary targets then refine each step's probe to an L2 logistic regression by
   quasi-Newton steps (warm-started, its folds' Gram matrices taken from the same
   statistics, λ searched around the ridge's), the steps in lockstep (two tasks per
   layer), on a class-balanced weighted sample of the train tokens that the same block
   tasks keep beside their statistics (:mod:`actstore.probe.sampling`): the store is read once.
2. **score** over the blocks holding test images: predictions for all steps, scored per
   image at token and label resolution (:mod:`actstore.probe.scoring`).

A block read in the fit is read again in the score only if it mixes train and test images.
Memory is one block plus the statistics, whatever the number of images.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import zarr
from dask.delayed import Delayed, delayed

from actstore.cluster import names_worker
from actstore.errors import ActstoreError
from actstore.kinds import BINARY
from actstore.probe import logistic as lg
from actstore.probe import sampling
from actstore.probe import solvers as pb
from actstore.probe import stats as ps
from actstore.probe.reads import (block_label_side, block_tokens, read_images, read_labels,
                                  stored_array, token_labels)
from actstore.probe.scheduler import Scheduler, compute, task_code
from actstore.probe.scoring import LabelSide, block_scores
from actstore.probe.scoring import metric_names as _names
from actstore.store import io
from actstore.worker_code import checks_code


def metric_names(kind: str, label_spearman: bool = False) -> list[str]:
    return _names(kind == BINARY, label_spearman)


FIT_TASK_BYTES = 16 << 20   # activations (as stored) read by one fit or score task: _spans


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
class LayerSource:
    """Where a layer's tasks find their inputs: a store URI and array paths. Nothing here
    grows with the data, so a task graph sent to a cluster stays a few kB."""

    uri: str
    activation: str   # (image, step, y, x, channel)
    tokens: str       # labels at the layer's token grid (image, y, x)
    full: str         # labels at image resolution (image, H, W)
    kind: str
    labels_created: str = ""
    grids: tuple[tuple[int, int], ...] = ()   # every token grid of the run (block_label_side)


@dataclass(frozen=True)
class Split:
    """Train/test per store position, and the store's image blocks (start, stop)."""

    train: np.ndarray
    test: np.ndarray
    blocks: tuple[tuple[int, int], ...]


@checks_code
@names_worker
def _fit_block(src: LayerSource, a: int, b: int, rows: np.ndarray, steps: np.ndarray,
               n_folds: int, rates: np.ndarray | None = None):
    """Map step: per-fold statistics of one block's train images, for every step, and with
    ``rates`` (binary targets) the block's token sample too."""
    X = block_tokens(_take(read_images(src.uri, src.activation, slice(a, b), steps), rows))
    y = token_labels(src)[a:b][rows]
    per_image = y.shape[1] * y.shape[2]
    index = np.repeat(np.arange(a, b)[rows], per_image)
    tokens = y.reshape(-1).astype(np.float32)
    stats = ps.image_stats(index, X, np.broadcast_to(tokens, X.shape[:2]), n_folds)
    if rates is None:
        return stats
    position = np.tile(np.arange(per_image), len(y))
    return stats, sampling.draw(X, tokens, index, position, rates)


@checks_code
@names_worker
def _sample_rates(src: LayerSource, train: np.ndarray) -> np.ndarray:
    """Keep rates per class for the layer's token sample, from every train token's label."""
    channels = stored_array(src.uri, src.activation).shape[-1]
    return sampling.class_rates(token_labels(src)[train], sampling.budget(channels))


def _spans(blocks: list[tuple[int, int]], arr: zarr.Array, n_steps: int
           ) -> list[tuple[int, int]]:
    """Adjacent store blocks joined into tasks of about :data:`FIT_TASK_BYTES` each.
    A fit task's statistics cost K C×C matrices however many tokens it holds, and merging
    two tasks' costs as much again: at SD's 8×8×1280 layer, four images of a store block
    make a Gram product 20× cheaper than merging its fold matrices. A score task's cost
    beyond its tokens is a task and a store read: ~2 CPU ms, as much as scoring a toy
    block."""
    per_image = n_steps * int(np.prod(arr.shape[2:])) * arr.dtype.itemsize
    out: list[tuple[int, int]] = []
    for a, b in blocks:
        if out and out[-1][1] == a and (b - out[-1][0]) * per_image <= FIT_TASK_BYTES:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


MERGE_FAN_IN = 8   # fit tasks' results merged per reduction task
# Each merge level above the first copies and adds float64 C×C matrices: at SD's
# 16×16×1280 layer (6 fit tasks per model) fan-in 4 makes three merges, 8 one, 175 -> 67
# CPU ms per model; peak memory about the same there (4 float32 parts and a float64 one,
# twice a part's size, against 6 float32 parts), 8 parts (260 MB at C = 1280) at most.


@checks_code
@names_worker
def _merged(parts: list):
    """Several fit tasks' statistics pooled fold by fold in one step (K C×C additions and
    one product, where pairwise merges cost three passes each), or their token samples
    concatenated once."""
    if isinstance(parts[0], sampling.TokenSample):
        return sampling.TokenSample.concat(parts)
    folds = zip(*(p.folds for p in parts))
    return ps.FoldStats(tuple(ps.pool([f for f in fs if f is not None]) if any(fs) else None
                              for fs in folds))


def _task(fn, code: tuple[str, ...] | None, nout: int | None = None):
    """``delayed(fn)`` for a grid task (decorated with :func:`checks_code`) that first
    checks that its worker runs ``code``: the command stores what the tasks return, so a
    worker restarted at a checked address with other code, or one that took a task within
    the watch's second after joining, must compute nothing (None: no check)."""
    return partial(delayed(fn, nout=nout), code=code)


def _tree_sum(parts: list, code: tuple[str, ...] | None = None):
    while len(parts) > 1:
        parts = [_task(_merged, code)(parts[i:i + MERGE_FAN_IN])
                 for i in range(0, len(parts), MERGE_FAN_IN)]
    return parts[0]


@checks_code
@names_worker
def _solve_ridge(stats: ps.FoldStats, lambdas: np.ndarray) -> LayerFit:
    ridge = pb.fit_ridge_cv(stats, lambdas)
    return LayerFit(ridge.weights, ridge.bias, ridge.lam, ridge.cv_score, ridge.lambdas,
                    "ridge")


@checks_code
@names_worker
def _sample_steps(sample: sampling.TokenSample, steps: slice) -> sampling.TokenSample:
    """A logistic task's steps of the token sample, cut where the sample is (a grid task
    like the others, so it checks its worker's code too)."""
    return sample.step(steps.start, steps.stop)


@checks_code
@names_worker
def _step_stats(stats: ps.FoldStats, s: int | slice) -> ps.FoldStats:
    """One step's slice (or a range of steps') of statistics batched over steps."""
    return stats.cell(s)


LOCKSTEP_BYTES = 256 << 20   # float32 tokens of the steps one logistic task fits in lockstep
LOCKSTEP_TASKS = 2           # at least this many logistic tasks per layer (threads to fill)


def _step_groups(n_steps: int, tokens: int, channels: int) -> list[slice]:
    """The steps of a layer cut into logistic tasks: as few as the threads and
    :data:`LOCKSTEP_BYTES` allow (a tick's Python costs the same for 1 cell or 15)."""
    per_step = 4 * tokens * channels
    n = min(n_steps, max(LOCKSTEP_TASKS, -(-n_steps * per_step // LOCKSTEP_BYTES)))
    cuts = np.linspace(0, n_steps, n + 1).round().astype(int)
    return [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]


@checks_code
@names_worker
def _logistic_cells(sample: sampling.TokenSample, n_folds: int, fold_stats: ps.FoldStats,
                    ridge: LayerFit, steps: slice) -> list[pb.ProbeFit | None]:
    """The logistic probes of ``steps`` (positions) from their token sample
    (:meth:`TokenSample.step`) and statistics, fitted in lockstep; None where a probe is
    undefined (a single class seen, as on a layer too coarse for the mask, or a diverging
    fit). The statistics are of all train tokens, which the weighted sample stands for; λ
    is searched in the window each step's ridge λ places
    (:func:`actstore.probe.logistic.lambda_window`), the other λ's CV scores are NaN. A
    sample fit is polished no further than the path's tolerance: its sampling error is
    far larger."""
    k = range(steps.start, steps.stop)
    if not 0 < sample.y.mean() < 1:
        return [None] * len(k)
    grid = np.asarray(lg.LOGISTIC_LAMBDAS)
    positive = lg.moments([f for f in fold_stats.folds if f]).mean_y
    keep = [lg.lambda_window(float(ridge.lam[j]), float(positive[i]), grid)
            for i, j in enumerate(k)]
    exact = bool((sample.weight == 1).all())
    fits = lg.fit_logistic_cv_cells(sample.x, sample.y, sample.image, [grid[m] for m in keep],
                                    n_folds=n_folds, tol=lg.TOL if exact else lg.PATH_TOL,
                                    fold_stats=fold_stats, weight=sample.weight)
    out = []
    for fit, m in zip(fits, keep):
        cv = np.full(len(grid), np.nan)
        cv[m] = fit.cv_score
        out.append(replace(fit, lambdas=grid, cv_score=cv)
                   if np.isfinite(fit.weights).all() and np.isfinite(fit.bias) else None)
    return out


@checks_code
@names_worker
def _logistic_fit(fit: LayerFit, steps: np.ndarray, *groups: list) -> LayerFit:
    lambdas = np.asarray(lg.LOGISTIC_LAMBDAS)
    weights, bias, lam, cv, fallback = [], [], [], [], []
    for k, out in enumerate(c for g in groups for c in g):
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


def fit_graph(src: LayerSource, split: Split, steps: np.ndarray, n_folds: int = 5,
              lambdas: np.ndarray = pb.DEFAULT_LAMBDAS,
              code: tuple[str, ...] | None = None) -> Delayed:
    """A delayed :class:`LayerFit` of every requested step of one layer (its tasks check
    ``code`` on their workers: :func:`_task`)."""
    blocks = [(a, b) for a, b in split.blocks if split.train[a:b].any()]
    if not blocks:
        raise ActstoreError(f"store {src.uri}: no train images; set split=train on some rows")
    blocks = _spans(blocks, stored_array(src.uri, src.activation), len(steps))
    if src.kind != BINARY:
        stats = _tree_sum([_task(_fit_block, code)(src, a, b, split.train[a:b], steps,
                                                   n_folds) for a, b in blocks], code)
        return _task(_solve_ridge, code)(stats, lambdas)
    rates = _task(_sample_rates, code)(src, np.flatnonzero(split.train))
    parts = [_task(_fit_block, code, 2)(src, a, b, split.train[a:b], steps, n_folds, rates)
             for a, b in blocks]
    stats, sample = (_tree_sum([p[i] for p in parts], code) for i in (0, 1))
    fit = _task(_solve_ridge, code)(stats, lambdas)
    arr = stored_array(src.uri, src.activation)
    groups = _step_groups(len(steps), sampling.budget(arr.shape[-1]), arr.shape[-1])
    cells = [_task(_logistic_cells, code)(_task(_sample_steps, code)(sample, g), n_folds,
                                          _task(_step_stats, code)(stats, g), fit, g)
             for g in groups]
    return _task(_logistic_fit, code)(fit, steps, *cells)


def _take(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """x[rows] without the copy when every row is wanted (a store block of one split)."""
    return x if rows.all() else x[rows]


@checks_code
@names_worker
def _score_block(src: LayerSource, blocks: tuple[tuple[int, int], ...], rows: np.ndarray,
                 fit: LayerFit, steps: np.ndarray, label_spearman: bool) -> np.ndarray:
    """Per-image metrics (metric, image, step) of the test images of adjacent store blocks
    (one read; the label summaries cached per store block, whatever the span)."""
    a, b = blocks[0][0], blocks[-1][1]
    X = block_tokens(_take(read_images(src.uri, src.activation, slice(a, b), steps), rows))
    pred = pb.predict(fit.weights[..., None], fit.bias[..., None], X)[..., 0]    # (S, n)
    tokens = token_labels(src)[a:b][rows]
    n, (h, w) = len(tokens), tokens.shape[1:]
    # label Spearman ranks the labels themselves; every other metric needs only a summary
    full = read_labels(src, src.full, slice(a, b))[rows] if label_spearman else \
        LabelSide.concat([block_label_side(src, c, d, (h, w)) for c, d in blocks])[rows]
    pred = pred.reshape(len(steps), n, h, w).transpose(1, 0, 2, 3)   # (n, S, h, w)
    return block_scores(pred, tokens, full, src.kind == BINARY, label_spearman)


def score_graph(src: LayerSource, split: Split, steps: np.ndarray, fit: Delayed | LayerFit,
                label_spearman: bool = False, code: tuple[str, ...] | None = None
                ) -> tuple[list[Delayed], np.ndarray]:
    """Delayed per-block scores and the store positions of their test images, in order."""
    parts, order = [], []
    blocks = [(a, b) for a, b in split.blocks if split.test[a:b].any()]
    for a, b in _spans(blocks, stored_array(src.uri, src.activation), len(steps)):
        rows = split.test[a:b]
        inside = tuple((c, d) for c, d in blocks if a <= c and d <= b)
        parts.append(_task(_score_block, code)(src, inside, rows, fit, steps, label_spearman))
        order.append(np.arange(a, b)[rows])
    if not parts:
        raise ActstoreError(f"store {src.uri}: no test images; set split=test on some rows")
    return parts, np.concatenate(order)


def probe_layer(src: LayerSource, split: Split, steps: np.ndarray, *, n_folds: int = 5,
                lambdas: np.ndarray = pb.DEFAULT_LAMBDAS, scheduler: Scheduler = None,
                label_spearman: bool = False) -> tuple[LayerFit, np.ndarray, np.ndarray]:
    """Fit and score one layer in one graph: (LayerFit, scores (metric, test image, step),
    store positions of the test images)."""
    code = task_code(scheduler)
    fit = fit_graph(src, split, steps, n_folds, lambdas, code)
    parts, order = score_graph(src, split, steps, fit, label_spearman, code)
    fit, *scores = compute(fit, *parts, scheduler=scheduler, store=src.uri)
    return fit, np.concatenate(scores, axis=1), order


def fit_layer(src: LayerSource, split: Split, steps: np.ndarray, *, n_folds: int = 5,
              lambdas: np.ndarray = pb.DEFAULT_LAMBDAS, scheduler: Scheduler = None
              ) -> LayerFit:
    (fit,) = compute(fit_graph(src, split, steps, n_folds, lambdas, task_code(scheduler)),
                     scheduler=scheduler, store=src.uri)
    return fit


def score_layer(src: LayerSource, split: Split, steps: np.ndarray, fit: LayerFit,
                *, scheduler: Scheduler = None,
                label_spearman: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-image test scores (metric, test image, step) and the test images' positions."""
    parts, order = score_graph(src, split, steps, fit, label_spearman, task_code(scheduler))
    return np.concatenate(compute(*parts, scheduler=scheduler, store=src.uri), axis=1), order
