"""PNG figures people would rather look at than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from actstore.access import open_store  # noqa: E402


def sample_grid(store: str, model: str = "trained", out_png: str = "samples.png",
                n_images: int = 6, n_steps: int = 5) -> str:
    """Rows: images; columns: the decoded x0 prediction at a few steps, then the final image.

    Shows at a glance what the model has settled on by each step, which is what the probes
    are later compared against.
    """
    view = open_store(store, model)
    k = min(n_images, len(view.image_index))
    if k == 0:
        raise ValueError(f"store {store}: no complete images to draw")
    steps = np.unique(np.linspace(0, view.n_steps - 1, n_steps).round().astype(int))
    x0 = view.x0_images.isel(image=slice(0, k), step=steps).values
    final = view.final_images.isel(image=slice(0, k)).values
    prompts = view.images["prompt"].values[:k]
    fig, axes = plt.subplots(k, len(steps) + 1, figsize=(1.6 * (len(steps) + 1), 1.7 * k),
                             squeeze=False)
    for r in range(k):
        for c, s in enumerate(steps):
            axes[r, c].imshow(x0[r, c])
            if r == 0:
                axes[r, c].set_title(f"x0 @ step {s}", fontsize=7)
        axes[r, -1].imshow(final[r])
        axes[r, -1].set_title(_wrap(prompts[r]), fontsize=5)
        for ax in axes[r]:
            ax.axis("off")
    fig.suptitle(f"{Path(store).name} — {model}", fontsize=8)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return str(out_png)


def _wrap(text: str, width: int = 28) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width and line:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "\n".join(lines[:3])
