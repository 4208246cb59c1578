"""Vectorized numpy ray caster for the toy world.

The toy world exists so that every label a probe is fitted against is known exactly:
depth, the salient-object mask and the shading come out of the same geometry that
produced the pixels, with no label model in between. Scenes are a ground plane under a
sky gradient, 1-3 coloured objects (sphere, cube, cylinder) standing on the ground at
varied depths, and one directional light whose side is named in the prompt.

Everything is deterministic from an integer seed: ``render_scene(seed)`` is
``render_spec(sample_spec(seed))``, and tests can build a ``SceneSpec`` by hand to check
the geometry analytically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from actstore.toyworld.vocab import COLOURS, LIGHTS, SHAPES

# Camera: pinhole at CAM_POS, pitched down by CAM_PITCH, vertical/horizontal FOV 60 deg.
CAM_POS = np.array([0.0, 1.6, 0.0])
CAM_PITCH = 0.18
# Opt-in varied camera (``camera="varied"``): pitch and height drawn per scene. With the
# fixed camera the ground plane fixes every depth row, so depth is mostly image position
# and a moved horizon is never seen; these ranges move the horizon from the image centre
# (pitch 0) to row ~8 of 64 (pitch 0.42; the fixed camera's is row 22) while every object
# of the world stays in view.
PITCH_RANGE: tuple[float, float] = (0.0, 0.42)
HEIGHT_RANGE: tuple[float, float] = (1.0, 2.4)
CAMERAS: tuple[str, ...] = ("fixed", "varied")
TAN_HALF_FOV = float(np.tan(np.radians(30.0)))
FAR = 30.0  # metric depth of the sky and of ground beyond the far plane
AMBIENT = 0.3
EPS = 1e-4

GROUND_ALBEDO = np.array([0.58, 0.52, 0.42])
SKY_TOP = np.array([0.30, 0.50, 0.88])
SKY_HORIZON = np.array([0.80, 0.87, 0.95])

# What random scenes draw from. The first world (1-3 objects, five colours, depth 3-8)
# was too varied for the toy LDM to learn on a CPU budget: its samples were cluttered
# blobs. Every scene of this world is also a scene of the old one, so the VAE and the
# label model trained on the old world stay valid (purple stays in the vocabulary).
SCENE_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
OBJECT_COUNTS: tuple[int, ...] = (1, 2)
DEPTH_RANGE: tuple[float, float] = (3.0, 6.5)

# Direction *towards* the light for each named side, before jitter.
LIGHT_DIRS = {
    "left": np.array([-1.0, 0.9, -0.35]),
    "right": np.array([1.0, 0.9, -0.35]),
    "above": np.array([0.0, 1.0, -0.25]),
}


@dataclass(frozen=True)
class Obj:
    """One object standing on the ground (y=0). ``size`` is the sphere/cylinder radius or
    the cube half-edge; ``height`` is used by cylinders only; ``angle`` rotates cubes
    about the vertical axis."""

    shape: str
    colour: str
    x: float
    z: float
    size: float
    height: float = 0.0
    angle: float = 0.0


@dataclass(frozen=True)
class Camera:
    """Pinhole on the y axis at ``height``, looking along +z, pitched down by ``pitch`` rad."""

    pitch: float = CAM_PITCH
    height: float = float(CAM_POS[1])

    @property
    def pos(self) -> np.ndarray:
        return np.array([0.0, self.height, 0.0])


FIXED_CAMERA = Camera()


@dataclass(frozen=True)
class SceneSpec:
    objects: tuple[Obj, ...]
    light: str
    light_dir: tuple[float, float, float]  # unit vector towards the light
    prompt: str
    camera: Camera = FIXED_CAMERA


@dataclass
class Scene:
    """One rendered scene. Object ids are 1-based in prompt order; 0 is ground or sky."""

    rgb: np.ndarray  # uint8 (H, W, 3)
    depth: np.ndarray  # float32 (H, W) metric ray distance, sky = FAR
    inv_depth: np.ndarray  # float32 (H, W) 1/depth min-max normalised to [0, 1] per image
    salient: np.ndarray  # bool (H, W) objects vs ground/sky
    shading: np.ndarray  # float32 (H, W) max(0, n.l) * visibility; sky = 1
    object_id: np.ndarray  # int32 (H, W)
    prompt: str
    seed: int | None = None
    spec: SceneSpec | None = field(default=None, repr=False)


def camera_rays(size: int, pitch: float = CAM_PITCH) -> np.ndarray:
    """Unit ray directions (size*size, 3) in row-major pixel order (row 0 = top)."""
    fwd = np.array([0.0, -np.sin(pitch), np.cos(pitch)])
    up = np.array([0.0, np.cos(pitch), np.sin(pitch)])
    right = np.array([1.0, 0.0, 0.0])
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    v, u = np.meshgrid(-c, c, indexing="ij")
    d = fwd + (u[..., None] * right + v[..., None] * up) * TAN_HALF_FOV
    d = d.reshape(-1, 3)
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _rot_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def intersect(obj: Obj, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit distance t (inf on miss) and outward unit normal for rays o + t d.

    ``o`` is (3,) or (N, 3); ``d`` is (N, 3) unit vectors.
    """
    o = np.broadcast_to(o, d.shape)
    n_rays = d.shape[0]
    normal = np.zeros((n_rays, 3))
    if obj.shape == "sphere":
        c = np.array([obj.x, obj.size, obj.z])
        oc = o - c
        b = np.einsum("ij,ij->i", oc, d)
        cc = np.einsum("ij,ij->i", oc, oc) - obj.size**2
        disc = b * b - cc
        sq = np.sqrt(np.maximum(disc, 0.0))
        t = np.where(-b - sq > EPS, -b - sq, -b + sq)
        t = np.where((disc > 0) & (t > EPS), t, np.inf)
        hit = np.isfinite(t)
        normal[hit] = (o[hit] + t[hit, None] * d[hit] - c) / obj.size
        return t, normal
    if obj.shape == "cube":
        h = obj.size
        c = np.array([obj.x, h, obj.z])
        rot = _rot_y(obj.angle)
        ol = (o - c) @ rot  # world -> local is rot^T; row vectors so right-multiply
        dl = d @ rot
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / dl
            t1 = (-h - ol) * inv
            t2 = (h - ol) * inv
        tlo = np.minimum(t1, t2)
        thi = np.maximum(t1, t2)
        tlo = np.nan_to_num(tlo, nan=-np.inf)
        thi = np.nan_to_num(thi, nan=np.inf)
        tmin = tlo.max(axis=1)
        tmax = thi.min(axis=1)
        axis = tlo.argmax(axis=1)
        t = np.where((tmax >= tmin) & (tmin > EPS), tmin, np.inf)
        hit = np.isfinite(t)
        nl = np.zeros((n_rays, 3))
        idx = np.arange(n_rays)
        nl[idx, axis] = -np.sign(dl[idx, axis])
        normal[hit] = nl[hit] @ rot.T
        return t, normal
    if obj.shape == "cylinder":
        r, hgt = obj.size, obj.height
        ox, oy, oz = o[:, 0] - obj.x, o[:, 1], o[:, 2] - obj.z
        dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
        a = dx * dx + dz * dz
        b = 2.0 * (ox * dx + oz * dz)
        cc = ox * ox + oz * oz - r * r
        disc = b * b - 4 * a * cc
        with np.errstate(divide="ignore", invalid="ignore"):
            ts = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2 * a)
            tcap = (hgt - oy) / dy
        ys = oy + ts * dy
        side_ok = (disc > 0) & (a > 1e-12) & (ts > EPS) & (ys >= 0) & (ys <= hgt)
        ts = np.where(side_ok, ts, np.inf)
        px, pz = ox + tcap * dx, oz + tcap * dz
        cap_ok = np.isfinite(tcap) & (tcap > EPS) & (px * px + pz * pz <= r * r)
        tcap = np.where(cap_ok, tcap, np.inf)
        t = np.minimum(ts, tcap)
        side = np.isfinite(ts) & (ts <= tcap)
        cap = np.isfinite(tcap) & (tcap < ts)
        normal[side, 0] = (ox[side] + ts[side] * dx[side]) / r
        normal[side, 2] = (oz[side] + ts[side] * dz[side]) / r
        normal[cap, 1] = np.where(dy[cap] < 0, 1.0, -1.0)
        return t, normal
    raise ValueError(f"unknown shape {obj.shape!r}")


