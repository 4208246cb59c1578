"""How sure is a score? Bootstrap intervals over test images.

A probe run scores a few hundred test images, so a mean score (and the step at which a
layer's curve reaches its bar) moves when other images are drawn. Each interval here is a
**percentile bootstrap**: ``BOOTSTRAP_SAMPLES`` resamples of the test images with
replacement, drawn once from a seeded generator and shared by every (metric, model, layer,
step) cell — a paired bootstrap, so trained and randomized curves, or two layers, are
compared on the same resampled image sets — and the interval is the 2.5th and 97.5th
percentile of the resampled statistic (95%). Undefined per-image scores (NaN correlations)
are left out of each resample's mean, as they are of the mean itself.

The emergence step is bootstrapped as a whole: every resample's mean curves give their own
emergence step (:func:`actstore.probe.emergence.emergence_steps`), and its interval is
taken over the resamples where it is defined (``inverted_cdf``: a step that occurred).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from actstore.probe.emergence import emergence_steps

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95


def resample_counts(n_images: int, n_boot: int = BOOTSTRAP_SAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(n_boot, n_images): how often each image is drawn in each resample. The draws are
    ``default_rng(seed).integers(0, n_images, (n_boot, n_images))``."""
    draws = np.random.default_rng(seed).integers(0, n_images, (n_boot, n_images))
    counts = np.zeros((n_boot, n_images))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    return counts


def bootstrap_means(per_image: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(sample, ...) NaN-skipping means of ``per_image`` (..., image) under each resample:
    two matrix products instead of a loop over resamples."""
    x = np.asarray(per_image, np.float64)
    ok = np.isfinite(x)
    sums = np.where(ok, x, 0.0) @ counts.T
    n = ok.astype(np.float64) @ counts.T
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(n > 0, sums / n, np.nan)
    return np.moveaxis(means, -1, 0)


def percentile_interval(samples: np.ndarray, level: float = CI_LEVEL,
                        method: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """(low, high) percentiles over axis 0 skipping NaN, NaN where no sample is defined:
    ``np.nanpercentile``'s ``linear`` or ``inverted_cdf``, vectorised (numpy's own loops
    over every cell in Python once a NaN is present)."""
    s = np.sort(samples, axis=0)                      # NaN sort last
    n = np.isfinite(s).sum(0)
    tail = (1 - level) / 2
    out = []
    for q in (tail, 1 - tail):
        if method == "inverted_cdf":
            lo = hi = np.clip(np.ceil(q * n).astype(int) - 1, 0, None)
            frac = 0.0
        elif method == "linear":
            pos = q * np.maximum(n - 1, 0)
            lo = np.floor(pos).astype(int)
            hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
            frac = pos - lo
        else:
            raise ValueError(f"percentile method {method!r}: use linear or inverted_cdf")
        a = np.take_along_axis(s, lo[None], 0)[0]
        b = np.take_along_axis(s, hi[None], 0)[0]
        out.append(np.where(n > 0, a + frac * (b - a), np.nan))
    return out[0], out[1]


def score_intervals(per_image: xr.DataArray, *, n_boot: int = BOOTSTRAP_SAMPLES,
                    seed: int = BOOTSTRAP_SEED, level: float = CI_LEVEL) -> xr.Dataset:
    """Bootstrap intervals of the mean score and of the emergence step.

    ``per_image`` (metric, model, layer, step, image) → ``ci_low``/``ci_high`` (metric,
    model, layer, step) and ``emergence_low``/``emergence_high`` (metric, model, layer).
    """
    per_image = per_image.transpose(..., "image")
    counts = resample_counts(per_image.sizes["image"], n_boot, seed)
    boot = bootstrap_means(per_image.values, counts)
    dims = per_image.dims[:-1]
    coords = {d: per_image[d] for d in dims}
    low, high = percentile_interval(boot, level)
    curves = xr.DataArray(boot, dims=("sample",) + dims, coords=coords)
    steps = emergence_steps(curves).transpose("sample", ...)
    e_low, e_high = percentile_interval(steps.values, level, method="inverted_cdf")
    edims = steps.dims[1:]
    out = xr.Dataset({"ci_low": (dims, low), "ci_high": (dims, high),
                      "emergence_low": (edims, e_low), "emergence_high": (edims, e_high)},
                     coords=coords)
    for var in out.data_vars.values():   # on each variable: they survive merges
        var.attrs.update({"interval": "percentile bootstrap over test images, paired "
                                      "across cells", "level": level, "n_boot": n_boot,
                          "seed": seed})
    return out
