"""Interventions: edit activations with a stored probe run during generation, and measure
whether the image follows (the paper's causal test, Section 5).

For each chosen image and each of its K targets, the image is regenerated from its own
prompt and seed while every chosen (layer, step) self-attention output is edited so the
run's probe for that very step reads the target; the label model then reads the new image.
The scores compare target vs new label (post) with target vs the original image's label
(pre). Nothing is refitted: probes, labels, the model and the generation settings all come
from the store, so an experiment needs only ``--store`` and ``--probe-run``.

Images are regenerated one store block at a time, one target index per batch, so a batch
holds exactly the images materialize generated together: with no edit the output is the
store's ``final_image`` bit for bit (given the same block composition and thread count;
on CPU a different batch size moves a few pixels by one grey level). The unedited
originals are therefore not regenerated: they are the store's final images.

Everything a user can get wrong is checked before the model loads and before any byte is
written; an experiment id is a hash of its settings, so rerunning a command resumes it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
import zarr

import actstore
from actstore.store import core as st
from actstore.store.view import StoreView
from actstore.errors import ActstoreError
from actstore.generation.sampling import GenerationConfig
from actstore.intervene.edits import (GRADIENT_ITERATIONS, GRADIENT_LR, METHODS,
                                         STAT_NAMES, EditHook, generate_edited, torch_probes)
from actstore.intervene.inputs import (check_existing, label_rows, load_store_model,
                                          resolve_provider, select_images)
from actstore.intervene.results import (completed_blocks, create_experiment, group_path,
                                         list_interventions, write_summary)
from actstore.intervene.targets import (DEFAULT_MARGIN, SHIFT_RANGE, load_user_targets,
                                           make_targets, token_targets)
from actstore.kinds import BINARY
from actstore.label.labels import TARGET_NAME, list_targets
from actstore.metrics import dice, rmse
from actstore.generation.models import LoadedModel
from actstore.generation.pointnames import site_of
from actstore.probe.runs import get_run, load_probe
from actstore.progress import Progress

# The paper's defaults: salience → decoder self-attention, first 5 steps; depth → all 16
# layers, first 3 steps (Section 5.1, Appendix D).
DEFAULT_LAYERS = {BINARY: "up_blocks.", "continuous": ""}
DEFAULT_STEPS = {BINARY: 5, "continuous": 3}
TARGET_MODES = ("shift", "insert")


@dataclass
class Plan:
    """A validated experiment: everything but the model, nothing written yet."""

    store: str
    view: StoreView
    run_id: str
    target: str
    kind: str
    method: str
    layers: list[str]
    steps: list[int]
    probes: dict[str, dict]
    grids: dict[str, tuple[int, int]]
    image_ids: list[str]
    positions: np.ndarray
    prompts: list[str]
    seeds: list[int]
    mode: str | None               # shift | insert | None (user targets)
    user_targets: np.ndarray | None
    n_targets: int
    seed: int
    object_target: str | None
    hw: tuple[int, int]
    label_attrs: dict
    provider: object
    margin: float
    lr: float
    iterations: int
    settings: dict
    experiment_id: str


def plan_interventions(store: str, probe_run: str, target: str | None = None,
                       method: str = "projection", layers: list[str] | None = None,
                       steps: list[int] | None = None, images=None, n_targets: int = 5,
                       seed: int = 0, provider=None, targets: str = "shift",
                       margin: float = DEFAULT_MARGIN, lr: float = GRADIENT_LR,
                       iterations: int = GRADIENT_ITERATIONS, model_variant: str = "trained",
                       target_units: str = "normalized", experiment_id: str | None = None,
                       device: str = "cpu") -> Plan:
    """Check every input against the store; raises a one-line ActstoreError, writes nothing."""
    if experiment_id is not None and not TARGET_NAME.match(experiment_id):
        raise ActstoreError(f"--experiment {experiment_id!r}: use letters, digits, '_', '.', "
                            "'-' (not starting with '_' or '.')")
    st.read_root_attrs(store)
    run = get_run(store, probe_run)
    target = target or run["target"]
    if target != run["target"]:
        raise ActstoreError(f"probe run {probe_run} probes {run['target']!r}, not {target!r}; "
                            "pass a run of that target (or drop --target)")
    if method not in METHODS:
        raise ActstoreError(f"--method {method!r}: use {' or '.join(METHODS)}")
    if model_variant not in run["models"]:
        raise ActstoreError(f"probe run {probe_run}: has no probes for model {model_variant!r} "
                            f"(has {', '.join(run['models'])})")
    if n_targets < 1 or iterations < 1 or not lr > 0 or not margin > 0:
        raise ActstoreError("--n-targets and --iterations must be at least 1, --lr and "
                            "--margin positive")
    view = StoreView(store, model=model_variant, complete_only=False)
    kind = run["kind"]
    label_attrs = list_targets(store).get(target)
    if label_attrs is None:
        raise ActstoreError(f"store {store}: no labels {target!r} any more, though probe run "
                            f"{probe_run} was fitted on them; rewrite them with `actstore label`")
    layers = _layers(layers, kind, view, run, probe_run)
    steps = _steps(steps, kind, view, run, probe_run)
    probes = {la: load_probe(store, probe_run, la, model_variant) for la in layers}
    grids = {la: (int(view.layer_shapes[la][0]), int(view.layer_shapes[la][1]))
             for la in layers}
    positions = select_images(view, images)
    table = view.images
    image_ids = [str(v) for v in table["image"].values[positions]]
    hw = tuple(int(v) for v in label_attrs["image_size"])
    user, mode = None, targets if targets in TARGET_MODES else None
    if mode is None:
        user = load_user_targets(targets, image_ids, hw, kind, label_attrs.get("mean"),
                                 label_attrs.get("std"), target_units)
        n_targets = user.shape[1]
    elif mode == "insert" and kind == BINARY:
        raise ActstoreError("--targets insert copies an object's depth, so it needs a "
                            "continuous target such as depth; use shift for masks")
    object_target = _object_target(store, target) if mode == "insert" else None
    prov, spec = resolve_provider(provider, label_attrs, target, kind, device)
    solvers = {la: probes[la]["solver"] for la in layers}
    settings = {
        "probe_run": probe_run, "target": target, "kind": kind, "solvers": solvers,
        "model_variant": model_variant,
        "weights_sha256": view.attrs["fingerprint"]["weights_sha256"],
        "generation": view.attrs["fingerprint"]["generation"], "method": method,
        "layers": layers, "steps": steps, "images": image_ids, "n_targets": n_targets,
        "targets": mode or {"path": str(targets), "sha256": hashlib.sha256(
            np.ascontiguousarray(user).tobytes()).hexdigest()},
        "seed": seed if mode else None, "shift_range": list(SHIFT_RANGE) if mode else None,
        "object_target": object_target,
        "margin": margin if kind == BINARY and "logistic" in solvers.values() else None,
        "lr": lr if method == "gradient" else None,
        "iterations": iterations if method == "gradient" else None,
        "provider": spec, "label_mean": label_attrs.get("mean"),
        "label_std": label_attrs.get("std")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    experiment_id = experiment_id or f"{target}-{method}-{digest}"
    check_existing(store, experiment_id, settings)
    return Plan(store, view, probe_run, target, kind, method, layers, steps, probes, grids,
                image_ids, positions, [str(p) for p in table["prompt"].values[positions]],
                [int(s) for s in table["seed"].values[positions]], mode, user, n_targets,
                seed, object_target, hw, label_attrs, prov, margin, lr, iterations, settings,
                experiment_id)


def run_interventions(store: str, probe_run: str, target: str | None = None,
                      method: str = "projection", layers: list[str] | None = None,
                      steps: list[int] | None = None, images=None, n_targets: int = 5,
                      seed: int = 0, provider=None, device: str = "cpu", progress: bool = True,
                      *, targets: str = "shift", margin: float = DEFAULT_MARGIN,
                      lr: float = GRADIENT_LR, iterations: int = GRADIENT_ITERATIONS,
                      model: LoadedModel | None = None, model_variant: str = "trained",
                      target_units: str = "normalized",
                      experiment_id: str | None = None) -> dict:
    """Run (or resume) an intervention experiment; returns its summary.

    ``images``: image ids, ``"A:B"`` store positions, or None for the test split.
    ``targets``: ``shift`` (the paper), ``insert`` (Appendix E, depth) or a path to user
    targets (see :func:`actstore.intervene.targets.load_user_targets`). ``provider``:
    a label-provider spec or object to read the outputs with (default: the labels' own).
    """
    t0 = time.perf_counter()
    plan = plan_interventions(store, probe_run, target, method, layers, steps, images,
                              n_targets, seed, provider, targets, margin, lr, iterations,
                              model_variant, target_units, experiment_id, device)
    model = load_store_model(plan.view, model, device)
    final = st.model_array(store, plan.view.model, "final_image")
    _label(plan, np.asarray(final.oindex[plan.positions[:1]]), plan.image_ids[:1])  # fail before writing
    gen = GenerationConfig(**plan.view.attrs["fingerprint"]["generation"])
    group = create_experiment(store, plan.experiment_id, plan.settings, plan.image_ids,
                              plan.positions, plan.n_targets, plan.hw)
    done = completed_blocks(store, plan.experiment_id)
    blocks = _experiment_blocks(plan)
    todo = [blk for blk in blocks if blk[:2] not in done]
    bar = Progress(sum(hi - lo for _, _, lo, hi in todo) * plan.n_targets, gen.steps,
                   f"intervene {plan.target} {plan.method}", enabled=progress)
    writer = st.BlockWriter(store, group_path(plan.experiment_id))
    try:
        for a, b, lo, hi in todo:   # experiment rows lo:hi hold store block a:b's images
            writer.submit(a, b, _run_block(plan, model, gen, lo, hi, bar),
                          {"images": plan.image_ids[lo:hi], "written": time.time()},
                          rows=(lo, hi))
    finally:
        writer.close()
        bar.close()
    complete = completed_blocks(store, plan.experiment_id) >= {blk[:2] for blk in blocks}
    summary = summarize(plan, group) if complete else None
    if complete and plan.experiment_id not in list_interventions(store):
        write_summary(store, plan.experiment_id, summary)
    return {"store": store, "experiment_id": plan.experiment_id, "complete": complete,
            "blocks_written": len(todo), "blocks_skipped": len(blocks) - len(todo),
            "seconds": time.perf_counter() - t0, **(summary or {})}


def _layers(layers, kind, view, run, probe_run) -> list[str]:
    if not layers:      # the paper's: self-attention (attn1), else the store's first kind
        prefix = DEFAULT_LAYERS[kind]
        first = "attn1" if "attn1" in view.kinds else view.kinds[0]
        layers = [la for la in view.layers if view.points[la].kind == first
                  and site_of(la).startswith(prefix)]
    bad = [la for la in layers if la not in view.layers]
    if bad:
        raise ActstoreError(f"layer {bad[0]!r}: the store has no such capture point; "
                            f"it has {', '.join(view.layers)}")
    vae = [la for la in layers if not view.points[la].cfg]
    if vae:
        raise ActstoreError(f"layer {vae[0]!r}: the VAE decoder takes no part in denoising, so "
                            "an edit there cannot change the image; choose UNet layers")
    lacking = [la for la in layers if la not in run["layers"]]
    if lacking:
        raise ActstoreError(f"probe run {probe_run}: has no probe for layer {lacking[0]!r} "
                            f"(it has {', '.join(run['layers'])}); pass --layers among those "
                            "or fit a run with that layer")
    return list(dict.fromkeys(layers))


def _steps(steps, kind, view, run, probe_run) -> list[int]:
    if steps is None or len(steps) == 0:
        steps = list(range(min(DEFAULT_STEPS[kind], view.n_steps)))
    steps = sorted({int(s) for s in steps})
    bad = [s for s in steps if not 0 <= s < view.n_steps]
    if bad:
        raise ActstoreError(f"step {bad[0]}: the store's generation has steps 0..."
                            f"{view.n_steps - 1}")
    lacking = [s for s in steps if s not in run["steps"]]
    if lacking:
        raise ActstoreError(f"probe run {probe_run}: has no probe for step {lacking[0]} (it "
                            f"has steps {', '.join(map(str, run['steps']))}); pass --steps "
                            "among those or fit a run with that step")
    return steps


def _object_target(store: str, target: str) -> str | None:
    """Appendix E needs the object to copy: the store's first binary target, if any."""
    for name, attrs in list_targets(store).items():
        if name != target and attrs["kind"] == BINARY:
            return name
    return None


def _experiment_blocks(plan: Plan) -> list[tuple[int, int, int, int]]:
    """(store block start, stop, experiment row lo, hi) for blocks holding chosen images."""
    out = []
    for a, b in st.blocks_of(plan.view.root_attrs["n_images"], plan.view.block_size):
        rows = np.flatnonzero((plan.positions >= a) & (plan.positions < b))
        if rows.size:
            out.append((a, b, int(rows[0]), int(rows[-1]) + 1))
    return out


def _block_targets(plan: Plan, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Targets (n, K, H, W) and offsets (n, K, 2) of experiment rows lo:hi."""
    if plan.user_targets is not None:
        n = hi - lo
        return plan.user_targets[lo:hi], np.zeros((n, plan.n_targets, 2), np.int32)
    labels = label_rows(plan.store, plan.target, plan.positions[lo:hi])
    masks = (label_rows(plan.store, plan.object_target, plan.positions[lo:hi])
             if plan.object_target else [None] * (hi - lo))
    made = [make_targets(lab, iid, plan.kind, plan.n_targets, plan.seed, plan.mode, m)
            for lab, iid, m in zip(labels, plan.image_ids[lo:hi], masks)]
    return np.stack([t for t, _ in made]), np.stack([o for _, o in made])


def _run_block(plan: Plan, model: LoadedModel, gen: GenerationConfig, lo: int, hi: int,
               bar: Progress) -> dict[str, np.ndarray]:
    """Generate, label and score every intervention of one store block's chosen images."""
    n, K = hi - lo, plan.n_targets
    tgt, offsets = _block_targets(plan, lo, hi)
    outputs = np.empty((n, K, *plan.hw, 3), np.uint8)
    stats = np.empty((n, K, 3), np.float32)
    probes = torch_probes(plan.probes, plan.steps, model.device)
    solvers = {la: p["solver"] for la, p in plan.probes.items()}
    for k in range(K):
        tok = {la: torch.from_numpy(token_targets(tgt[:, k], plan.grids[la], plan.kind,
                                                  solvers[la], plan.margin)).to(model.device)
               for la in plan.layers}
        hook = EditHook(plan.method, plan.kind, solvers, probes, tok, n, plan.lr,
                        plan.iterations)
        outputs[:, k] = generate_edited(model, plan.prompts[lo:hi], plan.seeds[lo:hi], gen,
                                        hook, on_step_end=lambda *_: bar.step(n))
        stats[:, k] = hook.stats()
    final = st.model_array(plan.store, plan.view.model, "final_image")
    original = _label(plan, np.asarray(final.oindex[plan.positions[lo:hi]]), plan.image_ids[lo:hi])
    ids_k = [f"{i} (target {k})" for i in plan.image_ids[lo:hi] for k in range(K)]
    new = _label(plan, outputs.reshape(n * K, *outputs.shape[2:]), ids_k).reshape(n, K, *plan.hw)
    pre = _score(np.repeat(original[:, None], K, axis=1), tgt, plan.kind)
    # An edit that drove the UNet to non-finite values leaves NaN edit stats and an image
    # decoded from NaN: it has no score, rather than the score of a black picture.
    blown = ~np.isfinite(stats).all(-1)
    post = np.where(blown, np.nan, _score(new, tgt, plan.kind))
    other = np.where(blown, np.nan, _score_other(new, tgt, plan.kind))
    return {"offset": offsets, "target": tgt, "output": outputs, "new_label": new,
            "original_label": original, "score_pre": pre, "score_post": post,
            "score_other": other, "edit_stats": stats}


def _label(plan: Plan, images: np.ndarray, ids: list[str], batch: int = 16) -> np.ndarray:
    """The label model on images, in the stored labels' normalized units."""
    parts = []
    for i in range(0, len(images), batch):
        out = plan.provider(images[i:i + batch])
        arr = np.asarray(out.get(plan.target) if isinstance(out, dict) else None, np.float32)
        if arr.shape != (min(batch, len(images) - i), *plan.hw):
            raise ActstoreError(f"label provider {plan.settings['provider']}: gave "
                                f"{plan.target!r} maps of shape {arr.shape}, expected "
                                f"(n, {plan.hw[0]}, {plan.hw[1]})")
        parts.append(arr)
    maps = np.concatenate(parts)
    bad = ~np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)
    if bad.any():
        raise ActstoreError(f"label provider {plan.settings['provider']}: NaN/inf label for "
                            f"{ids[int(np.argmax(bad))]}; check the label model")
    if plan.kind == BINARY:
        return (maps > 0.5).astype(np.float32)
    return ((maps - plan.label_attrs["mean"]) / plan.label_attrs["std"]).astype(np.float32)


def _score(labels: np.ndarray, targets: np.ndarray, kind: str) -> np.ndarray:
    """Dice of masks or RMSE of normalized depth, per (image, k)."""
    n, k = targets.shape[:2]
    a, b = labels.reshape(n * k, -1), targets.reshape(n * k, -1)
    out = dice(a > 0.5, b > 0.5) if kind == BINARY else rmse(a, b)
    return out.reshape(n, k).astype(np.float32)


def _score_other(labels: np.ndarray, targets: np.ndarray, kind: str) -> np.ndarray:
    """Each output scored against the same image's other K-1 targets, averaged: the
    control for "the edit did something" vs "the image followed *this* target" (an edit
    that only adds clutter raises Dice against every target alike). NaN when K = 1."""
    n, k = targets.shape[:2]
    if k < 2:
        return np.full((n, k), np.nan, np.float32)
    out = np.zeros((n, k), np.float32)
    for j in range(1, k):   # rolled: output k against target (k + j) mod K
        out += _score(labels, np.roll(targets, -j, axis=1), kind)
    return out / (k - 1)


def describe(values: np.ndarray) -> dict[str, float]:
    """Median first (the paper's statistic), then the spread of the distribution."""
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    if not v.size:
        return {"n": 0}
    q = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {"median": float(q[2]), "mean": float(v.mean()), "q10": float(q[0]),
            "q25": float(q[1]), "q75": float(q[3]), "q90": float(q[4]), "n": int(v.size)}


def summarize(plan: Plan, group: zarr.Group) -> dict:
    """Pre/post medians and distributions, share of interventions that moved toward the
    target, and the size of the edits in probe and activation space."""
    pre, post = group["score_pre"][...], group["score_post"][...]
    other = group["score_other"][...]
    stats = group["edit_stats"][...]
    ok = np.isfinite(stats).all(-1)  # edits that kept the UNet finite (see _run_block)
    stats = stats[ok]
    better = (post > pre if plan.kind == BINARY else post < pre)[ok]
    specific = post > other if plan.kind == BINARY else post < other
    return {"experiment_id": plan.experiment_id, "probe_run": plan.run_id,
            "target": plan.target, "kind": plan.kind, "method": plan.method,
            "metric": "dice" if plan.kind == BINARY else "rmse", "layers": plan.layers,
            "steps": plan.steps, "images": len(plan.image_ids), "interventions": int(pre.size),
            "pre": describe(pre), "post": describe(post),
            "non_finite": int((~ok).sum()),
            "improved_fraction": float(better.mean()) if better.size else None,
            "other_targets": describe(other),
            "specific_fraction": float(specific[np.isfinite(other)].mean())
            if np.isfinite(other).any() else None,
            "edit": {name: float(np.median(stats[:, j])) if len(stats) else None
                     for j, name in enumerate(STAT_NAMES)},
            "actstore_version": actstore.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
