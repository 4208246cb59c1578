"""PNG figures people would rather look at than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from actstore.store.view import open_store  # noqa: E402


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
    steps = steps if view.has_x0 else steps[:0]     # --no-x0: the final images alone
    x0 = view.x0_images.isel(image=slice(0, k), step=steps).values if view.has_x0 else None
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
    return _save(fig, out_png)


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


def emergence_curves(store: str, target: str, out_png: str) -> str:
    """:func:`emergence_figure` saved as a PNG."""
    return _save(emergence_figure(store, target), out_png)


def emergence_figure(store: str, target: str) -> plt.Figure:
    """Score vs step, one panel per layer; trained solid, randomized dashed, each with its
    95% bootstrap band over test images; the headline metric's emergence step marked with
    its bootstrap interval. Returned unsaved, so its artists can be checked."""
    from actstore.probe.emergence import emergence_steps, primary_metric
    from actstore.probe.runs import latest_run, open_scores

    ds = open_scores(store, latest_run(store, target)).drop_vars("per_image").load()
    metrics = [m for m in ds["metric"].values if str(m).endswith("_label")]
    headline = primary_metric(metrics)
    emerged = emergence_steps(ds["mean"])
    layers = list(ds["layer"].values)
    cols = 4
    rows = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False,
                             sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, layer in zip(axes.flat, layers):
        for k, metric in enumerate(metrics):
            for model, style in (("trained", "-"), ("randomized", "--")):
                if model not in ds["model"].values:
                    continue
                cell = ds.sel(metric=metric, model=model, layer=layer)
                color = colors[k % len(colors)]
                ax.plot(ds["step"], cell["mean"], style, color=color, label=f"{metric} {model}")
                if "ci_low" in cell:
                    ax.fill_between(ds["step"], cell["ci_low"], cell["ci_high"], color=color,
                                    alpha=0.15, linewidth=0)
                if metric == headline and "emergence_low" in cell:
                    _mark_emergence(ax, cell, float(emerged.sel(metric=metric, model=model,
                                                                layer=layer)), color)
        ax.set_title(layer, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.supxlabel("denoising step")
    fig.suptitle(f"{target}: test score per step, 95% bootstrap bands ({headline} is the "
                 "headline; ▲ its emergence step and interval)", fontsize=10)
    return fig


def _mark_emergence(ax, cell, step: float, color) -> None:
    if np.isnan(step):
        return
    y = float(cell["mean"].sel(step=step))
    lo, hi = float(cell["emergence_low"]), float(cell["emergence_high"])
    xerr = [[step - lo], [hi - step]] if np.isfinite(lo) and np.isfinite(hi) else None
    ax.errorbar([step], [y], xerr=xerr, fmt="^", color=color, markersize=4, capsize=2,
                linewidth=1)


def score_heatmap(store: str, target: str, out_png: str) -> str:
    """Layer × step heatmap of the headline metric, trained next to randomized."""
    from actstore.probe.emergence import higher_is_better, primary_metric
    from actstore.probe.runs import latest_run, open_scores

    ds = open_scores(store, latest_run(store, target))["mean"].load()
    metric = primary_metric(ds["metric"].values)
    models = sorted(ds["model"].values, key=lambda m: m != "trained")  # trained first
    data = ds.sel(metric=metric)
    vmin, vmax = float(data.min()), float(data.max())
    height = max(4.5, 1.5 + 0.11 * data.sizes["layer"])   # legible names for any count
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models) + 2.6, height),
                             squeeze=False, sharey=True)
    fig.subplots_adjust(left=0.3, right=0.85, wspace=0.05)
    cmap = "viridis" if higher_is_better(metric) else "viridis_r"
    for ax, model in zip(axes[0], models):
        im = ax.imshow(data.sel(model=model).values, aspect="auto", cmap=cmap, vmin=vmin,
                       vmax=vmax)
        ax.set_yticks(range(data.sizes["layer"]), data["layer"].values, fontsize=6)
        ax.set_xticks(range(data.sizes["step"]), data["step"].values, fontsize=6)
        ax.set_xlabel("denoising step")
        ax.set_title(f"{model}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label=metric)
    fig.suptitle(f"{target}: {metric} per layer and step", fontsize=10)
    return _save(fig, out_png, tight=False)


def kind_comparison(store: str, out_png: str, targets: list[str] | None = None) -> str:
    """Per target, the best score among each capture kind's layers at every step (trained
    solid, randomized dashed): does self-attention beat the residual stream, the ResNets
    and the VAE decoder, as the paper found for SD?"""
    from actstore.probe.emergence import (higher_is_better, layer_kinds, primary_metric,
                                          target_scores)
    from actstore.probe.runs import open_emergence

    score = open_emergence(store)["score"].load()
    targets = targets or [str(t) for t in score["target"].values]
    present = list(dict.fromkeys(layer_kinds(score["layer"].values)))   # same colour per kind
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(targets), figsize=(3.6 * len(targets), 3.0), squeeze=False)
    for ax, target in zip(axes[0], targets):
        sub = target_scores(score, target)
        metric = primary_metric(sub["metric"].values)
        curve, kinds = sub.sel(metric=metric), layer_kinds(sub["layer"].values)
        for k, kind in enumerate(present):
            if kind not in kinds:
                continue
            mine = curve.isel(layer=np.flatnonzero(kinds == kind))
            best = mine.max("layer") if higher_is_better(metric) else mine.min("layer")
            for model, style in (("trained", "-"), ("randomized", "--")):
                if model in best["model"].values:
                    ax.plot(best["step"], best.sel(model=model), style,
                            color=colors[k % len(colors)],
                            label=f"{kind}" if model == "trained" else None)
        ax.set_title(f"{target}: best {metric} per kind", fontsize=8)
        ax.set_xlabel("denoising step", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=6, title="solid trained, dashed randomized", title_fontsize=6)
    return _save(fig, out_png)


def figure4_grid(store: str, target: str, out_png: str, *, layer: str | None = None,
                 n_images: int = 3, n_steps: int = 5) -> str:
    """The paper's Figure 4: per step, the decoded x0, the probe's prediction from the
    activations, and the label model run on the x0 image — the probe sees the scene
    before the image shows it."""
    from actstore.store.view import open_store
    from actstore.probe.emergence import lead_model, summary_table
    from actstore.label.labels import open_labels
    from actstore.metrics import upsample
    from actstore.probe.runs import get_run, latest_run, load_probe, open_emergence

    run = latest_run(store, target)
    if layer is None:
        rows = [r for r in summary_table(open_emergence(store)) if r["target"] == target]
        layer = rows[0]["best_layer"]
    model = lead_model(get_run(store, run)["models"])   # a control-alone run draws the control
    probe = load_probe(store, run, layer, model)
    view = open_store(store, model=model)
    labels = open_labels(store, target)
    test = view.images["image"].values[view.images["split"].values == "test"][:n_images]
    steps = [probe["steps"][i] for i in np.unique(np.linspace(
        0, len(probe["steps"]) - 1, n_steps).round().astype(int))]
    has_x0 = "x0" in labels
    per = 3 if has_x0 else 2
    fig, axes = plt.subplots(per * len(test), len(steps) + 1,
                             figsize=(1.5 * (len(steps) + 1), 1.5 * per * len(test)),
                             squeeze=False)
    binary = probe["kind"] == "binary"
    for i, image in enumerate(test):
        acts = view[layer].sel(image=image).values.astype(np.float32)   # (step, h, w, C)
        final = view.final_images.sel(image=image).values
        for c, s in enumerate(steps):
            k = probe["steps"].index(s)
            pred = acts[s] @ probe["weights"][k] + probe["bias"][k]
            pred = upsample(pred[None], labels["full"].shape[1:])[0]
            shown = [view.x0_images.sel(image=image, step=s).values if view.has_x0
                     else final, (pred > 0) if binary else pred]
            if has_x0:
                shown.append(labels["x0"].sel(image=image, step=s).values)
            for r, img in enumerate(shown):
                ax = axes[per * i + r, c]
                ax.imshow(img, cmap=None if r == 0 else "magma")
                if i == 0 and r == 0:
                    ax.set_title(f"step {s}", fontsize=7)
        truth = [final, labels["full"].sel(image=image).values]
        for r, img in enumerate(truth + ([truth[1]] if has_x0 else [])):
            axes[per * i + r, -1].imshow(img, cmap=None if r == 0 else "magma")
        axes[per * i, -1].set_title("final / label", fontsize=7)
        first = "x0" if view.has_x0 else "final (no x0)"
        for r, name in enumerate([first, "probe", "label(x0)"][:per]):
            axes[per * i + r, 0].set_ylabel(name, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{target}: {layer}" + ("" if model == "trained" else f" ({model})"),
                 fontsize=9)
    return _save(fig, out_png)


def _save(fig, out_png: str, tight: bool = True) -> str:
    if tight:
        fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return str(out_png)


def probe_figures(store: str, target: str, out_dir: str) -> list[str]:
    """Every figure of a target's latest probe run, into ``out_dir``."""
    out = Path(out_dir)
    return [emergence_curves(store, target, str(out / f"{target}-curves.png")),
            score_heatmap(store, target, str(out / f"{target}-heatmap.png")),
            figure4_grid(store, target, str(out / f"{target}-figure4.png")),
            kind_comparison(store, str(out / f"{target}-kinds.png"), [target])]
