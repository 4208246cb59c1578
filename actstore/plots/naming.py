"""When the probes read the scene vs when a classifier on the decoded image names it."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import xarray as xr  # noqa: E402

from actstore.probe.emergence import (EMERGENCE_FRACTION, higher_is_better,  # noqa: E402
                                      summary_table, target_scores)
from actstore.probe.runs import open_emergence  # noqa: E402


def relative_label(metrics: Iterable[str]) -> str:
    """The left axis's label: each curve is its score over the last step's for a score
    where higher is better (Dice), the last step's over the score for one where lower is
    (RMSE), so that 1 is the last step and the emergence bar is 0.9 either way. One label
    said 'probe score / last step's' for both, which for depth was the inverse of what was
    drawn (before 2026-12-06)."""
    parts = [f"{m}: score / last step's" if higher_is_better(m) else
             f"{m}: last step's / score" for m in dict.fromkeys(metrics)]
    return "; ".join(parts) or "probe score relative to the last step's"


def naming_figure(emergence: xr.Dataset, naming: dict) -> plt.Figure:
    """Left: each target's best probe layer, score per step relative to its last-step score
    (the emergence curves; :func:`relative_label`). Right: the toy reader's agreement with
    the prompt on each step's decoded x0 image, the final image's dashed. Same step axis."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), sharex=True)
    rows = [r for r in summary_table(emergence) if "trained" in r]   # not a control alone
    for row in rows:
        curve = target_scores(emergence["score"], row["target"]).sel(
            metric=row["metric"], layer=row["best_layer"], model="trained")
        final = curve.values[-1]
        rel = curve.values / final if higher_is_better(row["metric"]) else final / curve.values
        left.plot(curve["step"].values, rel, "o-", ms=3,
                  label=f"{row['target']} ({row['metric']}, {row['best_layer']})")
    left.axhline(EMERGENCE_FRACTION, color="grey", ls=":", lw=0.8)
    left.set_ylabel(relative_label(r["metric"] for r in rows), fontsize=7)
    left.set_title("probes read the scene from the activations", fontsize=9)
    left.legend(fontsize=5)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (question, values) in enumerate(naming["per_step"].items()):
        c = colors[i % len(colors)]
        right.plot(naming["steps"], values, "o-", ms=3, color=c, label=question)
        right.axhline(naming["final"][question], color=c, ls="--", lw=0.8)
    right.set_ylim(0, 1.02)
    right.set_ylabel("reader agrees with the prompt", fontsize=8)
    right.set_title(f"toy reader on each step's x0 image\n({naming['n']} {naming['split']} "
                    "images; dashed: on the final image)", fontsize=9)
    right.legend(fontsize=6)
    for ax in (left, right):
        ax.set_xlabel("denoising step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def naming_curves(store: str, naming: dict, out_png: str) -> str:
    """:func:`naming_figure` of the store's emergence table, drawn to ``out_png``."""
    fig = naming_figure(open_emergence(store), naming)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return str(out_png)
