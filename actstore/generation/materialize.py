"""Materialize: generate images and write every captured activation into the store.

Pure library code; ``flows/materialize.py`` wraps it for Prefect and the CLI calls that.
Idempotent and resumable by construction: the work is a list of image blocks, a block's
completion record is written after its arrays, and a rerun skips recorded blocks. Because
every image's noise comes from its own seed, a block rewritten after a crash holds exactly
the bytes an uninterrupted run would have written.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

import actstore
from actstore.store import core as st
from actstore.generation.capture import capture_block, capture_points
from actstore.generation.capture_plan import (CapturePlan, block_work, check_added,
                                              ensure_added, plan_capture, undo_added)
from actstore.generation.fingerprint import check_stored_settings, model_fingerprint
from actstore.generation.pointnames import VAE_SOURCES, parse_kinds
from actstore.generation.regenerate import (DEFAULT_BATCH_SIZE, check_regenerated,
                                                cpu_kernels, is_exact, recorded_batch_size,
                                                stored_table)
from actstore.store.codecs import DEFAULT_CODEC, codec_chain
from actstore.errors import ActstoreError, InputError
from actstore.options import start_stop
from actstore.generation.sampling import GenerationConfig, schedule_coords
from actstore.generation.models import LoadedModel, apply_control, load_model
from actstore.progress import Progress
from actstore.generation.prompts import check_prompt_lengths, load_prompts, prompts_fingerprint

if TYPE_CHECKING:
    import pandas as pd

STORE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class CaptureConfig:
    """What is captured and how it is stored: part of a store's fingerprint.

    ``kinds``: capture kinds to have on every block of the run (see
    :mod:`actstore.generation.points`); None keeps the variant's kinds, or attn1 (the
    paper's) for a new variant. ``vae_source``: what the vae kind decodes at each step,
    the updated latent (the paper) or the x0 prediction."""

    store_dtype: str = "float16"
    codec: str = DEFAULT_CODEC
    keep_uncond: bool = False
    x0: bool = True
    kinds: tuple[str, ...] | None = None
    vae_source: str = "latent"


@dataclass(frozen=True)
class MaterializeSettings:
    """Everything a materialize run is told besides model, prompts and store, passed whole
    from the command line through the flow to the library (every default lives here or in
    the two configs it holds). ``gen`` and ``cap`` change the stored arrays and are part of
    the store's fingerprint; the rest only changes how fast they are made."""

    gen: GenerationConfig = field(default_factory=GenerationConfig)
    cap: CaptureConfig = field(default_factory=CaptureConfig)
    batch_size: int = DEFAULT_BATCH_SIZE
    dtype: str = "float32"
    device: str = "auto"
    control: str | None = None
    block_size: int | None = None  # None: the store's, or DEFAULT_BLOCK_SIZE for a new one

    def with_options(self, **options: Any) -> "MaterializeSettings":
        """A copy with flat options (``steps=``, ``codec=``, ``batch_size=``...) routed to
        the config that owns them; an option given as None keeps its value, as a
        command-line option not given does."""
        given = {k: v for k, v in options.items() if v is not None}
        parts = {"gen": {}, "cap": {}, "": {}}
        owners = {"gen": GenerationConfig, "cap": CaptureConfig}
        for key, value in given.items():
            owner = next((o for o, cls in owners.items()
                          if key in {f.name for f in fields(cls)}), "")
            if not owner and key not in {f.name for f in fields(self)}:
                raise TypeError(f"MaterializeSettings has no option {key!r}")
            parts[owner][key] = value
        base = replace(self, **parts[""])
        return replace(base, gen=replace(base.gen, **parts["gen"]),
                       cap=replace(base.cap, **parts["cap"]))


def parse_region(images: str | None, n_images: int, block_size: int, *,
                 why: str = "so workers never share a block") -> tuple[int, int]:
    """``"A:B"`` → (A, B), checked against the store size and its block grid; ``why`` ends
    the refusal of a misaligned region with the command's own reason."""
    if not images:
        return 0, n_images
    a, b = start_stop(images, n_images, expected="START:STOP", holder="the prompt table")
    if a % block_size or (b % block_size and b != n_images):
        raise InputError(f"--images {images}: not aligned to the store's {block_size}-image "
                         f"blocks; use multiples of {block_size} (or STOP={n_images}) {why}")
    return a, b


