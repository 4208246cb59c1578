"""The intervention figure: what was asked, what was drawn, what the label model saw."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from actstore.store import core as st  # noqa: E402
from actstore.intervene.results import open_intervention  # noqa: E402

COLUMNS = ("original", "original label", "target", "intervened", "new label")


def intervention_grid(store: str, experiment_id: str, out_png: str, n_images: int = 6,
                      k: int = 0) -> str:
    """One row per image (its ``k``-th target): original, its label, target, intervened
    output, new label, titled with the pre → post score, so a reader can check by eye
    that the number and the picture agree."""
    ds = open_intervention(store, experiment_id)
    settings = ds.attrs["settings"]
    rows = min(n_images, ds.sizes["image"])
    if rows == 0:
        raise ValueError(f"experiment {experiment_id}: no finished images to draw")
    final = st.model_array(store, settings["model_variant"], "final_image")
    positions = ds["position"].values[:rows]
    originals = np.asarray(final.oindex[positions])
    binary = settings["kind"] == "binary"
    metric = "Dice" if binary else "RMSE"
    labels = [ds["original_label"].values[:rows], ds["target"].isel(k=k).values[:rows],
              ds["new_label"].isel(k=k).values[:rows]]
    lo = min(float(np.min(m)) for m in labels)
    hi = max(float(np.max(m)) for m in labels)
    cmap = "gray" if binary else "magma"
    fig, axes = plt.subplots(rows, len(COLUMNS), figsize=(1.7 * len(COLUMNS), 1.8 * rows),
                             squeeze=False)
    for r in range(rows):
        shown = [originals[r], labels[0][r], labels[1][r],
                 ds["output"].isel(image=r, k=k).values, labels[2][r]]
        for c, img in enumerate(shown):
            ax = axes[r, c]
            if img.ndim == 3:
                ax.imshow(img)
            else:
                ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
            ax.axis("off")
            if r == 0:
                ax.set_title(COLUMNS[c], fontsize=7)
        pre = float(ds["score_pre"].isel(image=r, k=k))
        post = float(ds["score_post"].isel(image=r, k=k))
        axes[r, 0].text(-0.08, 0.5, f"{ds['image'].values[r]}\n{metric} {pre:.2f}→{post:.2f}",
                        transform=axes[r, 0].transAxes, fontsize=6, ha="right", va="center")
    fig.suptitle(f"{experiment_id}: {settings['method']} on {len(settings['layers'])} layers,"
                 f" steps {settings['steps']}", fontsize=8)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(out_png)
