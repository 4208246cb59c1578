"""When the probes read the scene vs when a classifier on the decoded image names it."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from actstore.probe.emergence import EMERGENCE_FRACTION, summary_table, target_scores  # noqa: E402
from actstore.probe.runs import open_emergence  # noqa: E402


def naming_curves(store: str, naming: dict, out_png: str) -> str:
    """Left: each target's best probe layer, score per step as a fraction of its last-step
    score (the emergence curves). Right: the toy reader's agreement with the prompt on each
    step's decoded x0 image, the final image's dashed. Same step axis, side by side."""
    em = open_emergence(store)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), sharex=True)
    for row in [r for r in summary_table(em) if "trained" in r]:   # not a control alone
        curve = target_scores(em["score"], row["target"]).sel(
            metric=row["metric"], layer=row["best_layer"], model="trained")
        final = curve.values[-1]
        rel = curve.values / final if row["metric"].startswith("dice") else final / curve.values
        left.plot(curve["step"].values, rel, "o-", ms=3,
                  label=f"{row['target']} ({row['metric']}, {row['best_layer']})")
    left.axhline(EMERGENCE_FRACTION, color="grey", ls=":", lw=0.8)
    left.set_ylabel("probe score / last step's", fontsize=8)
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
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return str(out_png)
