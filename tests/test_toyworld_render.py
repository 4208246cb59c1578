"""Renderer invariants checked against independent geometry."""

from __future__ import annotations

import numpy as np
import pytest

from actstore.toyworld import render as R
from actstore.toyworld.vocab import WORDS


def _sphere_scene(x=0.3, z=5.0, r=0.8, light=(-0.6, 0.7, -0.3), size=64):
    ld = np.asarray(light, dtype=float)
    ld /= np.linalg.norm(ld)
    obj = R.Obj("sphere", "red", x, z, r)
    spec = R.SceneSpec((obj,), "left", tuple(ld), R.describe((obj,), "left"))
    return obj, ld, R.render_spec(spec, size=size)


def test_sphere_depth_matches_analytic_ray_distance():
    obj, _, sc = _sphere_scene(x=0.0)
    d = R.camera_rays(64).reshape(64, 64, 3)
    c = np.array([obj.x, obj.size, obj.z])
    # the pixel whose ray passes closest to the centre: depth = |c - o| - r at the limit
    cross = np.linalg.norm(np.cross(d, c - R.CAM_POS), axis=-1)
    i, j = np.unravel_index(np.argmin(cross), cross.shape)
    assert sc.object_id[i, j] == 1
    ray = d[i, j]
    oc = R.CAM_POS - c
    b = ray @ oc
    t = -b - np.sqrt(b * b - (oc @ oc - obj.size**2))
    assert sc.depth[i, j] == pytest.approx(t, rel=1e-5)
    assert abs(sc.depth[i, j] - (np.linalg.norm(c - R.CAM_POS) - obj.size)) < 0.02


def test_mask_equals_object_id_and_sky_is_far():
    for seed in range(5):
        sc = R.render_scene(seed)
        np.testing.assert_array_equal(sc.salient, sc.object_id > 0)
        assert sc.depth.max() <= R.FAR and np.isfinite(sc.depth).all()
        assert sc.inv_depth.min() == pytest.approx(0.0) and sc.inv_depth.max() == pytest.approx(1.0)
        assert sc.object_id.max() == len(sc.spec.objects)
    assert (R.render_scene(0).depth[0] == R.FAR).all()  # top row is sky


def test_sphere_shading_is_lambert_against_independent_normal():
    obj, ld, sc = _sphere_scene()
    d = R.camera_rays(64).reshape(64, 64, 3)
    c = np.array([obj.x, obj.size, obj.z])
    m = sc.object_id == 1
    p = R.CAM_POS + sc.depth[..., None] * d
    n = (p - c) / np.linalg.norm(p - c, axis=-1, keepdims=True)
    expected = np.clip(n @ ld, 0, None)
    np.testing.assert_allclose(sc.shading[m], expected[m], atol=1e-4)
    # ground: max(0, n.l) with n = up, except in the sphere's cast shadow
    g = (sc.object_id == 0) & (sc.depth < R.FAR)
    lit = g & (sc.shading > 0)
    np.testing.assert_allclose(sc.shading[lit], max(ld[1], 0), atol=1e-6)
    assert (g & (sc.shading == 0)).sum() > 5  # a cast shadow exists


def test_deterministic_and_seeds_differ():
    a, b = R.render_scene(123), R.render_scene(123)
    for k in ("rgb", "depth", "shading", "object_id"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert a.prompt == b.prompt
    c = R.render_scene(124)
    assert not np.array_equal(a.rgb, c.rgb)


def test_batch_and_prompt_vocabulary():
    b = R.render_batch(range(40), size=32)
    assert b["rgb"].shape == (40, 32, 32, 3) and b["rgb"].dtype == np.uint8
    assert b["depth"].dtype == np.float32 and b["salient"].dtype == bool
    for p in b["prompt"]:
        assert set(p.split()) <= set(WORDS), p


def test_random_scenes_stay_inside_the_simplified_world():
    counts = set()
    for seed in range(300):
        spec = R.sample_spec(seed)
        counts.add(len(spec.objects))
        for o in spec.objects:
            assert o.colour in R.SCENE_COLOURS, (seed, o)
            assert R.DEPTH_RANGE[0] <= o.z <= R.DEPTH_RANGE[1], (seed, o)
            # objects are placed inside the central 80% of the view at their depth
            assert abs(o.x) <= R.TAN_HALF_FOV * o.z * 0.8
    assert counts == set(R.OBJECT_COUNTS)


def test_shipped_toy_prompt_table_matches_the_renderer():
    """The prompts CSV is derived from the renderer; a world change must regenerate it
    (otherwise prompts would describe scenes the labels were not rendered from)."""
    import csv
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "prompts" / "toyworld.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 240
    for r in rows:
        assert r["prompt"] == R.sample_spec(int(r["seed"])).prompt, r["image_id"]
