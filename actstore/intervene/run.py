"""Interventions: edit activations with a stored probe run during generation, and measure
whether the image follows (the paper's causal test, Section 5), at several strengths and
against an equal-size random-direction control.

For each chosen image, each of its K targets, each strength and each arm (the probe edit,
and the random control), the image is regenerated from its own prompt and seed while every
chosen (capture point, step) output is edited so the run's probe for that very step reads
the target (scaled by the strength); the label model then reads the new image. Scores
compare target vs new label (post) with target vs the original image's label (pre), and
the new label against the image's other targets. Nothing is refitted: probes, labels, the
model and the generation settings all come from the store, so an experiment needs only
``--store`` and ``--probe-run``.

The unedited originals are not regenerated: they are the store's final images. The
interventions of one store block are generated ``batch_size`` at a time; on CPU a batch
of another composition than materialize's moves a few pixels by one grey level, which is
why strength 0 is checked against a plain generation of the same batch, not the store.

Plan and checks: :mod:`actstore.intervene.plan`; scores and summary:
:mod:`actstore.intervene.scores`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from actstore.errors import ActstoreError
from actstore.generation.models import LoadedModel
from actstore.generation.sampling import GenerationConfig
from actstore.intervene.edits import (SIZE_MEASURES, STAT_NAMES, EditHook, direction_key,
                                      generate_edited, torch_directions, torch_probes)
from actstore.intervene.inputs import label_rows, load_store_model
from actstore.intervene.plan import Plan, plan_interventions
from actstore.intervene.results import (completed_blocks, create_experiment, group_path,
                                        list_interventions, write_summary)
from actstore.intervene.scores import score, score_other, summarize
from actstore.intervene.settings import InterventionSettings
from actstore.intervene.targets import make_targets, token_targets
from actstore.kinds import BINARY
from actstore.progress import Progress
from actstore.store import core as st
from actstore.store import io


@dataclass(frozen=True)
class Experiment:
    """A checked experiment, created in the store, with the model that runs its blocks."""

    plan: Plan
    model: LoadedModel
    gen: GenerationConfig

    @property
    def blocks(self) -> list[tuple[int, int, int, int]]:
        return _experiment_blocks(self.plan)

    def pending(self) -> list[tuple[int, int, int, int]]:
        """(store block a, b, experiment rows lo, hi) of the blocks not recorded yet."""
        done = completed_blocks(self.plan.store, self.plan.experiment_id)
        return [blk for blk in self.blocks if blk[:2] not in done]

    @property
    def per_image(self) -> int:
        """Generations per chosen image: its targets × strengths × arms."""
        s = self.plan.settings
        return self.plan.n_targets * len(s.strengths) * len(s.arms)


def run_interventions(store: str, probe_run: str,
                      settings: InterventionSettings = InterventionSettings(), *,
                      model: LoadedModel | None = None, progress: bool = True,
                      provenance: dict | None = None) -> dict:
    """Run (or resume) an intervention experiment; returns its summary.

    ``settings.images``: image ids, ``"A:B"`` store positions, or None for the test split.
    ``settings.targets``: ``shift`` (the paper), ``insert`` (Appendix E, depth) or a path
    to user targets (see :func:`actstore.intervene.targets.load_user_targets`).
    ``provenance`` is stored with the experiment (e.g. the sweep that chose the setting).
    """
    t0 = time.perf_counter()
    exp = begin_experiment(plan_interventions(store, probe_run, settings,
                                              provenance=provenance), model)
    todo = exp.pending()
    bar = Progress(sum(hi - lo for _, _, lo, hi in todo) * exp.per_image, exp.gen.steps,
                   f"intervene {exp.plan.target} {exp.plan.settings.method}", enabled=progress)
    try:
        run_blocks(exp, todo, bar)
    finally:
        bar.close()
    return {**finish_experiment(exp, len(todo)), "seconds": time.perf_counter() - t0}


def begin_experiment(plan: Plan, model: LoadedModel | None = None) -> Experiment:
    """Check the model against the store and the label model on one image, then create the
    experiment (unless a resumed or concurrent run did): a refusal writes nothing."""
    model = load_store_model(plan.view, model, plan.settings.device)
    final = st.model_array(plan.store, plan.view.model, "final_image")
    _label(plan, np.asarray(final.oindex[plan.positions[:1]]), plan.image_ids[:1])
    create_experiment(plan.store, plan.experiment_id, settings=plan.record,
                      image_ids=plan.image_ids, positions=plan.positions,
                      n_targets=plan.n_targets, hw=plan.hw)
    return Experiment(plan, model, GenerationConfig(**plan.view.attrs["fingerprint"]
                                                    ["generation"]))


def run_blocks(exp: Experiment, todo: list, bar: Progress | None = None) -> None:
    """Generate, score and record experiment blocks (each recorded once its arrays are)."""
    plan = exp.plan
    bar = bar or Progress(0, 1, "", enabled=False)
    writer = st.BlockWriter(plan.store, group_path(plan.experiment_id))
    try:
        for a, b, lo, hi in todo:   # experiment rows lo:hi hold store block a:b's images
            writer.submit(a, b, _run_block(plan, exp.model, exp.gen, lo, hi, bar),
                          {"images": plan.image_ids[lo:hi], "written": time.time()},
                          rows=(lo, hi))
    finally:
        writer.close()


def finish_experiment(exp: Experiment, written: int) -> dict:
    """Once every block is recorded: the summary record (which makes the experiment
    complete) and the dose table; before that, how far it is. ``written``: blocks this
    run wrote."""
    plan, blocks = exp.plan, exp.blocks
    done = completed_blocks(plan.store, plan.experiment_id) & {blk[:2] for blk in blocks}
    complete = len(done) == len(blocks)
    summary = summarize(plan, io.open_group(plan.store, group_path(plan.experiment_id))) \
        if complete else None
    if complete and plan.experiment_id not in list_interventions(plan.store):
        write_summary(plan.store, plan.experiment_id, summary)
    return {"store": plan.store, "experiment_id": plan.experiment_id, "complete": complete,
            "blocks_written": written, "blocks_skipped": len(blocks) - written,
            "blocks_complete": len(done), "blocks": len(blocks), **(summary or {})}


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
    labels = label_rows(plan, plan.target, plan.positions[lo:hi])
    masks = (label_rows(plan, plan.object_target, plan.positions[lo:hi])
             if plan.object_target else [None] * (hi - lo))
    made = [make_targets(lab, iid, plan.kind, n_targets=plan.n_targets,
                         seed=plan.settings.seed, mode=plan.mode, mask=m)
            for lab, iid, m in zip(labels, plan.image_ids[lo:hi], masks)]
    return np.stack([t for t, _ in made]), np.stack([o for _, o in made])


def _run_block(plan: Plan, model: LoadedModel, gen: GenerationConfig, lo: int, hi: int,
               bar: Progress) -> dict[str, np.ndarray]:
    """Generate, label and score every intervention of one store block's chosen images."""
    cfg = plan.settings
    n, K, S, A = hi - lo, plan.n_targets, len(cfg.strengths), len(cfg.arms)
    tgt, offsets = _block_targets(plan, lo, hi)
    probes = torch_probes(plan.probes, plan.steps, model.device)
    directions = torch_directions(plan.patterns, model.device)
    solvers = {la: p["solver"] for la, p in plan.probes.items()}
    tok = {la: torch.from_numpy(token_targets(tgt.reshape(n * K, *plan.hw), plan.grids[la],
                                              plan.kind, solvers[la], cfg.margin))
           .reshape(n, K, -1).to(model.device) for la in plan.layers}
    rows = [(i, k, si, ai) for i in range(n) for k in range(K) for si in range(S)
            for ai in range(A)]
    ids = plan.image_ids[lo:hi]
    outputs = np.empty((n, K, S, A, *plan.hw, 3), np.uint8)
    stats = np.empty((n, K, S, A, len(STAT_NAMES)), np.float32)
    sizes = np.empty((n, K, S, A, len(plan.layers), len(plan.steps), len(SIZE_MEASURES)),
                     np.float32)
    for c in range(0, len(rows), cfg.batch_size):
        chunk = rows[c:c + cfg.batch_size]
        ii, kk, ss, aa = (np.array(v) for v in zip(*chunk))
        hook = EditHook(cfg.method, plan.kind, solvers, probes,
                        {la: t[ii, kk] for la, t in tok.items()}, len(chunk),
                        strengths=torch.tensor([cfg.strengths[j] for j in ss]),
                        random=torch.tensor([cfg.arms[j] == "random" for j in aa]),
                        keys=[direction_key(ids[i], k, cfg.seed) for i, k in zip(ii, kk)],
                        directions=directions, lr=cfg.lr, iterations=cfg.iterations,
                        halves=cfg.halves)
        out = generate_edited(model, [plan.prompts[lo + i] for i in ii],
                              [plan.seeds[lo + i] for i in ii], gen, hook=hook,
                              on_step_end=lambda *_, m=len(chunk): bar.step(m))
        outputs[ii, kk, ss, aa] = out
        stats[ii, kk, ss, aa] = hook.stats()
        sizes[ii, kk, ss, aa] = hook.size_grid(plan.layers, plan.steps)
    final = st.model_array(plan.store, plan.view.model, "final_image")
    original = _label(plan, np.asarray(final.oindex[plan.positions[lo:hi]]), ids)
    names = [f"{ids[i]} (target {k}, strength {cfg.strengths[s]}, {cfg.arms[a]})"
             for i, k, s, a in rows]
    new = _label(plan, outputs.reshape(-1, *outputs.shape[-3:]), names)
    new = new.reshape(n, K, S, A, *plan.hw)
    pre = score(np.broadcast_to(original[:, None], tgt.shape), tgt, plan.kind)
    # An edit that drove the UNet to non-finite values leaves NaN edit stats and an image
    # decoded from NaN: it has no score, rather than the score of a black picture.
    blown = ~np.isfinite(stats).all(-1)
    wide = np.broadcast_to(tgt[:, :, None, None], new.shape)
    post = np.where(blown, np.nan, score(new, wide, plan.kind))
    other = np.where(blown, np.nan, score_other(new, tgt, plan.kind))
    return {"offset": offsets, "target": tgt, "output": outputs, "new_label": new,
            "original_label": original, "score_pre": pre, "score_post": post,
            "score_other": other, "edit_stats": stats, "edit_size": sizes}


def _label(plan: Plan, images: np.ndarray, ids: list[str], batch: int = 16) -> np.ndarray:
    """The label model on images, in the stored labels' normalized units."""
    parts = []
    for i in range(0, len(images), batch):
        out = plan.provider(images[i:i + batch])
        arr = np.asarray(out.get(plan.target) if isinstance(out, dict) else None, np.float32)
        if arr.shape != (min(batch, len(images) - i), *plan.hw):
            raise ActstoreError(f"label provider {plan.record['provider']}: gave "
                                f"{plan.target!r} maps of shape {arr.shape}, expected "
                                f"(n, {plan.hw[0]}, {plan.hw[1]})")
        parts.append(arr)
    maps = np.concatenate(parts)
    bad = ~np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)
    if bad.any():
        raise ActstoreError(f"label provider {plan.record['provider']}: NaN/inf label for "
                            f"{ids[int(np.argmax(bad))]}; check the label model")
    if plan.kind == BINARY:
        return (maps > 0.5).astype(np.float32)
    return ((maps - plan.label_attrs["mean"]) / plan.label_attrs["std"]).astype(np.float32)
