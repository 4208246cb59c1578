"""Scoring interventions and summarising an experiment per strength and arm.

Every number is oriented so that "toward the target" reads the same for both metrics:
``gain`` is Dice up or RMSE down. An effect counts as specific only if it beats, at the
same strength, both controls: the random-direction edit of equal size (did *this*
direction matter, or would any edit this large do it?) and the same output scored against
the image's other targets (did the image follow *this* target, or just change?).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import binomtest

import actstore
from actstore.intervene.edits import STAT_NAMES
from actstore.kinds import BINARY
from actstore.metrics import dice, rmse

if TYPE_CHECKING:
    import zarr

    from actstore.intervene.plan import Plan


def metric_of(kind: str) -> str:
    return "dice" if kind == BINARY else "rmse"


def sign_of(kind: str) -> float:
    """+1 if higher is toward the target (Dice), -1 if lower is (RMSE)."""
    return 1.0 if kind == BINARY else -1.0


def score(labels: np.ndarray, targets: np.ndarray, kind: str) -> np.ndarray:
    """Dice of masks or RMSE of normalized depth, per leading index: labels and targets
    (..., H, W) of the same shape → (...)."""
    lead = targets.shape[:-2]
    a, b = labels.reshape(-1, *labels.shape[-2:]), targets.reshape(-1, *targets.shape[-2:])
    out = dice(a > 0.5, b > 0.5) if kind == BINARY else rmse(a, b)
    return np.asarray(out, np.float32).reshape(lead)


def score_other(labels: np.ndarray, targets: np.ndarray, kind: str) -> np.ndarray:
    """Each output (n, K, ..., H, W) scored against the same image's other K-1 targets
    (n, K, H, W), averaged: an edit that only adds clutter raises Dice against every
    target alike. NaN when K = 1."""
    n, k = targets.shape[:2]
    extra = labels.ndim - targets.ndim
    if k < 2:
        return np.full(labels.shape[:-2], np.nan, np.float32)
    out = np.zeros(labels.shape[:-2], np.float32)
    for j in range(1, k):   # rolled: output k against target (k + j) mod K
        other = np.roll(targets, -j, axis=1).reshape(n, k, *(1,) * extra, *targets.shape[2:])
        out += score(labels, np.broadcast_to(other, labels.shape), kind)
    return out / (k - 1)


def describe(values: np.ndarray) -> dict[str, float]:
    """Median first (the paper's statistic), then the spread of the distribution."""
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    if not v.size:
        return {"n": 0}
    q = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {"median": float(q[2]), "mean": float(v.mean()), "q10": float(q[0]),
            "q25": float(q[1]), "q75": float(q[3]), "q90": float(q[4]), "n": int(v.size)}


def share(wins: np.ndarray) -> dict[str, float] | None:
    """Share of paired comparisons won, and the one-sided sign-test p-value against 1/2."""
    wins = np.asarray(wins, bool).ravel()
    if not wins.size:
        return None
    return {"share": float(wins.mean()), "n": int(wins.size),
            "p_value": float(binomtest(int(wins.sum()), wins.size, 0.5,
                                       alternative="greater").pvalue)}


def arm_summary(pre: np.ndarray, post: np.ndarray, other: np.ndarray, stats: np.ndarray, *,
                kind: str, reference: np.ndarray | None = None) -> dict:
    """One (strength, arm): post and other-target scores over finite edits, the shares that
    moved toward their target, beat the other targets and (if given) the reference arm."""
    sgn = sign_of(kind)
    ok = np.isfinite(stats).all(-1) & np.isfinite(post)
    out = {"post": describe(post[ok]), "other_targets": describe(other[ok]),
           "non_finite": int((~ok).sum()),
           "improved": share((sgn * (post - pre) > 0)[ok]),
           "specific": share((sgn * (post - other) > 0)[ok & np.isfinite(other)]),
           "edit": {name: float(np.median(stats[ok][:, j])) if ok.any() else None
                    for j, name in enumerate(STAT_NAMES)}}
    if reference is not None:
        both = ok & np.isfinite(reference)
        out["beats_random"] = share((sgn * (post - reference) > 0)[both])
    return out


def effects(summary_row: dict, pre_median: float, kind: str) -> dict[str, float | None]:
    """Oriented median differences at one strength: gain over the original, margin over
    the random control and over the other targets; ``specific`` is the smallest of the
    three (what the sweep maximises)."""
    sgn = sign_of(kind)
    probe = summary_row["probe"]
    post = probe["post"].get("median")
    if post is None:
        return {"gain": None, "over_random": None, "over_other": None, "specific": None}
    gain = sgn * (post - pre_median)
    other = probe["other_targets"].get("median")
    over_other = None if other is None else sgn * (post - other)
    rnd = summary_row.get("random", {}).get("post", {}).get("median")
    over_random = None if rnd is None else sgn * (post - rnd)
    parts = [v for v in (gain, over_random, over_other) if v is not None]
    return {"gain": gain, "over_random": over_random, "over_other": over_other,
            "specific": min(parts)}


def summarize_arrays(pre: np.ndarray, post: np.ndarray, other: np.ndarray, stats: np.ndarray,
                     *, strengths: list[float], arms: list[str], kind: str) -> dict:
    """pre (n, K); post, other (n, K, S, A); stats (n, K, S, A, stat) → the dose table."""
    rows = []
    pre_d = describe(pre)
    for i, s in enumerate(strengths):
        row = {"strength": float(s)}
        ref = post[:, :, i, arms.index("random")] if "random" in arms else None
        for j, arm in enumerate(arms):
            row[arm] = arm_summary(pre, post[:, :, i, j], other[:, :, i, j], stats[:, :, i, j],
                                   kind=kind, reference=ref if arm == "probe" else None)
        row["effect"] = effects(row, pre_d.get("median", np.nan), kind)
        rows.append(row)
    return {"metric": metric_of(kind), "pre": pre_d, "dose": rows}


def summarize(plan: Plan, group: zarr.Group) -> dict:
    """An experiment's summary: its settings, then the dose table."""
    body = summarize_arrays(group["score_pre"][...], group["score_post"][...],
                            group["score_other"][...], group["edit_stats"][...],
                            strengths=plan.record["strengths"], arms=plan.record["arms"],
                            kind=plan.kind)
    return {"experiment_id": plan.experiment_id, "probe_run": plan.run_id,
            "target": plan.target, "kind": plan.kind, "method": plan.settings.method,
            "direction": plan.settings.direction, "halves": plan.settings.halves,
            "layers": plan.layers, "steps": plan.steps, "images": len(plan.image_ids),
            "image_ids": plan.image_ids,
            "interventions": int(group["score_pre"].size), **body,
            "provenance": plan.record.get("provenance"),
            "actstore_version": actstore.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
