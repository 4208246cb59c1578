"""The opt-in varied camera: default renders unchanged, labels follow the camera."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from actstore.toyworld import render as R

# sha256 of render_batch(range(240)) (prompt-table seeds; every label array and the
# prompts) computed with the renderer before the camera option existed (fixed camera
# only). Every shipped store, fixture and number was made from these renders.
FIXED_DIGEST = "9e9ca17588c3ac64645d8b558b4b56dc85b6f21f12a4789629e8a7e07b791a90"
# the same for camera="varied", computed before its pitch range became a parameter: the
# world the varied-camera fine-tunes and their label model were trained on
VARIED_DIGEST = "a82a7966d6689343b7337591287162e65be66a58200afe0d3e1177d4e1d71090"
KEYS = ("rgb", "depth", "inv_depth", "salient", "shading", "object_id")


def _digest(b: dict) -> str:
    h = hashlib.sha256()
    for k in KEYS:
        h.update(np.ascontiguousarray(b[k]).tobytes())
    h.update("\n".join(b["prompt"]).encode())
    return h.hexdigest()


def test_default_renders_are_bit_identical_to_the_fixed_camera_world():
    assert _digest(R.render_batch(range(240))) == FIXED_DIGEST
    explicit = R.Camera(pitch=0.18, height=1.6)
    for seed in (0, 7, 100_000):
        spec = R.sample_spec(seed)
        assert spec.camera == R.FIXED_CAMERA
        a = R.render_spec(spec, seed=seed)
        b = R.render_spec(R.SceneSpec(spec.objects, spec.light, spec.light_dir, spec.prompt,
                                      explicit), seed=seed)
        for k in KEYS:
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k))


def _cam_rays(size: int, pitch: float) -> np.ndarray:
    """Independent pinhole: camera-frame rays (u tan, v tan, 1) rotated down by ``pitch``
    about the x axis (a positive pitch turns +z towards -y)."""
    tan = np.tan(np.radians(30.0))
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    v, u = np.meshgrid(-c, c, indexing="ij")
    cam = np.stack([u * tan, v * tan, np.ones_like(u)], -1)
    rot = np.array([[1.0, 0.0, 0.0],
                    [0.0, np.cos(pitch), -np.sin(pitch)],
                    [0.0, np.sin(pitch), np.cos(pitch)]])
    world = cam @ rot.T
    return world / np.linalg.norm(world, axis=-1, keepdims=True)


@pytest.mark.parametrize("pitch,height", [(0.0, 1.0), (0.35, 2.2), (0.42, 2.4), (0.5, 1.0),
                                          (-0.2, 1.0), (-0.3, 2.4)])
def test_flat_ground_depth_follows_the_camera(pitch, height):
    """No objects: every pixel's depth is the ray distance to y = 0 from the camera's
    height (sky, and ground past FAR, at FAR); no pixel is salient."""
    cam = R.Camera(pitch, height)
    spec = R.SceneSpec((), "above", (0.0, 1.0, 0.0), "", cam)
    sc = R.render_spec(spec, size=64)
    d = _cam_rays(64, pitch)
    with np.errstate(divide="ignore"):
        t = np.where(d[..., 1] < 0, height / -d[..., 1], np.inf)
    expected = np.minimum(t, R.FAR)
    np.testing.assert_allclose(sc.depth, expected, rtol=1e-5)
    assert not sc.salient.any()
    # the horizon: the first row drawn as ground (lit from straight above: its albedo)
    ground_rgb = np.round(R.GROUND_ALBEDO * 255).astype(np.uint8)
    first_ground = int(np.argmax((sc.rgb == ground_rgb).all(-1).all(1)))
    v_h = np.tan(pitch) / np.tan(np.radians(30.0))
    assert abs(first_ground - (1 - v_h) / 2 * 64) <= 1.0


def test_sphere_mask_and_depth_follow_a_moved_camera():
    """Brute force per pixel (independent ray-sphere solve) against the renderer's salient
    mask and depth, for a camera far from the fixed one."""
    cam = R.Camera(0.4, 2.3)
    obj = R.Obj("sphere", "red", 0.4, 4.0, 0.7)
    spec = R.SceneSpec((obj,), "left", (-0.6, 0.7, -0.3), "", cam)
    sc = R.render_spec(spec, size=64)
    d = _cam_rays(64, cam.pitch).reshape(-1, 3)
    o = np.array([0.0, cam.height, 0.0])
    c = np.array([obj.x, obj.size, obj.z])
    oc = o - c
    b = d @ oc
    disc = b * b - (oc @ oc - obj.size ** 2)
    t = -b - np.sqrt(np.maximum(disc, 0))
    hit = (disc > 0) & (t > 0)
    mask = hit.reshape(64, 64)
    # pixels whose ray grazes the sphere may go either way in float64; none others
    graze = (np.abs(disc) < 1e-3).reshape(64, 64)
    assert ((sc.salient != mask) & ~graze).sum() == 0
    assert mask.sum() > 50
    inner = mask & ~graze
    np.testing.assert_allclose(sc.depth[inner], t.reshape(64, 64)[inner], rtol=1e-5)
    # the same sphere from the fixed camera lands elsewhere: labels are not position-only
    fixed = R.render_spec(R.SceneSpec((obj,), "left", (-0.6, 0.7, -0.3), ""), size=64)
    assert (fixed.salient != sc.salient).sum() > 20


def test_varied_scenes_keep_content_and_stay_sensible():
    rows = []
    for seed in range(100_000, 100_200):
        fixed, varied = R.sample_spec(seed), R.sample_spec(seed, camera="varied")
        assert (varied.objects, varied.light, varied.prompt) == \
            (fixed.objects, fixed.light, fixed.prompt)
        assert R.PITCH_RANGE[0] <= varied.camera.pitch <= R.PITCH_RANGE[1]
        assert R.HEIGHT_RANGE[0] <= varied.camera.height <= R.HEIGHT_RANGE[1]
        assert R.sample_spec(seed, camera="varied") == varied  # deterministic
        sc = R.render_spec(varied, size=64)
        for obj in varied.objects:  # every object is in view (alone: none hides another)
            alone = R.render_spec(R.SceneSpec((obj,), varied.light, varied.light_dir, "",
                                              varied.camera), size=64)
            assert alone.salient.sum() >= 8, (seed, obj)
        assert (sc.depth[0] == R.FAR).mean() > 0.5  # the top row is mostly sky
        rows.append(int(np.argmax((sc.depth[:, :8] < R.FAR).all(1))))
    # the horizon moves by a useful fraction of the image (fixed camera: one row)
    assert max(rows) - min(rows) >= 16
    assert len({R.sample_spec(s, camera="varied").camera for s in range(50)}) == 50


def test_pitch_range_is_a_parameter_that_keeps_the_varied_world():
    assert _digest(R.render_batch(range(240), camera="varied")) == VARIED_DIGEST
    assert _digest(R.render_batch(range(240), camera="varied",
                                  pitch=R.PITCH_RANGE)) == VARIED_DIGEST
    lo, hi = -0.2, 0.55
    for seed in range(100_000, 100_050):
        base, wide = R.sample_spec(seed, "varied"), R.sample_spec(seed, "varied", (lo, hi))
        assert (wide.objects, wide.prompt, wide.camera.height) == \
            (base.objects, base.prompt, base.camera.height)
        assert lo <= wide.camera.pitch <= hi
        # the same draw placed in the other range
        u = (base.camera.pitch - R.PITCH_RANGE[0]) / (R.PITCH_RANGE[1] - R.PITCH_RANGE[0])
        assert wide.camera.pitch == pytest.approx(lo + u * (hi - lo), abs=1e-12)
    pitches = [R.sample_spec(s, "varied", (lo, hi)).camera.pitch for s in range(200)]
    assert min(pitches) < 0 < max(pitches)   # looks up as well as down
    with pytest.raises(ValueError, match="applies to the varied camera"):
        R.sample_spec(0, "fixed", (lo, hi))


def test_unknown_camera_is_refused():
    with pytest.raises(ValueError, match="camera must be one of"):
        R.sample_spec(0, camera="tilted")


def test_training_data_cache_is_kept_per_camera(tmp_path):
    from actstore.toyworld.train import render_data

    render_data(tmp_path, 4)
    fixed = np.load(tmp_path / "rgb.npy")
    np.testing.assert_array_equal(fixed, R.render_batch(range(100_000, 100_004))["rgb"])
    render_data(tmp_path, 4, camera="varied")  # another camera: rendered again
    varied = np.load(tmp_path / "rgb.npy")
    assert json.loads((tmp_path / "world.json").read_text()) == {"camera": "varied"}
    np.testing.assert_array_equal(
        varied, R.render_batch(range(100_000, 100_004), camera="varied")["rgb"])
    assert not np.array_equal(fixed, varied)


def test_training_clis_offer_exactly_the_renderers_cameras(capsys):
    from actstore.toyworld import labeler_train, train

    for cam in R.CAMERAS:
        assert train.parse_args(["--camera", cam]).camera == cam
    for argv in (["--camera", "tilted"], ["--camera", "tilted", "--eval-only"]):
        with pytest.raises(SystemExit):
            (train.parse_args if "--eval-only" not in argv else labeler_train.main)(argv)
        assert "invalid choice: 'tilted'" in capsys.readouterr().err