def _article_phrase(obj: Obj) -> str:
    return f"a {obj.colour} {obj.shape}"


def describe(objects: tuple[Obj, ...], light: str) -> str:
    """Prompt in the closed vocabulary; objects are listed in the order given."""
    if len(objects) == 1:
        body = _article_phrase(objects[0])
    elif len(objects) == 2:
        a, b = objects
        rel = "in front of" if b.z - a.z > 1.5 else "to the left of"
        body = f"{_article_phrase(a)} {rel} {_article_phrase(b)}"
    else:
        parts = [_article_phrase(o) for o in objects]
        body = f"{parts[0]} , {parts[1]} and {parts[2]}"
    return f"{body} , light from the {light}" if light != "above" else f"{body} , light from above"


def _order_for_prompt(objs: list[Obj]) -> tuple[Obj, ...]:
    """Two objects far apart in depth are named nearest first ("in front of"), otherwise
    left to right, so every relation word is true of the picture."""
    if len(objs) == 2:
        a, b = sorted(objs, key=lambda o: o.z)
        if b.z - a.z > 1.5:
            return (a, b)
    return tuple(sorted(objs, key=lambda o: o.x))


def sample_camera(seed: int, pitch: tuple[float, float] = PITCH_RANGE) -> Camera:
    """The varied camera of scene ``seed``, from its own stream of the seed (so the
    scene's objects, light and prompt are those of the fixed-camera scene). ``pitch`` is
    the range pitch is drawn from: another range keeps each scene's height and the
    position of its pitch within the range, so worlds of several ranges compare scene by
    scene (a negative pitch looks up and puts the horizon below the image centre)."""
    rng = np.random.default_rng([seed, 1])
    return Camera(float(rng.uniform(*pitch)), float(rng.uniform(*HEIGHT_RANGE)))


