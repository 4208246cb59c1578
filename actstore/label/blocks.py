"""A label run as block tasks any process can do: what the serial run and a Dask fan-out
are both made of, every block recorded so that a killed run resumes.

A run has two passes over the image blocks. Pass 1 runs the provider on a block's final
images and stages the raw labels (``<version>/_raw/<target>``), the block's train-split
moments in its record; those moments, merged in block order, give each continuous target
its z-score constants (the same floats as one sequential pass). Pass 2 normalizes a
block's staged labels into ``full``, pools them to every layer grid and labels the block's
x0 images. Each block task reads and writes its own block only, so blocks run in any
order on any worker. The records (``<version>/_pass1|_pass2/_blocks/<a>-<b>``) let a rerun
of the same *job* (provider, weights, targets and options; the job key in the versions'
writer marks) adopt the versions a dead run left and do the missing blocks only. The commit
removes staging and records, then makes the set visible with one record
(:mod:`actstore.store.labelsets`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from actstore.errors import ActstoreError
from actstore.kinds import CONTINUOUS
from actstore.label.passes import PassContext, normalize, pool_block, resolution_name
from actstore.cluster import shared, stop_if_cancelled, worker_id
from actstore.label.providers import LabelProvider, get_provider
from actstore.store import commit, io, labelsets
from actstore.store import core as st
from actstore.store import layout as lay
from actstore.store.codecs import DEFAULT_CODEC

if TYPE_CHECKING:
    from actstore.progress import Progress

RAW, PASS1, PASS2 = "_raw", "_pass1", "_pass2"


@dataclass(frozen=True)
class LabelJob:
    """Everything a block task needs, small enough to send to every worker."""

    store: str
    spec: str                     # provider spec: a worker loads its own provider from it
    device: str
    kinds: dict                   # target -> kind, in the order given
    paths: dict                   # target -> version path
    ids: tuple
    train: tuple                  # per image: in the train split
    hw: tuple
    block: int
    batch_size: int
    source_model: str
    grids: dict                   # layer -> token grid (h, w)
    n_steps: int                  # x0 steps to label (0: none)
    x0_note: str | None           # why x0 images are not labelled
    replaced: tuple               # targets whose committed labels the run replaces
    tokens: dict                  # version path -> the run's writer token (its mark's)

    @property
    def blocks(self) -> list[tuple[int, int]]:
        return st.blocks_of(len(self.ids), self.block)

    def context(self, prov: LabelProvider) -> PassContext:
        return PassContext(self.kinds, self.spec, prov, list(self.ids), self.hw, self.block,
                           self.batch_size)

    def record_group(self, stage: str) -> str:
        return f"{next(iter(self.paths.values()))}/{stage}"

    def check_owned(self, *paths: str) -> None:
        """Stop (one line) unless the run still owns its versions (``paths``: those only);
        before each write step.

        A few small reads per block (each version's mark and birth record) against seconds
        of labelling: a run taken for gone while it lived (frozen, its host cut off) and
        taken over by a rerun of its job writes nothing more after its next check, so its
        late writes are at most the one step in flight, of a block the rerun writes with
        the same bytes (same job), and never a removal (:func:`drop_staging` checks too).
        A step writing one target's arrays checks that target's version alone: checking
        every version before each target made pass 2 cost targets² checks a block."""
        labelsets.check_owned(self.store, {p: tok for p, tok in self.tokens.items()
                                           if not paths or p in paths})


def job_key(spec: str, provenance: dict, identity: dict) -> str:
    """Runs with equal keys would write equal labels, so one may finish the other's."""
    doc = json.dumps({"spec": spec, "provenance": provenance, **identity}, sort_keys=True,
                     default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def create_arrays(job: LabelJob) -> None:
    """Every array of the run's versions, staging included (idempotent: a resumed run
    rewrites the metadata and keeps the chunks)."""
    n, (h, w) = len(job.ids), job.hw
    job.check_owned()
    for t, path in job.paths.items():
        def make(name, shape, chunks, dims, attrs):
            st.create_array(job.store, f"{path}/{name}", shape=shape, chunks=chunks,
                            dtype="float32", dims=dims, attrs=attrs, codec=DEFAULT_CODEC)

        make(RAW, (n, h, w), (job.block, h, w), ["image", "y", "x"], {})
        make("full", (n, h, w), (job.block, h, w), ["image", "y", "x"], {"resolution": [h, w]})
        for gh, gw in sorted(set(map(tuple, job.grids.values())), reverse=True):
            name = resolution_name(gh, gw)
            make(name, (n, gh, gw), (job.block, gh, gw), ["image", f"y_{name}", f"x_{name}"],
                 {"resolution": [gh, gw], "pooled_from": "full",
                  "layers": [la for la, g in job.grids.items() if tuple(g) == (gh, gw)]})
        if job.n_steps:
            make("x0", (n, job.n_steps, h, w), (job.block, 1, h, w),
                 ["image", "step", "y", "x"], {"resolution": [h, w], "source": "x0_image"})


def pending(job: LabelJob, stage: str) -> list[tuple[int, int]]:
    done = commit.completed_blocks_at(job.store, job.record_group(stage))
    return [blk for blk in job.blocks if blk not in done]


def raw_block(job: LabelJob, prov: LabelProvider, a: int, b: int,
              done: Callable[[int], None] | None = None) -> None:
    """Pass 1 for images a:b: raw labels staged, train moments in the block's record.
    ``done`` hears the images labelled, batch by batch (see :meth:`PassContext.run`)."""
    ctx = job.context(prov)
    by_ids = getattr(prov, "by_ids", None)
    if by_ids is not None:
        raws = ctx.pick(by_ids(list(job.ids[a:b])), b - a)
        if done is not None:
            done(b - a)
    else:
        raws = ctx.run(np.asarray(st.model_array(job.store, job.source_model,
                                                 "final_image")[a:b]), done)
    train = np.asarray(job.train[a:b], dtype=bool)
    moments = {}
    for t, raw in raws.items():
        ctx.validate(t, raw, a)
    job.check_owned()
    for t, raw in raws.items():
        io.open_array(job.store, f"{job.paths[t]}/{RAW}", "r+")[a:b] = raw
        moments[t] = block_moments(raw[train].astype(np.float64))   # binary: the ones' share
    job.check_owned()
    commit.write_block_record(job.store, job.record_group(PASS1), a, b, {"moments": moments})


def block_moments(sel: np.ndarray) -> list[float]:
    """(n, mean, sum of squared deviations) of one block's train pixels."""
    if not sel.size:
        return [0, 0.0, 0.0]
    m = float(sel.mean())
    return [int(sel.size), m, float(((sel - m) ** 2).sum())]


def stats(job: LabelJob) -> dict[str, tuple]:
    """Each target's (mean, std) from the pass-1 records, merged in block order (Chan);
    (None, None) for binary targets. A target constant over the train images is refused:
    a continuous one can't be z-scored, and a binary one of one class gives every probe
    nothing to tell apart (its test Dice read 1.000 on maps all 0 or all 1)."""
    out = {}
    records = [io.node_attrs(job.store, lay.block_record_path(
        job.record_group(PASS1), a, b))[lay.BLOCK_KEY]["moments"] for a, b in job.blocks]
    for t, kind in job.kinds.items():
        n, mean, m2 = 0, 0.0, 0.0
        for rec in records:
            bn, bm, bm2 = rec.get(t, (0, 0.0, 0.0))
            if not bn:
                continue
            tot = n + bn
            m2 += bm2 + (bm - mean) ** 2 * n * bn / tot
            mean += (bm - mean) * bn / tot
            n = tot
        # a binary target's moments are recorded since 2026-12-07: a run resumed from
        # records made before is not checked (a part of the train images is no proof)
        if kind != CONTINUOUS and not all(t in rec for rec in records):
            out[t] = (None, None)
            continue
        if not m2 > 0:
            why = ("so it can't be z-scored" if kind == CONTINUOUS else
                   f"every train map is all {mean:.0f}, so a probe has no class to tell apart")
            raise ActstoreError(f"provider {job.spec}: {t!r} is constant over the train "
                                f"images, {why}; check the label model")
        out[t] = (float(mean), float(np.sqrt(m2 / n))) if kind == CONTINUOUS else (None, None)
    return out


def final_block(job: LabelJob, prov: LabelProvider, stats_: dict, a: int, b: int,
                done: Callable[[int], None] | None = None) -> None:
    """Pass 2 for images a:b: normalized labels, pooled grids, x0 labels, then its record.
    ``done`` hears the x0 images labelled (image-steps), batch by batch."""
    sizes = sorted(set(map(tuple, job.grids.values())), reverse=True)
    maps = {}
    if job.n_steps:
        ctx = job.context(prov)
        imgs = np.asarray(st.model_array(job.store, job.source_model, "x0_image")[a:b])
        n, s = imgs.shape[:2]
        maps = {t: m.reshape(n, s, *job.hw)
                for t, m in ctx.run(imgs.reshape(n * s, *imgs.shape[2:]), done).items()}
        for t, m in maps.items():
            for step in range(s):
                ctx.validate(t, m[:, step], a, step)
    for t, path in job.paths.items():
        stop_if_cancelled()     # writing a target's arrays takes about a second at 500 steps
        job.check_owned(path)
        full = normalize(np.asarray(io.open_array(job.store, f"{path}/{RAW}")[a:b]),
                         *stats_[t])
        io.open_array(job.store, f"{path}/full", "r+")[a:b] = full
        for h, w in sizes:
            io.open_array(job.store, f"{path}/{resolution_name(h, w)}", "r+")[a:b] = \
                pool_block(full, (h, w))
        if t in maps:
            io.open_array(job.store, f"{path}/x0", "r+")[a:b] = normalize(maps[t], *stats_[t])
    job.check_owned()
    commit.write_block_record(job.store, job.record_group(PASS2), a, b, {})


def run_blocks(job: LabelJob, stage: str, blks: Iterable[tuple[int, int]],
               constants: dict | None = None, *, prov: LabelProvider | None = None,
               bar: Progress | None = None) -> dict:
    """One pass over ``blks`` with ``prov`` (default: this process's shared provider).

    A Dask task whose command was interrupted stops at its next block, provider batch or
    target's arrays (:func:`stop_if_cancelled`), before recording its block: without that
    a group labelled and recorded its blocks on a user's cluster after the command had
    exited (16 s and 1011 files for one block of 4 images at 500 steps, 2026-12-05). What
    it staged stays unseen, and a rerun of the same job adopts it."""
    prov = prov if prov is not None else shared_provider(job.spec, job.device)
    done = bar.step if bar is not None else None
    for a, b in blks:
        stop_if_cancelled()
        if stage == PASS1:
            raw_block(job, prov, a, b, done)
        else:
            final_block(job, prov, constants, a, b, done)
    return {"images": sum(b - a for a, b in blks), "worker": worker_id()}


def drop_staging(job: LabelJob) -> None:
    """Staged raw labels and block records: none of them belongs to the committed labels.
    A run that took this one over relies on them until it commits: checked first."""
    job.check_owned()
    for path in job.paths.values():
        io.remove(job.store, f"{path}/{RAW}")
    for stage in (PASS1, PASS2):
        io.remove(job.store, job.record_group(stage))


def shared_provider(spec: str, device: str) -> LabelProvider:
    """This process's provider for ``spec``: loaded once, reused for every block task."""
    return shared("provider", (spec, device), lambda: get_provider(spec, device))
