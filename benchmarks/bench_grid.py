"""The probe grid on a real store, against the authors' recipe and against a plain read.

1. **Authors' method vs closed form**, same cells of the same store, one run: per
   (layer, step) cell an ``nn.Linear(C, 1)`` trained with Adam (lr 1e-3, batch 4 images,
   30 epochs, reading its batches from the store each epoch, MSE for continuous targets,
   cross-entropy for binary), against actstore's fit of the same cells (``run_probes``).
   Both are scored on the test split with the same metric code.
2. **Whole grid vs one plain read pass**: ``run_probes`` on every layer × step × model vs
   reading every activation array once (dask ``.sum()``), same scheduler.
3. **Peak memory vs number of images**: the grid fit on the first half of the images and
   on all of them, each in a fresh process (peak RSS).

    python benchmarks/bench_grid.py --store runs/main/store.zarr --target depth
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actstore.label.labels import open_labels  # noqa: E402
from actstore.metrics import summarize  # noqa: E402
from actstore.probe.grid import fit_layer, metric_names, score_layer  # noqa: E402
from actstore.probe.runs import load_targets, run_probes  # noqa: E402
from actstore.probe.scoring import block_scores  # noqa: E402
from actstore.runtime import task_threads  # noqa: E402
from actstore.store.core import layer_path  # noqa: E402
from actstore.store.view import open_store  # noqa: E402


def _source(sources, model: str, layer: str):
    from dataclasses import replace
    return replace(sources[layer], activation=layer_path(model, layer))


def adam_cell(view, layer: str, step: int, split, tokens: np.ndarray, binary: bool,
              epochs: int = 30, batch: int = 4, seed: int = 0) -> tuple[float, np.ndarray]:
    """The authors' per-cell recipe; returns (seconds, test predictions (image, h, w))."""
    torch.manual_seed(seed)
    da = view[layer].isel(step=step)
    train = np.flatnonzero(split.train[view.image_index])
    test = np.flatnonzero(split.test[view.image_index])
    probe = torch.nn.Linear(da.shape[-1], 1)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss() if binary else torch.nn.MSELoss()
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for lo in range(0, len(train), batch):
            idx = train[rng.permutation(len(train))][lo:lo + batch]
            x = torch.from_numpy(da.isel(image=np.sort(idx)).values.astype(np.float32))
            y = torch.from_numpy(tokens[view.image_index[np.sort(idx)]])
            opt.zero_grad()
            loss = loss_fn(probe(x)[..., 0], y)
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        x = torch.from_numpy(da.isel(image=test).values.astype(np.float32))
        pred = probe(x)[..., 0].numpy()
    return seconds, pred


def compare_with_adam(store: str, target: str, cells: list[tuple[str, int]]) -> None:
    """Fit time per cell, both sides timed alike: training only (Adam: 30 epochs reading
    its batches from the store; closed form: its one read of the layer's train blocks plus
    the λ-by-CV solves), then both scored on the test split by the same code, untimed."""
    attrs, split, sources = load_targets(store, target)
    labels = open_labels(store, target).load()
    binary = attrs["kind"] == "binary"
    view = open_store(store)
    metric = "dice_label" if attrs["kind"] == "binary" else "rmse_label"
    names = metric_names(attrs["kind"])
    by_layer: dict[str, list[int]] = {}
    for layer, step in cells:
        by_layer.setdefault(layer, []).append(step)
    closed, ours = 0.0, {}
    with task_threads():
        for layer, steps in by_layer.items():
            steps = np.asarray(steps)
            t0 = time.perf_counter()
            src = _source(sources, view.model, layer)
            fit = fit_layer(src, split, steps, scheduler="threads")
            closed += time.perf_counter() - t0
            per_image, _ = score_layer(src, split, steps, fit, scheduler="threads")
            for k, step in enumerate(steps):
                ours[layer, int(step)] = summarize(per_image[names.index(metric), :, k])["mean"]
    print(f"closed form: {len(cells)} cells fitted in {closed:.2f} s "
          f"({closed / len(cells):.3f} s/cell: read + CV solves)")
    adam_total = 0.0
    for layer, step in cells:
        tokens = labels[attrs["layer_arrays"][layer]].values
        full = labels["full"].values
        if binary:
            tokens, full = (tokens > 0.5).astype(np.float32), (full > 0.5).astype(np.float32)
        seconds, pred = adam_cell(view, layer, step, split, tokens, binary)
        adam_total += seconds
        theirs = block_scores(pred[:, None], tokens[split.test], full[split.test], binary)
        theirs = summarize(theirs[names.index(metric), :, 0])["mean"]
        print(f"  {layer:28s} step {step:2d}: Adam {seconds:7.2f} s  {metric} Adam "
              f"{theirs:.3f} vs closed form {ours[layer, step]:.3f}", flush=True)
    per_cell_adam = adam_total / len(cells)
    print(f"Adam {per_cell_adam:.2f} s/cell vs closed form {closed / len(cells):.3f} s/cell: "
          f"{per_cell_adam / (closed / len(cells)):.1f}x faster")


