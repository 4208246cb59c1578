"""What an intervention asks the model to draw: target maps, and their probe-space form.

A target lives at label resolution in the label's normalized units (what ``labels/<t>/full``
holds: 0/1 masks, train-z-scored depth), so it can be scored against the label model's view
of the intervened output with the same Dice/RMSE as the probes. Each edited layer then
sees the target area-pooled to its token grid (:func:`actstore.metrics.pool`, the same
pooling the probes were fitted against) and converted to the probe's output units.

Shifted targets follow the paper: the original map moved by a random offset of 90-120 px
at 512 px (17.6-23.4 % of the side) in a random direction on each axis; vacated depth takes
the nearest edge value, a vacated mask is background. Offsets are drawn from a generator
seeded by (image_id, k, seed) alone, so a target never depends on which images, in which
order or batch, an experiment covers, and a resumed run redraws exactly the same ones.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from actstore.errors import ActstoreError
from actstore.intervene.settings import TARGET_MODES, InterventionSettings
from actstore.kinds import BINARY
from actstore.npyfiles import check_numeric, load_plain
from actstore.metrics import pool

SHIFT_RANGE = (90 / 512, 120 / 512)   # the paper's ±90-120 px at 512 px, as a side fraction
INSERT_PUSH = 1.0                     # Appendix E: the copy sits 1 z-unit farther away
INSERT_SCALE = 0.75                   # ... and is drawn smaller, as a farther object would be


def offset_rng(image_id: str, k: int, seed: int) -> np.random.Generator:
    """A generator that depends on (image_id, k, seed) only; sha256 so ids of any form work."""
    digest = hashlib.sha256(f"{image_id}\x00{int(k)}\x00{int(seed)}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def shift_offset(image_id: str, k: int, seed: int, *, hw: tuple[int, int],
                 frac: tuple[float, float] = SHIFT_RANGE,
                 horizontal_only: bool = False) -> tuple[int, int]:
    """(dy, dx) in pixels: magnitude uniform in ``frac`` × side, sign random, per axis."""
    rng = offset_rng(image_id, k, seed)
    out = []
    for side in hw:
        mag = rng.uniform(*frac) * side
        sign = 1 if rng.random() < 0.5 else -1
        out.append(int(round(sign * mag)))
    return (0, out[1]) if horizontal_only else (out[0], out[1])


def translate(label: np.ndarray, dy: int, dx: int, kind: str) -> np.ndarray:
    """Move a (H, W) map by (dy, dx) px. Continuous maps fill the vacated band with the
    nearest edge value (index clamping), masks with background (0)."""
    h, w = label.shape
    ys, xs = np.arange(h) - dy, np.arange(w) - dx
    out = label[np.clip(ys, 0, h - 1)[:, None], np.clip(xs, 0, w - 1)[None, :]]
    if kind == BINARY:
        inside = ((ys >= 0) & (ys < h))[:, None] & ((xs >= 0) & (xs < w))[None, :]
        out = np.where(inside, out, 0)
    return out.astype(np.float32)


def object_mask(depth: np.ndarray, quantile: float = 0.8) -> np.ndarray:
    """Stand-in salient object when the store has no mask: the nearest 20 % of pixels
    (labels are relative *inverse* depth, larger = nearer)."""
    return depth >= np.quantile(depth, quantile)


def insert_object_depth(depth: np.ndarray, mask: np.ndarray, dy: int, dx: int,
                        *, push: float = INSERT_PUSH, scale: float = INSERT_SCALE,
                        inverse: bool = True) -> np.ndarray:
    """Appendix E: paste a copy of the object's depth at (dy, dx) from it, farther away.

    The copy is scaled by ``scale`` about the object's centroid (a farther object looks
    smaller), its values moved ``push`` normalized units farther (down for inverse depth),
    and it is hidden wherever the original object is (the nearer surface wins). Everything
    else keeps the original depth, so the only change asked of the model is the new object.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return depth.astype(np.float32)
    h, w = depth.shape
    cy, cx = (float(c.mean()) for c in np.nonzero(mask))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    sy = np.rint(cy + (yy - cy - dy) / scale).astype(int)
    sx = np.rint(cx + (xx - cx - dx) / scale).astype(int)
    ok = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
    sy, sx = np.clip(sy, 0, h - 1), np.clip(sx, 0, w - 1)
    pasted = ok & mask[sy, sx] & ~mask
    moved = depth[sy, sx] + (-push if inverse else push)
    return np.where(pasted, moved, depth).astype(np.float32)


def make_targets(label: np.ndarray, image_id: str, kind: str, *, n_targets: int, seed: int,
                 mode: str = "shift", mask: np.ndarray | None = None,
                 frac: tuple[float, float] = SHIFT_RANGE) -> tuple[np.ndarray, np.ndarray]:
    """``n_targets`` targets (K, H, W) for one image's label and their (K, 2) px offsets.

    ``mode="shift"`` is the paper's main experiment; ``"shift-x"`` keeps only its horizontal
    offset (the same draw), for a world whose camera never moves, where a vertically shifted
    depth map (a moved horizon) is a scene no image of the world shows; ``"insert"``
    (continuous labels only) is Appendix E, with horizontal offsets as there.
    """
    if mode not in TARGET_MODES:
        raise ActstoreError(f"targets {mode!r}: use {', '.join(TARGET_MODES)} or a path to "
                            "target files")
    if mode == "insert" and kind == BINARY:
        raise ActstoreError("targets insert: copies an object's depth, so it needs a "
                            "continuous (depth) target; use --targets shift for masks")
    hw = label.shape
    offsets = np.array([shift_offset(image_id, k, seed, hw=hw, frac=frac,
                                     horizontal_only=mode != "shift")
                        for k in range(n_targets)], np.int32).reshape(n_targets, 2)
    if mode != "insert":
        maps = [translate(label, dy, dx, kind) for dy, dx in offsets]
    else:
        obj = object_mask(label) if mask is None else mask > 0.5
        maps = [insert_object_depth(label, obj, dy, dx) for dy, dx in offsets]
    return np.stack(maps).astype(np.float32), offsets