def sample_spec(seed: int, camera: str = "fixed",
                pitch: tuple[float, float] | None = None) -> SceneSpec:
    """Random scene from a seed: 1-2 non-overlapping objects inside the view frustum.

    The world is kept as simple as the probing targets allow (see ``SCENE_COLOURS``,
    ``OBJECT_COUNTS``, ``DEPTH_RANGE``) so that a 3 M-parameter LDM trained for two hours
    on a CPU draws recognisable objects and shadows; ``describe`` and ``render_spec`` still
    handle any hand-built scene (e.g. three objects, purple) for tests. ``camera="varied"``
    adds :func:`sample_camera`'s pitch and height (pitch drawn from ``pitch``, default
    ``PITCH_RANGE``); ``"fixed"`` is the world every shipped model, fixture and prompt
    table was made from.
    """
    if camera not in CAMERAS:
        raise ValueError(f"camera must be one of {CAMERAS}, not {camera!r}")
    if pitch is not None and camera != "varied":
        raise ValueError(f"a pitch range applies to the varied camera, not {camera!r}")
    rng = np.random.default_rng(seed)
    n_obj = int(rng.choice(OBJECT_COUNTS))
    objs: list[Obj] = []
    while len(objs) < n_obj:
        shape = str(rng.choice(SHAPES))
        colour = str(rng.choice(SCENE_COLOURS))
        if shape == "sphere":
            size, height = rng.uniform(0.45, 0.9), 0.0
        elif shape == "cube":
            size, height = rng.uniform(0.4, 0.7), 0.0
        else:
            size, height = rng.uniform(0.35, 0.6), rng.uniform(0.8, 1.8)
        z = rng.uniform(*DEPTH_RANGE)
        half = TAN_HALF_FOV * z * 0.8 - size
        x = rng.uniform(-half, half)
        cand = Obj(shape, colour, float(x), float(z), float(size), float(height),
                   float(rng.uniform(0, np.pi / 2)) if shape == "cube" else 0.0)
        reach = size * (1.42 if shape == "cube" else 1.0)
        if all(np.hypot(o.x - x, o.z - z) > reach + o.size * 1.42 + 0.15 for o in objs):
            if all(o.colour != colour or o.shape != shape for o in objs):
                objs.append(cand)
    light = str(rng.choice(LIGHTS))
    ld = LIGHT_DIRS[light] + rng.uniform(-0.2, 0.2, size=3)
    ld = ld / np.linalg.norm(ld)
    ordered = _order_for_prompt(objs)
    cam = (sample_camera(seed, PITCH_RANGE if pitch is None else pitch)
           if camera == "varied" else FIXED_CAMERA)
    return SceneSpec(ordered, light, tuple(float(v) for v in ld), describe(ordered, light), cam)


