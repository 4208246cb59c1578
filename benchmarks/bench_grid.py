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

from actstore.access import open_store  # noqa: E402
from actstore.grid import per_image_scores  # noqa: E402
from actstore.metrics import summarize  # noqa: E402
from actstore.probe_runs import load_targets, open_scores, run_probes  # noqa: E402


def adam_cell(view, layer: str, step: int, targets, epochs: int = 30, batch: int = 4,
              seed: int = 0) -> tuple[float, np.ndarray]:
    """The authors' per-cell recipe; returns (seconds, test predictions (image, h, w))."""
    torch.manual_seed(seed)
    da = view[layer].isel(step=step)
    train = np.flatnonzero(targets.train[view.image_index])
    test = np.flatnonzero(targets.test[view.image_index])
    probe = torch.nn.Linear(da.shape[-1], 1)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-3)
    binary = targets.kind == "binary"
    loss_fn = torch.nn.BCEWithLogitsLoss() if binary else torch.nn.MSELoss()
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for lo in range(0, len(train), batch):
            idx = train[rng.permutation(len(train))][lo:lo + batch]
            x = torch.from_numpy(da.isel(image=np.sort(idx)).values.astype(np.float32))
            y = torch.from_numpy(targets.tokens[view.image_index[np.sort(idx)]])
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
    attrs, per_layer = load_targets(store, target)
    view = open_store(store)
    layers = sorted({c[0] for c in cells})
    steps = sorted({c[1] for c in cells})
    t0 = time.perf_counter()
    run = run_probes(store, target, models=["trained"], layers=layers, steps=steps,
                     scheduler="threads", progress=False)
    closed = time.perf_counter() - t0
    scores = open_scores(store, run)["per_image"].sel(model="trained")
    metric = "dice_label" if attrs["kind"] == "binary" else "rmse_label"
    n_cells = len(layers) * len(steps)
    print(f"closed form: {n_cells} cells in {closed:.2f} s ({closed / n_cells:.2f} s/cell, "
          f"fit + read + test scoring)")
    adam_total = 0.0
    for layer, step in cells:
        seconds, pred = adam_cell(view, layer, step, per_layer[layer])
        adam_total += seconds
        t = per_layer[layer]
        test = t.test
        ours = summarize(scores.sel(metric=metric, layer=layer, step=step).values)["mean"]
        names = [m for m in scores["metric"].values]
        theirs = per_image_scores(pred[:, None], t.tokens[test], t.full[test], t.kind)
        theirs = summarize(theirs[names.index(metric), :, 0])["mean"]
        print(f"  {layer:28s} step {step:2d}: Adam {seconds:7.2f} s  {metric} Adam "
              f"{theirs:.3f} vs closed form {ours:.3f}")
    per_cell_adam = adam_total / len(cells)
    print(f"Adam {per_cell_adam:.2f} s/cell vs closed form {closed / n_cells:.3f} s/cell: "
          f"{per_cell_adam / (closed / n_cells):.1f}x faster")


def grid_vs_read(store: str, target: str) -> None:
    import dask

    from actstore.store import model_variants

    view_names = model_variants(store)
    t0 = time.perf_counter()
    for m in view_names:
        view = open_store(store, m)
        dask.compute(*[view[layer].data.sum() for layer in view.layers], scheduler="threads")
    read = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_probes(store, target, scheduler="threads", progress=False)
    grid = time.perf_counter() - t0
    print(f"whole grid ({', '.join(view_names)}): fit {grid:.2f} s, plain read pass "
          f"{read:.2f} s, ratio {grid / read:.2f}")


def peak_memory(stores: list[str], target: str) -> None:
    """Peak RSS of a whole-grid fit, each store in a fresh process (stores of different
    sizes show whether memory grows with the number of images)."""
    code = ("import sys, resource; sys.path.insert(0, {root!r});"
            "from actstore.probe_runs import run_probes;"
            "run_probes({store!r}, {target!r}, scheduler='threads', progress=False);"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    for store in stores:
        n = open_store(store).root_attrs["n_images"]
        out = subprocess.run([sys.executable, "-c", code.format(root=str(ROOT), store=store,
                                                                  target=target)],
                             capture_output=True, text=True, check=True)
        print(f"peak RSS, {n} images ({store}): {int(out.stdout.split()[-1]) / 1024:.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--target", default="depth")
    ap.add_argument("--cells", default="up_blocks.3.attentions.0:14,up_blocks.2.attentions.1:14,"
                    "mid_block.attentions.0:4")
    ap.add_argument("--skip", default="", help="comma list of: adam, read, memory")
    ap.add_argument("--memory-stores", default="", help="comma list of stores (with the "
                    "target labelled) of different sizes for the peak-memory comparison")
    args = ap.parse_args()
    cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",")]
    if "adam" not in args.skip:
        compare_with_adam(args.store, args.target, cells)
    if "read" not in args.skip:
        grid_vs_read(args.store, args.target)
    if "memory" not in args.skip:
        peak_memory([args.store] + [s for s in args.memory_stores.split(",") if s], args.target)


if __name__ == "__main__":
    main()