def load_user_targets(path: str, image_ids: list[str], hw: tuple[int, int], *, kind: str,
                      mean: float | None, std: float | None,
                      units: str = "normalized") -> np.ndarray:
    """User targets (N, K, H, W) in normalized units, for ``image_ids`` in that order.

    Accepted: a ``.npz`` whose keys are image ids, or a folder of ``<image_id>.npy`` /
    ``<image_id>.png`` (several targets per image: ``<image_id>_<k>.png``). Arrays are
    (H, W) or (K, H, W). Masks: nonzero (PNG: ≥ half range) is the object. Continuous
    arrays are in the label's normalized units unless ``units="raw"`` (provider units,
    then z-scored with the stored mean/std); PNGs are raw units scaled to [0, 1].
    """
    if units not in ("normalized", "raw"):
        raise ActstoreError(f"target units {units!r}: use normalized or raw")
    p = Path(path).expanduser()
    raw = units == "raw"
    found: dict[str, tuple[np.ndarray, bool]] = {}   # image id → (maps, in raw units?)
    if p.is_file() and p.suffix == ".npz":
        found = {i: (a, raw) for i, a in load_plain(p, f"targets {path}", image_ids).items()}
    elif p.is_dir():
        for i in image_ids:
            if (p / f"{i}.npy").is_file():
                found[i] = (load_plain(p / f"{i}.npy", f"targets {path}"), raw)
                continue
            pngs = [p / f"{i}.png"] if (p / f"{i}.png").is_file() else \
                sorted(p.glob(f"{i}_*.png"), key=lambda f: _png_index(f, i))
            if pngs:
                maps = [_read_png(f, kind) for f in pngs]   # one <id>.png: one (H, W) map
                found[i] = (maps[0] if pngs[0].stem == i else np.stack(maps), True)
    elif not p.exists():
        raise ActstoreError(f"targets {path}: does not exist; give a .npz file or a folder "
                            "of <image_id>.npy/.png files")
    else:
        raise ActstoreError(f"targets {path}: not a .npz file or a folder of <image_id>.npy/"
                            ".png files")
    missing = [i for i in image_ids if i not in found]
    if missing:
        raise ActstoreError(f"targets {path}: no target for image(s) {', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''}; supply one per image "
                            "(or choose images with --images)")
    out = []
    for i in image_ids:
        check_numeric(found[i][0], f"targets {path}: image {i!r}")
        a, in_raw = np.asarray(found[i][0], np.float32), found[i][1]
        given = a.shape   # as the user gave it, before a single map gets its K axis
        a = a[None] if a.ndim == 2 else a
        if a.ndim != 3 or tuple(a.shape[1:]) != tuple(hw):
            raise ActstoreError(f"targets {path}: image {i!r} has shape {given}, expected "
                                f"({hw[0]}, {hw[1]}) or (K, {hw[0]}, {hw[1]}), the labels' size")
        if not np.isfinite(a).all():
            raise ActstoreError(f"targets {path}: image {i!r} has NaN/inf; fix its target")
        if kind == BINARY:
            a = (a > 0).astype(np.float32)
        elif in_raw:
            a = ((a - mean) / std).astype(np.float32)
        out.append(a)
    ks = {a.shape[0] for a in out}
    if len(ks) > 1:
        raise ActstoreError(f"targets {path}: images have different numbers of targets "
                            f"({sorted(ks)}); give every image the same K")
    return np.stack(out)


def _png_index(f: Path, image_id: str) -> int:
    tail = f.stem[len(image_id) + 1:]
    return int(tail) if tail.isdigit() else 1 << 30


def _read_png(f: Path, kind: str) -> np.ndarray:
    from PIL import Image

    img = np.asarray(Image.open(f))
    if img.ndim == 3:
        img = img[..., :3].mean(axis=-1)
    top = 65535.0 if img.max() > 255 else 255.0
    scaled = img.astype(np.float32) / top
    return (scaled >= 0.5).astype(np.float32) if kind == BINARY else scaled


def token_targets(target: np.ndarray, grid: tuple[int, int], kind: str, solver: str,
                  margin: float = InterventionSettings.margin) -> np.ndarray:
    """Targets (N, H, W) → what the probe should output per token (N, h·w), float32.

    Continuous: the pooled normalized value (ridge predicts it directly). Binary: the
    probe was fitted to ``pool(mask) > 0.5``, so that is the token's class; a logistic
    probe is asked for logit ±``margin`` (a confident, finite answer: the exact 0/1 would
    be ±∞), a ridge probe on a binary target for 0/1.
    """
    pooled = pool(target, grid).reshape(target.shape[0], -1)
    if kind != BINARY:
        return pooled.astype(np.float32)
    on = pooled > 0.5
    if solver == "logistic":
        return np.where(on, margin, -margin).astype(np.float32)
    return on.astype(np.float32)