def render_spec(spec: SceneSpec, size: int = 64, seed: int | None = None) -> Scene:
    """Ray-cast one scene: primary rays, nearest surface, Lambert + shadow rays."""
    d = camera_rays(size, spec.camera.pitch)
    cam_pos = spec.camera.pos
    n = d.shape[0]
    light = np.asarray(spec.light_dir, dtype=np.float64)

    t_best = np.full(n, np.inf)
    normal = np.zeros((n, 3))
    oid = np.zeros(n, dtype=np.int32)
    with np.errstate(divide="ignore"):
        t_ground = np.where(d[:, 1] < 0, -cam_pos[1] / d[:, 1], np.inf)
    ground = np.isfinite(t_ground)
    t_best[ground] = t_ground[ground]
    normal[ground] = (0.0, 1.0, 0.0)
    for k, obj in enumerate(spec.objects, start=1):
        t, nrm = intersect(obj, cam_pos, d)
        closer = t < t_best
        t_best[closer] = t[closer]
        normal[closer] = nrm[closer]
        oid[closer] = k

    surf = np.isfinite(t_best)
    lam = np.clip(normal @ light, 0.0, None)
    # Shadow rays only from lit surface points; objects are the only occluders.
    vis = np.ones(n)
    cand = np.flatnonzero(surf & (lam > 0))
    if cand.size and spec.objects:
        p = cam_pos + t_best[cand, None] * d[cand] + 1e-3 * normal[cand]
        ldir = np.broadcast_to(light, p.shape)
        blocked = np.zeros(cand.size, dtype=bool)
        for obj in spec.objects:
            ts, _ = intersect(obj, p, ldir)
            blocked |= np.isfinite(ts)
        vis[cand[blocked]] = 0.0
    shading = np.where(surf, lam * vis, 1.0)

    albedo = np.tile(GROUND_ALBEDO, (n, 1))
    for k, obj in enumerate(spec.objects, start=1):
        albedo[oid == k] = COLOURS[obj.colour]
    lit = albedo * (AMBIENT + (1.0 - AMBIENT) * shading[:, None])
    sky_w = np.clip(d[:, 1] / 0.6, 0.0, 1.0)[:, None] ** 0.7
    sky = SKY_HORIZON * (1 - sky_w) + SKY_TOP * sky_w
    rgb = np.where(surf[:, None], lit, sky)

    depth = np.minimum(np.where(surf, t_best, FAR), FAR)
    inv = 1.0 / depth
    lo, hi = inv.min(), inv.max()
    inv_n = (inv - lo) / max(hi - lo, 1e-12)

    hw = (size, size)
    return Scene(
        rgb=np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8).reshape(size, size, 3),
        depth=depth.astype(np.float32).reshape(hw),
        inv_depth=inv_n.astype(np.float32).reshape(hw),
        salient=(oid > 0).reshape(hw),
        shading=shading.astype(np.float32).reshape(hw),
        object_id=oid.reshape(hw),
        prompt=spec.prompt,
        seed=seed,
        spec=spec,
    )


def render_scene(seed: int, size: int = 64, camera: str = "fixed",
                 pitch: tuple[float, float] | None = None) -> Scene:
    """The scene for ``seed``; identical across calls and machines (numpy PCG64)."""
    return render_spec(sample_spec(seed, camera, pitch), size=size, seed=seed)


def render_batch(seeds: Sequence[int] | np.ndarray, size: int = 64, camera: str = "fixed",
                 pitch: tuple[float, float] | None = None) -> dict[str, np.ndarray | list[str]]:
    """Stack many scenes into arrays keyed like ``Scene`` fields (plus ``seed``)."""
    scenes = [render_scene(int(s), size, camera, pitch) for s in seeds]
    out: dict[str, np.ndarray | list[str]] = {
        k: np.stack([getattr(sc, k) for sc in scenes])
        for k in ("rgb", "depth", "inv_depth", "salient", "shading", "object_id")
    }
    out["prompt"] = [sc.prompt for sc in scenes]
    out["seed"] = np.asarray([int(s) for s in seeds], dtype=np.int64)
    return out
