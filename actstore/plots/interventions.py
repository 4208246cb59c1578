"""Intervention figures: what was asked, what was drawn, what the label model saw; and how
the effect grows with the size of the edit, beside an equal-size random edit."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from actstore.intervene.results import open_intervention  # noqa: E402
from actstore.store import core as st  # noqa: E402

COLUMNS = ("original", "original label", "target", "probe edit", "its label",
           "random edit", "its label")


def intervention_grid(store: str, experiment_id: str, out_png: str, *, n_images: int = 6,
                      k: int = 0, strength: int = -1) -> str:
    """One row per image (its ``k``-th target, one strength): original, its label, target,
    the probe-edited output and its label, then the equal-size random edit and its label,
    titled with the scores, so a reader can check by eye that number and picture agree."""
    ds = open_intervention(store, experiment_id)
    settings = ds.attrs["settings"]
    rows = min(n_images, ds.sizes["image"])
    if rows == 0:
        raise ValueError(f"experiment {experiment_id}: no finished images to draw")
    ds = ds.isel(image=slice(0, rows), k=k, strength=strength)
    final = st.model_array(store, settings["model_variant"], "final_image")
    originals = np.asarray(final.oindex[ds["position"].values])
    binary = settings["kind"] == "binary"
    arms = list(ds["arm"].values)
    cols = COLUMNS[:5] + (COLUMNS[5:] if "random" in arms else ())
    maps = [ds["original_label"].values, ds["target"].values, ds["new_label"].values]
    lo = min(float(np.nanmin(m)) for m in maps)
    hi = max(float(np.nanmax(m)) for m in maps)
    fig, axes = plt.subplots(rows, len(cols), figsize=(1.6 * len(cols), 1.8 * rows),
                             squeeze=False)
    for r in range(rows):
        shown = [originals[r], maps[0][r], maps[1][r]]
        for arm in arms:
            shown += [ds["output"].sel(arm=arm).values[r], ds["new_label"].sel(arm=arm).values[r]]
        for c, img in enumerate(shown):
            ax = axes[r, c]
            ax.imshow(img) if img.ndim == 3 else ax.imshow(
                img, cmap="gray" if binary else "magma", vmin=lo, vmax=hi)
            ax.axis("off")
            if r == 0:
                ax.set_title(cols[c], fontsize=7)
        post = "  ".join(f"{a} {float(ds['score_post'].sel(arm=a).values[r]):.2f}" for a in arms)
        axes[r, 0].text(-0.08, 0.5, f"{ds['image'].values[r]}\n{'Dice' if binary else 'RMSE'} "
                        f"{float(ds['score_pre'].values[r]):.2f}→\n{post}",
                        transform=axes[r, 0].transAxes, fontsize=6, ha="right", va="center")
    fig.suptitle(f"{experiment_id}: {settings['method']} on {len(settings['layers'])} points,"
                 f" steps {settings['steps']}, strength {float(ds['strength']):g}", fontsize=8)
    return _save(fig, out_png)


def dose_response(records: list[dict], out_png: str) -> str:
    """Effect vs relative edit size, one panel per (capture kind, target): the median score
    after the probe edit (solid) and after the equal-size random edit (dashed) for each
    set of edited steps, the other-targets control (dotted) and the original (grey); the
    chosen setting is starred, and the edit-size cap (red) bounds what could be chosen."""
    panels = [(rec, kind) for rec in records
              for kind in dict.fromkeys(c["kind"] for c in rec["cells"])]
    if not panels:
        raise ValueError("dose_response: no sweep cells to draw")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (rec, kind) in zip(axes[0], panels):
        cells = [c for c in rec["cells"] if c["kind"] == kind]
        sizes: list[float] = []
        groups = list(dict.fromkeys(tuple(c["steps"]) for c in cells))
        for g, steps in enumerate(groups):
            line = sorted((c for c in cells if tuple(c["steps"]) == steps),
                          key=lambda c: c["strength"])
            x = [_num(c["relative_change"]) for c in line]
            sizes += [v for v in x if v > 0]
            color = colors[g % len(colors)]
            label = f"steps {steps[0]}-{steps[-1]}"
            ax.plot(x, [_num(c["post"]) for c in line], "o-", color=color,
                    label=f"probe, {label}")
            ax.plot(x, [_num(c["random"]) for c in line], "s--", color=color, alpha=0.7,
                    label=f"random, {label}")
            ax.plot(x, [_num(c["other"]) for c in line], ":", color=color, alpha=0.7)
            for xi, c in zip(x, line):
                ax.annotate(f"{c['strength']:g}", (xi, _num(c["post"])),
                            fontsize=5, xytext=(2, 2), textcoords="offset points")
        ax.axhline(cells[0]["pre"], color="grey", lw=0.8, label="original")
        chosen = rec["chosen"]
        if chosen and chosen["kind"] == kind:
            hit = [c for c in cells if c["steps"] == chosen["steps"]
                   and c["strength"] == chosen["strength"]]
            ax.plot([_num(hit[0]["relative_change"])], [_num(hit[0]["post"])], "*", ms=14,
                    color="k", label="chosen")
        if sizes:   # edits that blew the model up have no size to place
            ax.set_xscale("log")
        if rec.get("max_edit_size") is not None:   # settings right of it are never chosen
            shown = ax.get_xlim()                   # a cap beyond the data stays off-axis
            ax.axvline(rec["max_edit_size"], color="r", lw=0.8, ls="-.",
                       label=f"cap {rec['max_edit_size']:g} (larger: never chosen)")
            ax.set_xlim(shown)
        ax.set_xlabel("edit size ‖Δ‖/‖h‖ (median)", fontsize=7)
        ax.set_ylabel(f"median {'Dice' if rec['kind'] == 'binary' else 'RMSE'} to target",
                      fontsize=7)
        ax.set_title(f"{rec['target']} · {kind} ({len(rec['validation_images'])} validation "
                     "images)", fontsize=8)
        ax.tick_params(which="both", labelsize=5)
        ax.legend(fontsize=5)
    fig.suptitle("dose-response: probe edit vs equal-size random edit (dotted: same output "
                 "vs the other targets)", fontsize=8)
    return _save(fig, out_png)


def sweep_figures(store: str, sweep_ids: list[str], out_dir: str) -> list[str]:
    """The dose-response curves of these sweeps and the grid of each chosen setting on its
    evaluation images."""
    from actstore.intervene.sweep import list_sweeps

    sweeps = list_sweeps(store)
    records = [sweeps[s] for s in sweep_ids]
    out = [dose_response(records, str(Path(out_dir, "dose-response.png")))]
    for rec in [r for r in records if r["evaluation"]]:
        out.append(intervention_grid(store, rec["evaluation"],
                                     str(Path(out_dir, f"intervention-{rec['target']}.png"))))
    return out


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _save(fig, out_png: str) -> str:
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(out_png)
