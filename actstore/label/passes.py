"""The per-block passes that write label targets, all targets of one provider call at once.

A provider such as the toy-world labeler makes several targets in one forward pass, and
labelling is dominated by that pass (final images plus every step's x0 image), so each
batch of images goes through the provider once and every requested target is picked from
the output. The targets are still checked, normalized and written separately, each into its
own staging group (see :mod:`actstore.label.labels`).
"""

from __future__ import annotations

import numpy as np

from actstore.store import core as st
from actstore.errors import ActstoreError
from actstore.kinds import BINARY, CONTINUOUS
from actstore.metrics import pool


def resolution_name(h: int, w: int) -> str:
    return f"r{h}" if h == w else f"r{h}x{w}"


class PassContext:
    """What every pass needs to know to check a provider's output and name culprits."""

    def __init__(self, kinds: dict[str, str], spec, prov, ids, hw, block, batch_size):
        self.kinds, self.spec, self.prov = kinds, spec, prov     # kinds: target -> kind, in order
        self.ids, self.hw, self.block, self.batch_size = ids, hw, block, batch_size

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The provider in batches, once per batch for all targets; float32 (n, H, W) each."""
        parts: dict[str, list] = {t: [] for t in self.kinds}
        for i in range(0, len(images), self.batch_size):
            out = self.pick(self.prov(images[i:i + self.batch_size]),
                            min(self.batch_size, len(images) - i))
            for t, arr in out.items():
                parts[t].append(arr)
        return {t: np.concatenate(p) for t, p in parts.items()}

    def pick(self, out: dict, n: int) -> dict[str, np.ndarray]:
        return {t: self._pick_one(out, t, n) for t in self.kinds}

    def _pick_one(self, out: dict, target: str, n: int) -> np.ndarray:
        if target not in out:
            raise ActstoreError(f"provider {self.spec} returned no {target!r} (returned "
                                f"{', '.join(out)}); fix the provider")
        arr = np.asarray(out[target])
        if arr.shape != (n, *self.hw):
            raise ActstoreError(f"provider {self.spec}: {target!r} labels have shape "
                                f"{arr.shape}, expected {(n, *self.hw)} (images × the store's "
                                f"image size); resize them to {self.hw[0]}x{self.hw[1]}")
        return arr.astype(np.float32, copy=False)

    def validate(self, target: str, arr: np.ndarray, a: int, step: int | None = None) -> None:
        """Non-finite or non-0/1 binary values: an error naming the first image (and step)."""
        flat = arr.reshape(arr.shape[0], -1)
        where = "" if step is None else f" on the step-{step} x0 image"
        bad = ~np.isfinite(flat).all(axis=1)
        if bad.any():
            raise ActstoreError(f"provider {self.spec}: {target!r} labels contain NaN/inf "
                                f"for image {self.ids[a + int(np.argmax(bad))]!r}{where} "
                                f"({int(bad.sum())} images in its block); fix the labels")
        if self.kinds[target] == BINARY:
            off = ~np.isin(flat, (0.0, 1.0)).all(axis=1)
            if off.any():
                raise ActstoreError(f"provider {self.spec}: binary target {target!r} "
                                    f"has values other than 0/1 for image "
                                    f"{self.ids[a + int(np.argmax(off))]!r}{where}; threshold "
                                    "the labels")


class _Moments:
    """Train-split mean and variance merged block by block (Chan) in float64."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, sel: np.ndarray) -> None:
        if not sel.size:
            return
        n, m = sel.size, float(sel.mean())
        tot = self.n + n
        self.m2 += float(((sel - m) ** 2).sum()) + (m - self.mean) ** 2 * self.n * n / tot
        self.mean += (m - self.mean) * n / tot
        self.n = tot


def write_full(ctx: PassContext, groups: dict, final, by_ids, train: np.ndarray, bar) -> dict:
    """Pass 1: raw labels per block; returns each target's (mean, std), (None, None) if binary."""
    moments = {t: _Moments() for t, kind in ctx.kinds.items() if kind == CONTINUOUS}
    for a, b in st.blocks_of(len(ctx.ids), ctx.block):
        if by_ids is not None:
            raws = ctx.pick(by_ids(ctx.ids[a:b]), b - a)
        else:
            raws = ctx.run(np.asarray(final[a:b]))
        for t, raw in raws.items():
            ctx.validate(t, raw, a)
            groups[t]["full"][a:b] = raw
            if t in moments:
                moments[t].add(raw[train[a:b]].astype(np.float64))
        bar.step(b - a)
    stats = {}
    for t in ctx.kinds:
        if t not in moments:
            stats[t] = (None, None)
            continue
        std = float(np.sqrt(moments[t].m2 / moments[t].n))
        if not std > 0:
            raise ActstoreError(f"provider {ctx.spec}: {t!r} is constant over the train "
                                "images, so it can't be z-scored; check the label model")
        stats[t] = (float(moments[t].mean), std)
    return stats


def _normalize(raw: np.ndarray, mean, std) -> np.ndarray:
    if mean is None:
        return raw
    return ((raw.astype(np.float64) - mean) / std).astype(np.float32)


def write_pooled(ctx: PassContext, group, grids: dict, mean, std) -> None:
    """Pass 2, per target: normalize ``full`` in place and pool it to every layer's grid."""
    sizes = sorted(set(grids.values()), reverse=True)
    for a, b in st.blocks_of(len(ctx.ids), ctx.block):
        full = _normalize(np.asarray(group["full"][a:b]), mean, std)
        if mean is not None:
            group["full"][a:b] = full
        for h, w in sizes:
            group[resolution_name(h, w)][a:b] = pool(full, (h, w)).astype(np.float32)


def write_x0(ctx: PassContext, groups: dict, x0_image, stats: dict, bar) -> None:
    """Pass 3: the provider on every step's decoded x0, with the final images' constants."""
    for a, b in st.blocks_of(len(ctx.ids), ctx.block):
        imgs = np.asarray(x0_image[a:b])
        n, s = imgs.shape[:2]
        maps = ctx.run(imgs.reshape(n * s, *imgs.shape[2:]))
        maps = {t: m.reshape(n, s, *ctx.hw) for t, m in maps.items()}
        for t, m in maps.items():
            for step in range(s):
                ctx.validate(t, m[:, step], a, step)
            groups[t]["x0"][a:b] = _normalize(m, *stats[t])
        bar.step(n * s)
