"""The left panel of naming.png plots each target's best-layer curve relative to its last
step: score / last for Dice, last / score for RMSE. Its axis label, read from the figure,
says which for every metric drawn, and the curves drawn are those ratios of the stored
scores (a real store's emergence table: salient is scored by Dice, depth by RMSE)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from actstore.plots.naming import naming_curves, naming_figure
from actstore.probe.emergence import summary_table, target_scores
from actstore.probe.runs import open_emergence

# What the toy reader gives naming_figure's right panel (the shape reader_per_step returns).
NAMING = {"model": "trained", "split": "test", "n": 4, "steps": [0, 1],
          "per_step": {"shape": [0.25, 0.75]}, "final": {"shape": 1.0}}


@pytest.fixture(scope="module")
def emergence(ivstore):
    return open_emergence(ivstore["uri"]).load()


def _left(emergence, targets):
    fig = naming_figure(emergence.sel(target=targets), NAMING)
    return fig, fig.axes[0]


def _assert_curves_are(ax, emergence, targets, ratio):
    rows = [r for r in summary_table(emergence.sel(target=targets)) if "trained" in r]
    lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert len(lines) == len(rows) > 0
    for line, row in zip(lines, rows):
        score = target_scores(emergence["score"], row["target"]).sel(
            metric=row["metric"], layer=row["best_layer"], model="trained").values
        np.testing.assert_allclose(line.get_ydata(), ratio(score, score[-1]), rtol=1e-6)


@pytest.mark.parametrize("target, label, ratio", [
    ("depth", "rmse_label: last step's / score", lambda s, last: last / s),
    ("salient", "dice_label: score / last step's", lambda s, last: s / last),
], ids=["rmse", "dice"])
def test_one_target_label_says_what_is_plotted(emergence, target, label, ratio):
    fig, ax = _left(emergence, [target])
    try:
        assert ax.get_ylabel() == label
        _assert_curves_are(ax, emergence, [target], ratio)
    finally:
        plt.close(fig)


def test_both_directions_on_one_axis_name_each(emergence, ivstore, tmp_path):
    fig, ax = _left(emergence, ["salient", "depth"])
    try:
        assert ax.get_ylabel() == ("dice_label: score / last step's; "
                                   "rmse_label: last step's / score")
    finally:
        plt.close(fig)
    out = naming_curves(ivstore["uri"], NAMING, str(tmp_path / "naming.png"))
    assert plt.imread(out).shape[:2] == (352, 990)        # 9 x 3.2 in at 110 dpi
