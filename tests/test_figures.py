"""What the emergence figure draws, read back from its matplotlib artists rather than from
the PNG's size: per panel (layer) one band per (metric, model) spanning the stored 95%
bootstrap interval at every step, and the headline metric's emergence step marked with its
interval."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from actstore.plots.figures import emergence_figure
from actstore.probe.emergence import emergence_steps, primary_metric
from actstore.probe.runs import open_scores


@pytest.fixture(scope="module")
def drawn(ivstore):
    fig = emergence_figure(ivstore["uri"], "salient")
    ds = open_scores(ivstore["uri"], ivstore["runs"]["salient"]).drop_vars("per_image").load()
    yield fig, ds
    plt.close(fig)


def _band_y(band: PolyCollection, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A fill_between band's lower and upper edge at ``steps`` (its polygon's vertices)."""
    low, high = np.full(len(steps), np.nan), np.full(len(steps), np.nan)
    for path in band.get_paths():
        for x, y in path.vertices:
            i = int(np.argmin(np.abs(steps - x)))
            low[i] = y if np.isnan(low[i]) else min(low[i], y)
            high[i] = y if np.isnan(high[i]) else max(high[i], y)
    return low, high


def test_each_curve_has_its_bootstrap_band(drawn):
    fig, ds = drawn
    metrics = [m for m in ds["metric"].values if str(m).endswith("_label")]
    models = [m for m in ("trained", "randomized") if m in ds["model"].values]
    steps = ds["step"].values.astype(float)
    panels = [ax for ax in fig.axes if ax.get_title() in set(ds["layer"].values)]
    assert len(panels) == ds.sizes["layer"]
    for ax in panels:
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == len(metrics) * len(models), ax.get_title()
        cells = [(m, model) for m in metrics for model in models]   # the drawing order
        for band, (metric, model) in zip(bands, cells):
            cell = ds.sel(metric=metric, model=model, layer=ax.get_title())
            low, high = _band_y(band, steps)
            want_low, want_high = cell["ci_low"].values, cell["ci_high"].values
            ok = np.isfinite(want_low) & np.isfinite(want_high)
            assert ok.any()
            np.testing.assert_allclose(low[ok], want_low[ok], rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(high[ok], want_high[ok], rtol=1e-6, atol=1e-9)
            assert (high[ok] - low[ok] > 0).any()      # a band, not a line


def test_emergence_marked_with_its_interval(drawn):
    fig, ds = drawn
    metrics = [m for m in ds["metric"].values if str(m).endswith("_label")]
    headline = primary_metric(metrics)
    emerged = emergence_steps(ds["mean"])
    for ax in fig.axes:
        layer = ax.get_title()
        if layer not in ds["layer"].values:
            continue
        want = [float(emerged.sel(metric=headline, model=model, layer=layer))
                for model in ("trained", "randomized") if model in ds["model"].values]
        marks = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
        assert len(marks) == sum(np.isfinite(w) for w in want), layer
        for mark in marks:
            x = float(mark.lines[0].get_xdata()[0])
            assert x in want
