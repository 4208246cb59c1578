"""What an edit that moves the object can reach of a shifted depth target."""

from __future__ import annotations

import numpy as np
import pytest

from actstore.intervene.reach import main, object_moved, reach
from actstore.intervene.targets import translate


def test_object_moved_reaches_the_shifted_map_when_the_background_is_uniform():
    rng = np.random.default_rng(0)
    bg = np.full((32, 32), -0.5, np.float32)
    depth = bg.copy()
    mask = np.zeros((32, 32), bool)
    mask[10:16, 12:19] = True
    depth[mask] = rng.uniform(1, 2, mask.sum())
    for dy, dx in [(5, -6), (0, 7), (-4, 3)]:
        moved = object_moved(depth, mask, bg, dy, dx)
        np.testing.assert_array_equal(moved, translate(depth, dy, dx, "continuous"))
    # a sloped background (a ground plane) cannot be reached by moving the object alone
    slope = np.linspace(-1, 1, 32, dtype=np.float32)[:, None].repeat(32, 1)
    sloped = np.where(mask, depth, slope)
    target = translate(sloped, 5, 0, "continuous")
    moved = object_moved(sloped, mask, slope, 5, 0)
    assert np.sqrt(((moved - target) ** 2).mean()) > 0.05
    assert np.sqrt(((moved - target) ** 2).mean()) < np.sqrt(((sloped - target) ** 2).mean())


def test_reach_on_a_store(ivstore):
    r = reach(ivstore["uri"], n_images=3)
    assert r["fixed_map_share"] <= 1 and r["fixed_map_rmse"] > 0
    for mode in ("shift", "shift-x"):
        assert r[mode]["n"] == 6 and r[mode]["pre"] > 0


def test_reach_without_labels_is_one_line(tiny_store):
    with pytest.raises(SystemExit) as exc:
        main(["--store", tiny_store])
    msg = str(exc.value.code)
    assert msg.startswith("error: store") and "no labels 'depth'" in msg and "\n" not in msg