def library_versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers
    import xarray
    import zarr
    return {"actstore": actstore.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "zarr": zarr.__version__, "xarray": xarray.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


@dataclass
class _Run:
    """A materialize run once its store and variant exist: what is left to do, and how."""

    model: LoadedModel
    table: object
    gen: GenerationConfig
    plan: CapturePlan
    points: list
    provenance: dict
    block_size: int
    region: list[tuple[int, int]]
    work: list[tuple[int, int, tuple, bool]]    # (start, stop, kinds to write, fresh?)


def _open_run(model: str | LoadedModel, prompts: str, store: str,
              settings: MaterializeSettings, images: str | None) -> _Run:
    """Check the input, load the model, create or check the store and the variant, and
    plan the capture kinds of every block (:mod:`actstore.generation.capture_plan`)."""
    cap = settings.cap
    if settings.batch_size < 1:
        raise ActstoreError(f"--batch-size {settings.batch_size}: must be at least 1")
    if settings.block_size is not None and settings.block_size < 1:
        raise ActstoreError(f"--block-size {settings.block_size}: must be at least 1")
    if cap.store_dtype not in STORE_DTYPES:
        raise ActstoreError(f"store dtype {cap.store_dtype!r}: use one of {STORE_DTYPES}")
    codec_chain(cap.codec)  # fail on a bad codec name before any work
    if cap.kinds is not None:
        parse_kinds(cap.kinds)
    table = load_prompts(prompts)
    sha = prompts_fingerprint(table)
    check_store_location(store, table, settings.block_size, images, sha=sha)
    if isinstance(model, str):
        check_stored_settings(store, model, settings)   # before a minute of loading
        model = load_model(model, dtype=settings.dtype, device=settings.device)
    check_prompt_lengths(table, model.tokenizer)
    model = apply_control(model, settings.control)
    gen, f = settings.gen.resolved(model), model.vae_scale_factor
    gen.check_size(f)
    if cap.vae_source != VAE_SOURCES[0]:   # refused before the root is written
        plan_capture(store, model.variant, cap.kinds, cap.vae_source)
    root = st.create_or_check_root(store, table, sha, settings.block_size)
    start, stop = parse_region(images, len(table), root["block_size"])
    plan = plan_capture(store, model.variant, cap.kinds, cap.vae_source)
    points = capture_points(model, plan.kinds, latent_h=gen.height // f, latent_w=gen.width // f)
    base = [p for p in points if p.kind in plan.creation]
    provenance = {"model": model.name, "model_source": model.source,
                  "guidance": gen.guidance, "device": str(model.device),
                  "cpu_kernels": cpu_kernels(),
                  "library_versions": library_versions(),
                  "schema_version": actstore.SCHEMA_VERSION,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    st.check_or_create_model(store, model.variant,
                             fingerprint=model_fingerprint(model, gen, cap, base, plan),
                             provenance=provenance, layers=base, n_steps=gen.steps,
                             image_hw=(gen.height, gen.width),
                             step_coords=schedule_coords(model, gen), codec=cap.codec,
                             store_dtype=cap.store_dtype, keep_uncond=cap.keep_uncond)
    check_added(store, plan, cap, points)
    region = st.blocks_of(len(table), root["block_size"], start, stop)
    return _Run(model, table, gen, plan, points, provenance, root["block_size"], region,
                block_work(store, plan, region))


def materialize(model: str | LoadedModel, prompts: str, store: str,
                settings: MaterializeSettings = MaterializeSettings(), *,
                images: str | None = None, progress: bool = True,
                relay: Callable[[int, int, int], None] | None = None) -> dict:
    """Fill ``store`` (or its region ``images`` = "A:B") with ``model``'s activations for the
    prompt table; returns a summary. Capture kinds in ``settings.cap.kinds`` that stored
    blocks lack are added to them after the regeneration check."""
    run = _open_run(model, prompts, store, settings, images)
    cap, model = settings.cap, run.model
    bar = Progress(sum(b - a for a, b, *_ in run.work), run.gen.steps,
                   f"materialize {model.variant}", enabled=progress, relay=relay)
    t0 = time.perf_counter()
    exact = is_exact(st.model_attrs(store, model.variant), model.device)
    writer = st.BlockWriter(store, st.model_path(model.variant), on_written=bar.images)
    created, added = [], []       # what this run adds to stored blocks, undone on a mismatch
    stored = stored_table(store) if any(not w[3] for w in run.work) else None
    try:
        for a, b, kinds, fresh in run.work:  # stored blocks regenerate from the store's rows
            recorded = None if fresh else recorded_batch_size(store, model.variant, a, b)
            batch = recorded or settings.batch_size   # stored blocks: with their batch size
            block = capture_block(model, (run.table if fresh else stored).iloc[a:b], run.gen,
                                  [p for p in run.points if p.kind in kinds],
                                  batch_size=batch, store_dtype=cap.store_dtype,
                                  keep_uncond=cap.keep_uncond, x0=cap.x0 and fresh,
                                  vae_source=cap.vae_source, bar=bar)
            if not fresh:       # before anything of this block (or this kind) is written
                try:
                    check_regenerated(store, model.variant, a, ids=block.ids, final=block.final,
                                      exact=exact, batch_recorded=recorded is not None)
                except ActstoreError:
                    writer.close()
                    undo_added(store, run.plan, created, run.points, added)
                    raise
                added.append((a, b, kinds))
            created += ensure_added(store, run.plan, kinds, cap=cap, points=run.points,
                                    provenance=run.provenance,
                                    n_steps=run.gen.steps)
            arrays = st.block_arrays(block.activations, block.final if fresh else None,
                                     block.uncond)
            writer.submit(a, b, arrays, {"images": block.ids, "written": time.time(),
                                         "batch_size": batch},
                          prepare=block.finish,
                          records=run.plan.records(kinds) + (("",) if fresh else ()))
    finally:
        written = writer.close()
        bar.close()
    fresh = [w for w in run.work if w[3]]
    return {"store": store, "model": model.variant, "kinds": list(run.plan.kinds),
            "blocks_written": len(fresh), "blocks_added_to": len(run.work) - len(fresh),
            "blocks_skipped": len(run.region) - len(run.work),
            "images": sum(b - a for a, b, *_ in run.work),
            "regenerated_and_checked": sum(b - a for a, b, _, f in run.work if not f),
            "bytes": written, "seconds": time.perf_counter() - t0}


def prepare(model: str | LoadedModel, prompts: str, store: str,
            settings: MaterializeSettings = MaterializeSettings(), *,
            images: str | None = None) -> dict:
    """Create (or check) the store and the variant once, before workers fan out over its
    blocks, and say which blocks are still missing: workers then never race to create the
    same metadata, and a rerun of a complete store schedules nothing."""
    run = _open_run(model, prompts, store, settings, images)
    return {"store": store, "model": run.model.variant, "n_images": len(run.table),
            "block_size": run.block_size, "blocks": len(run.region),
            "pending": [[a, b] for a, b, *_ in run.work]}


def completion(store: str) -> dict[str, dict]:
    """Images whose block is recorded complete, per variant, and ``adding``: each capture
    kind being added, with its (blocks done, blocks to do), when there is one: is the store
    finished? A run of ``--capture ...,resnet --images 0:4`` said 'complete' while resnet
    was unreadable for want of the other blocks (before 2026-12-07)."""
    from actstore.store.view import StoreView

    n = st.read_root_attrs(store)["n_images"]
    out = {}
    for variant in st.model_variants(store):
        view = StoreView(store, model=variant, complete_only=False)
        out[variant] = {"complete": int(view.complete.sum()), "images": n}
        if view.pending:
            out[variant]["adding"] = {k: list(v) for k, v in sorted(view.pending.items())}
    return out


def format_completion(store: str, counts: dict[str, dict]) -> str:
    """One line a person reads at the end of a run."""
    parts = [f"{v} {c['complete']}/{c['images']} images" +
             "".join(f", adding {k} {d}/{t} blocks" for k, (d, t) in c.get("adding", {}).items())
             for v, c in counts.items()]
    done = counts and all(c["complete"] == c["images"] and not c.get("adding")
                          for c in counts.values())
    state = "complete" if done else "INCOMPLETE"
    return f"store {store}: {state} ({', '.join(parts) or 'no model variant yet'})"


def check_store_location(store: str | None, table: pd.DataFrame, block_size: int | None,
                         images: str | None, *, sha: str | None = None) -> None:
    """Cheap checks before the model loads, so bad input fails in a second, not a minute:
    the prompt table and ``--block-size`` against the store's, ``--images`` against its
    blocks. The command makes them too, before a cluster starts: found by the worker that
    plans, a misaligned ``--images`` named that worker as if it had failed. ``store``
    None: the table and the region's bounds only. ``sha``: the table's fingerprint if the
    caller has it (one pass over a table of 100,000 prompts takes ~0.8 s)."""
    attrs = None if store is None else st.existing_root(store)
    if attrs is not None:
        sha = sha or prompts_fingerprint(table)
        if attrs["prompts_sha256"] != sha or block_size not in (None, attrs["block_size"]):
            st.create_or_check_root(store, table, sha, block_size)  # raises the specific error
        parse_region(images, len(table), attrs["block_size"])
    else:
        parse_region(images, len(table), 1 if store is None else
                     block_size or st.DEFAULT_BLOCK_SIZE)