def grid_vs_read(store: str, target: str) -> None:
    """Whole grid (every model × layer × step) against one plain read of the same arrays:
    the fit alone (reads the train blocks) and the full probe run (fit, score pass over the
    test blocks, results written to the store)."""
    import dask

    from actstore.store.core import model_variants

    _, split, sources = load_targets(store, target)
    variants = model_variants(store)
    with task_threads():
        t0 = time.perf_counter()
        for m in variants:
            view = open_store(store, m)
            dask.compute(*[view[layer].data.sum(dtype=np.float32) for layer in view.layers],
                         scheduler="threads")
        read = time.perf_counter() - t0
        t0 = time.perf_counter()
        for m in variants:
            view = open_store(store, m)
            for layer in view.layers:
                fit_layer(_source(sources, m, layer), split, np.arange(view.n_steps),
                          scheduler="threads")
        fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_probes(store, target, scheduler="threads", progress=False)
    grid = time.perf_counter() - t0
    print(f"whole grid ({', '.join(variants)}): plain read pass {read:.2f} s; fit {fit:.2f} s "
          f"(ratio {fit / read:.2f}); fit + score + store {grid:.2f} s (ratio {grid / read:.2f})")


def peak_memory(stores: list[str], target: str) -> None:
    """Peak RSS of a whole-grid fit, each store in a fresh process (stores of different
    sizes show whether memory grows with the number of images)."""
    code = ("import sys, resource; sys.path.insert(0, {root!r});"
            "from actstore.probe.runs import run_probes;"
            "run_probes({store!r}, {target!r}, scheduler='threads', progress=False);"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    for store in stores:
        n = open_store(store).root_attrs["n_images"]
        out = subprocess.run([sys.executable, "-c", code.format(root=str(ROOT), store=store,
                                                                  target=target)],
                             capture_output=True, text=True, check=True)
        print(f"peak RSS, {n} images ({store}): {int(out.stdout.split()[-1]) / 1024:.0f} MB")


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--target", default="depth")
    ap.add_argument("--cells", default="up_blocks.3.attentions.0:14,up_blocks.2.attentions.1:14,"
                    "mid_block.attentions.0:4")
    ap.add_argument("--skip", default="", help="comma list of: adam, read, memory")
    ap.add_argument("--memory-stores", default="", help="comma list of stores (with the "
                    "target labelled) of different sizes for the peak-memory comparison")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",")]
    if "adam" not in args.skip:
        compare_with_adam(args.store, args.target, cells)
    if "read" not in args.skip:
        grid_vs_read(args.store, args.target)
    if "memory" not in args.skip:
        peak_memory([args.store] + [s for s in args.memory_stores.split(",") if s], args.target)


if __name__ == "__main__":
    main()
