"""Bootstrap intervals against a plain loop over resamples."""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from actstore.probe.uncertainty import score_intervals


def _emergence_brute(curve: np.ndarray, steps: np.ndarray, higher: bool) -> float:
    final = curve[-1]
    if not np.isfinite(final) or final <= 0:
        return np.nan
    for s, v in zip(steps, curve):
        if (v >= 0.9 * final) if higher else (v <= final / 0.9):
            return float(s)
    return np.nan


def test_intervals_match_brute_force_bootstrap():
    rng = np.random.default_rng(3)
    metrics, models, layers, steps, n = ["rmse_label", "pearson_label"], ["trained", "randomized"], \
        ["a", "b"], np.array([0, 2, 4, 6]), 23
    # curves that rise over steps with image-level noise, a few undefined per-image scores
    base = np.linspace(0.1, 0.8, len(steps))
    x = base[None, None, None, :, None] + 0.3 * rng.normal(size=(2, 2, 2, len(steps), n))
    x[1, 1, 1] -= 0.9               # a control whose final correlation is near or below 0
    x[:, :, :, :, 5] = np.where(rng.random((2, 2, 2, len(steps))) < 0.5, np.nan, 0.3)
    per_image = xr.DataArray(x, dims=("metric", "model", "layer", "step", "image"),
                             coords={"metric": metrics, "model": models, "layer": layers,
                                     "step": steps})
    B, seed = 200, 7
    ours = score_intervals(per_image, n_boot=B, seed=seed)

    draws = np.random.default_rng(seed).integers(0, n, (B, n))
    means = np.stack([np.nanmean(x[..., d], axis=-1) for d in draws])     # (B, ...)
    low, high = np.percentile(means, [2.5, 97.5], axis=0)
    np.testing.assert_allclose(ours["ci_low"].values, low, rtol=1e-10)
    np.testing.assert_allclose(ours["ci_high"].values, high, rtol=1e-10)

    for i, metric in enumerate(metrics):
        for j in range(len(models)):
            for k in range(len(layers)):
                found = [_emergence_brute(means[b, i, j, k], steps, metric != "rmse_label")
                         for b in range(B)]
                found = np.array([f for f in found if np.isfinite(f)])
                got = ours[["emergence_low", "emergence_high"]].isel(metric=i, model=j, layer=k)
                if len(found) == 0:
                    assert np.isnan(got["emergence_low"]) and np.isnan(got["emergence_high"])
                    continue
                srt = np.sort(found)
                # inverted_cdf: the smallest value whose empirical CDF reaches q
                lo = srt[int(np.ceil(0.025 * len(srt))) - 1]
                hi = srt[int(np.ceil(0.975 * len(srt))) - 1]
                assert float(got["emergence_low"]) == lo and float(got["emergence_high"]) == hi, \
                    (metric, j, k, float(got["emergence_low"]), lo, float(got["emergence_high"]), hi)
    assert ours["ci_low"].attrs["n_boot"] == B and ours["ci_low"].attrs["seed"] == seed


def test_intervals_are_reproducible_and_cover_the_mean():
    rng = np.random.default_rng(0)
    x = xr.DataArray(rng.normal(size=(1, 1, 1, 3, 40)) + 1.0,
                     dims=("metric", "model", "layer", "step", "image"),
                     coords={"metric": ["dice_label"], "model": ["trained"], "layer": ["a"],
                             "step": [0, 1, 2]})
    a, b = score_intervals(x), score_intervals(x)
    assert a.identical(b)
    mean = x.mean("image")
    assert bool(((a["ci_low"] < mean) & (mean < a["ci_high"])).all())
    # ~ 2 × 1.96 σ/√n wide for a normal sample
    width = float((a["ci_high"] - a["ci_low"]).mean())
    assert 0.4 < width / (2 * 1.96 / np.sqrt(40)) < 1.6


def test_percentile_interval_equals_numpy_with_missing_samples():
    from actstore.probe.uncertainty import percentile_interval

    x = np.random.default_rng(1).normal(size=(101, 6))
    x[::3, 1] = np.nan
    x[:, 2] = np.nan
    x[1:, 3] = np.nan
    for method in ("linear", "inverted_cdf"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = np.nanpercentile(x, [2.5, 97.5], axis=0, method=method)
        ours = percentile_interval(x, 0.95, method)
        np.testing.assert_allclose(np.stack(ours), ref, rtol=1e-12, equal_nan=True)
