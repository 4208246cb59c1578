"""How far a shifted depth target is within reach of any image of the world.

A depth intervention is scored by RMSE to the original map moved by ~20 % of the side.
Whether a fall of a given size is possible depends on the world, not on the edit: with a
fixed camera the ground plane fixes most of every depth map, and moving it asks for a
scene no training image shows. Two numbers say how much of a target is reachable:

* the **fixed map**: the train images' mean depth map, scored on the test images. If it
  already explains most of the depth variance, most of what a depth probe reads is the
  camera's layout (a function of position), the same in every image;
* the **object-moved map**: this scene with only its object moved by the target's offset
  (the object's depth pasted at the shifted mask, the vacated pixels given the background's
  depth): what an edit that moves the object, as a successful salient edit does, reaches at
  best. Its RMSE to the target bounds what such an edit can show.

``python -m actstore.intervene.reach --store S`` prints both for the sweep's test images.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

from actstore.errors import ActstoreError
from actstore.intervene.targets import make_targets, translate
from actstore.kinds import BINARY
from actstore.label.labels import label_array, list_targets
from actstore.metrics import rmse
from actstore.store.view import StoreView


def object_moved(depth: np.ndarray, mask: np.ndarray, background: np.ndarray, dy: int,
                 dx: int) -> np.ndarray:
    """``depth`` (H, W) with the object under ``mask`` moved by (dy, dx) px and the pixels
    it leaves given ``background``'s depth; everything else as it was."""
    moved_mask = translate(mask.astype(np.float32), dy, dx, BINARY) > 0.5
    moved = translate(depth, dy, dx, "continuous")
    return np.where(moved_mask, moved, np.where(mask > 0.5, background, depth)).astype(np.float32)


def reach(store: str, *, depth: str = "depth", mask: str = "salient", n_images: int = 11,
          n_targets: int = 2, seed: int = 0) -> dict:
    """Medians over the first ``n_images`` test images × ``n_targets`` targets, for the
    paper's shift and the horizontal-only shift-x: pre (original vs target) and the
    object-moved map; plus the fixed map's RMSE and share of the test depth variance
    (1 − its squared error over their variance: negative if it explains none)."""
    have = list_targets(store)
    for name in (depth, mask):
        if name not in have:
            raise ActstoreError(f"store {store}: has no labels {name!r} (has "
                                f"{', '.join(have) or 'none'}); label it first")
    if have[mask]["kind"] != BINARY or have[depth]["kind"] == BINARY:
        raise ActstoreError(f"{depth!r} must be a continuous target and {mask!r} a mask")
    split = StoreView(store, model="trained", complete_only=False).images
    ids = [str(v) for v in split["image"].values]
    d = np.asarray(label_array(store, depth, "full")[:], np.float32)
    m = np.asarray(label_array(store, mask, "full")[:], np.float32) > 0.5
    train, test = split["split"].values == "train", np.flatnonzero(split["split"].values == "test")
    fixed = d[train].mean(0)
    with warnings.catch_warnings():   # a pixel covered by an object in every train image
        warnings.simplefilter("ignore", RuntimeWarning)
        background = np.nanmedian(np.where(m[train], np.nan, d[train]), axis=0)
    background = np.where(np.isfinite(background), background, fixed)
    out = {"fixed_map_rmse": float(np.median(rmse(d[test], np.broadcast_to(fixed, d[test].shape)))),
           "fixed_map_share": float(1 - ((d[test] - fixed) ** 2).mean() / d[test].var()),
           "images": [ids[p] for p in test[:n_images]]}
    for mode in ("shift", "shift-x"):
        pre, best = [], []
        for p in test[:n_images]:
            targets, offsets = make_targets(d[p], ids[p], "continuous", n_targets=n_targets,
                                            seed=seed, mode=mode)
            for t, (dy, dx) in zip(targets, offsets):
                pre.append(float(rmse(d[p][None], t[None])[0]))
                ideal = object_moved(d[p], m[p], background, int(dy), int(dx))
                best.append(float(rmse(ideal[None], t[None])[0]))
        out[mode] = {"pre": float(np.median(pre)), "object_moved": float(np.median(best)),
                     "n": len(pre)}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m actstore.intervene.reach",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--images", type=int, default=11, help="first N test images (default 11)")
    a = p.parse_args(argv)
    try:
        r = reach(a.store, n_images=a.images)
    except ActstoreError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"fixed map (train mean depth, no image information): RMSE {r['fixed_map_rmse']:.3f}"
          f" on test images, {r['fixed_map_share']:.1%} of their depth variance")
    for mode in ("shift", "shift-x"):
        v = r[mode]
        print(f"{mode:8s} n={v['n']}: pre {v['pre']:.3f}, object moved {v['object_moved']:.3f}"
              f" (fall {v['pre'] - v['object_moved']:.3f})")


if __name__ == "__main__":
    main()
