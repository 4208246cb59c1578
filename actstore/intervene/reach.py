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

A third number asks whether a target is an image of the world at all (toy-world stores
only, whose depth labels are the renderer's relative inverse depth): the **nearest
render**, the smallest RMSE between a target and any of N rendered training scenes of a
camera distribution (z-scored like the labels), median over targets. Set beside the same
number for the unshifted maps (what an image of the world scores), it says how much of a
target no scene of that world shows, and comparing cameras says which world makes the
targets reachable before any model is trained on it.

``python -m actstore.intervene.reach --store S`` prints the first two for the sweep's test
images; ``--renders N --camera fixed varied`` adds the nearest render per camera.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from actstore.catalog import find_catalog, resolve_store
from actstore.cliargs import OneLineParser, finite_float, index, positive_int
from actstore.errors import ActstoreError
from actstore.intervene.targets import make_targets, translate
from actstore.kinds import BINARY
from actstore.label.labels import label_array, list_targets
from actstore.metrics import rmse
from actstore.store.view import StoreView

if TYPE_CHECKING:
    import xarray as xr


def object_moved(depth: np.ndarray, mask: np.ndarray, background: np.ndarray, dy: int,
                 dx: int) -> np.ndarray:
    """``depth`` (H, W) with the object under ``mask`` moved by (dy, dx) px and the pixels
    it leaves given ``background``'s depth; everything else as it was."""
    moved_mask = translate(mask.astype(np.float32), dy, dx, BINARY) > 0.5
    moved = translate(depth, dy, dx, "continuous")
    return np.where(moved_mask, moved, np.where(mask > 0.5, background, depth)).astype(np.float32)


def _labelled(store: str, *names: str) -> dict:
    """The store's label sets, once each of ``names`` is known to be among them."""
    have = list_targets(store)
    for name in names:
        if name not in have:
            raise ActstoreError(f"store {store}: has no labels {name!r} (has "
                                f"{', '.join(have) or 'none'}); label it first")
    return have


def first_test(store: str, table: xr.Dataset, n_images: int) -> np.ndarray:
    """Positions of the first ``n_images`` test images of the image table (all of them if
    it has fewer); a count below 1 or a store without test images is refused."""
    if n_images < 1:
        raise ActstoreError(f"--images {n_images}: give a count of test images >= 1")
    test = np.flatnonzero(table["split"].values == "test")
    if not len(test):
        raise ActstoreError(f"store {store}: has no test images; reach reads test images")
    return test[:n_images]


def reach(store: str, *, depth: str = "depth", mask: str = "salient", n_images: int = 11,
          n_targets: int = 2, seed: int = 0) -> dict:
    """Medians over the first ``n_images`` test images × ``n_targets`` targets, for the
    paper's shift and the horizontal-only shift-x: pre (original vs target) and the
    object-moved map; plus the fixed map's RMSE and share of the test depth variance
    (1 − its squared error over their variance: negative if it explains none)."""
    have = _labelled(store, depth, mask)
    if have[mask]["kind"] != BINARY or have[depth]["kind"] == BINARY:
        raise ActstoreError(f"{depth!r} must be a continuous target and {mask!r} a mask")
    split = StoreView(store, model="trained", complete_only=False).images
    ids = [str(v) for v in split["image"].values]
    d = np.asarray(label_array(store, depth, "full")[:], np.float32)
    m = np.asarray(label_array(store, mask, "full")[:], np.float32) > 0.5
    chosen = first_test(store, split, n_images)
    train, test = split["split"].values == "train", np.flatnonzero(split["split"].values == "test")
    fixed = d[train].mean(0)
    with warnings.catch_warnings():   # a pixel covered by an object in every train image
        warnings.simplefilter("ignore", RuntimeWarning)
        background = np.nanmedian(np.where(m[train], np.nan, d[train]), axis=0)
    background = np.where(np.isfinite(background), background, fixed)
    out = {"fixed_map_rmse": float(np.median(rmse(d[test], np.broadcast_to(fixed, d[test].shape)))),
           "fixed_map_share": float(1 - ((d[test] - fixed) ** 2).mean() / d[test].var()),
           "images": [ids[p] for p in chosen]}
    for mode in ("shift", "shift-x"):
        pre, best = [], []
        for p in chosen:
            targets, offsets = make_targets(d[p], ids[p], "continuous", n_targets=n_targets,
                                            seed=seed, mode=mode)
            for t, (dy, dx) in zip(targets, offsets):
                pre.append(float(rmse(d[p][None], t[None])[0]))
                ideal = object_moved(d[p], m[p], background, int(dy), int(dx))
                best.append(float(rmse(ideal[None], t[None])[0]))
        out[mode] = {"pre": float(np.median(pre)), "object_moved": float(np.median(best)),
                     "n": len(pre)}
    return out


def nearest(maps: np.ndarray, candidates: np.ndarray, chunk: int = 1024
            ) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``maps`` (K, H, W), the smallest RMSE to any of ``candidates`` (N, H, W)
    and its index: ‖a−b‖² = ‖a‖² + ‖b‖² − 2a·b in float64, candidates in chunks so N
    renders never need an N × pixels float64 copy at once."""
    a = maps.reshape(len(maps), -1).astype(np.float64)
    aa = (a * a).sum(1)
    best = np.full(len(a), np.inf)
    arg = np.zeros(len(a), np.int64)
    for lo in range(0, len(candidates), chunk):
        b = candidates[lo:lo + chunk].reshape(-1, a.shape[1]).astype(np.float64)
        d2 = aa[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
        j = d2.argmin(1)
        d = d2[np.arange(len(a)), j]
        better = d < best
        best[better], arg[better] = d[better], lo + j[better]
    return np.sqrt(np.maximum(best, 0) / a.shape[1]), arg


def world_depths(camera: str, n: int, size: int = 64,
                 pitch: tuple[float, float] | None = None) -> np.ndarray:
    """Relative inverse depth (n, size, size) of the first ``n`` training scenes of a
    camera distribution (``pitch``: the varied camera's range, if not its default): what
    the toy label model is trained to output."""
    from actstore.toyworld.render import render_scene
    from actstore.toyworld.train import TRAIN_SEED_OFFSET

    return np.stack([render_scene(TRAIN_SEED_OFFSET + i, size, camera, pitch).inv_depth
                     for i in range(n)])


def render_reach(store: str, cameras: tuple[str, ...] = ("fixed", "varied"), *,
                 n_renders: int = 2000, depth: str = "depth", n_images: int = 27,
                 n_targets: int = 2, seed: int = 0,
                 pitch: tuple[float, float] | None = None) -> dict:
    """Per camera (``pitch``: the varied camera's pitch range, default its own): medians
    of the nearest render to the paper's shift targets of the first ``n_images`` test
    images (all, content moved down, content moved up) and to their unshifted maps, and
    the renders' own fixed-map share (their first half's mean map scored on the second
    half)."""
    from actstore.toyworld.render import CAMERAS

    bad = [c for c in cameras if c not in CAMERAS]
    if bad:
        raise ActstoreError(f"camera {bad[0]!r}: use {', '.join(CAMERAS)}")
    if pitch is not None and (len(pitch) != 2 or not pitch[0] < pitch[1]
                              or "varied" not in cameras):
        raise ActstoreError(f"--pitch {' '.join(map(str, pitch))}: give LO HI (LO < HI), "
                            "for --camera varied")
    if n_renders < 2:
        raise ActstoreError(f"--renders {n_renders}: need at least 2")
    have = _labelled(store, depth)
    attrs = have[depth]
    if not str(attrs.get("provider", "")).startswith("toyworld"):
        raise ActstoreError(f"store {store}: {depth!r} labels come from "
                            f"{attrs.get('provider')!r}, not a toyworld label model, so "
                            "renders are not in their units")
    split = StoreView(store, model="trained", complete_only=False).images
    ids = [str(v) for v in split["image"].values]
    test = first_test(store, split, n_images)
    d = np.asarray(label_array(store, depth, "full")[:], np.float32)
    maps, dys = [], []
    for p in test:
        targets, offsets = make_targets(d[p], ids[p], "continuous", n_targets=n_targets,
                                        seed=seed, mode="shift")
        maps += list(targets)
        dys += [int(dy) for dy, _ in offsets]
    maps, dys = np.stack(maps), np.asarray(dys)
    out = {"images": [ids[p] for p in test], "n": len(maps), "n_renders": n_renders,
           "pre": float(np.median(rmse(np.repeat(d[test], n_targets, 0), maps)))}
    h = d.shape[-1]
    for cam in cameras:
        raw = world_depths(cam, n_renders, h, pitch if cam == "varied" else None)
        renders = (raw - attrs["mean"]) / attrs["std"]
        best, _ = nearest(maps, renders)
        orig, _ = nearest(d[test], renders)
        fixed, rest = renders[:n_renders // 2].mean(0), renders[n_renders // 2:]
        out[cam] = {"nearest": float(np.median(best)),
                    "nearest_down": float(np.median(best[dys > 0])) if (dys > 0).any() else None,
                    "nearest_up": float(np.median(best[dys < 0])) if (dys < 0).any() else None,
                    "nearest_unshifted": float(np.median(orig)),
                    "fixed_map_share": float(1 - ((rest - fixed) ** 2).mean() / rest.var())}
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def build_parser() -> OneLineParser:
    """Every option says what it takes: the diagnostic is run by hand, from its --help."""
    p = OneLineParser(prog="python -m actstore.intervene.reach",
                      description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True,
                   help="store URI (a folder, s3://...) or catalog store name, with depth "
                        "labels")
    p.add_argument("--catalog", help="catalog.yaml to resolve --store (default: "
                   "./catalog.yaml, else the repository's)")
    p.add_argument("--images", type=positive_int, default=11,
                   help="first N test images (default 11)")
    p.add_argument("--renders", type=index, default=0, metavar="N",
                   help="also the nearest of N rendered training scenes per --camera (toy-world "
                        "depth labels only; ~3 ms a render)")
    p.add_argument("--camera", nargs="+", default=["fixed", "varied"],
                   help="camera distributions for --renders (default: fixed varied)")
    p.add_argument("--pitch", type=finite_float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="draw the varied camera's pitch (rad, down > 0) from LO..HI instead "
                        "of its own range, to compare worlds before training on one")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        store = resolve_store(find_catalog(a.catalog), a.store)["uri"]
        r = reach(store, n_images=a.images)
        w = render_reach(store, tuple(a.camera), n_renders=a.renders, n_images=a.images,
                         pitch=None if a.pitch is None else tuple(a.pitch)) \
            if a.renders else None
    except ActstoreError as exc:
        p.fail(exc)
    print(f"fixed map (train mean depth, no image information): RMSE {r['fixed_map_rmse']:.3f}"
          f" on test images, {r['fixed_map_share']:.1%} of their depth variance")
    for mode in ("shift", "shift-x"):
        v = r[mode]
        print(f"{mode:8s} n={v['n']}: pre {v['pre']:.3f}, object moved {v['object_moved']:.3f}"
              f" (fall {v['pre'] - v['object_moved']:.3f})")
    if w is None:
        return
    print(f"nearest of {w['n_renders']} renders, shift n={w['n']} (pre {w['pre']:.3f}): "
          "all / content moved down / up; unshifted maps; renders' fixed-map share")
    for cam in a.camera:
        v = w[cam]
        name = cam if cam != "varied" or a.pitch is None \
            else f"varied, pitch {a.pitch[0]:g}..{a.pitch[1]:g}"
        print(f"{name:8s} {v['nearest']:.3f} / {_fmt(v['nearest_down'])} / "
              f"{_fmt(v['nearest_up'])}; unshifted {v['nearest_unshifted']:.3f}; "
              f"fixed map {v['fixed_map_share']:.1%}")


if __name__ == "__main__":
    main()
