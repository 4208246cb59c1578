"""Materialize: generate images and write every self-attention activation into the store.

Pure library code; ``flows/materialize.py`` wraps it for Prefect and the CLI calls that.
Idempotent and resumable by construction: the work is a list of image blocks, a block's
completion record is written after its arrays, and a rerun skips recorded blocks. Because
every image's noise comes from its own seed, a block rewritten after a crash holds exactly
the bytes an uninterrupted run would have written.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch

import actstore
from actstore.store import core as st
from actstore.generation.capture import StepCapture, attn1_hooks, capture_points
from actstore.store.codecs import DEFAULT_CODEC, codec_chain
from actstore.errors import ActstoreError
from actstore.generation.sampling import GenerationConfig, decode_images, generate, schedule_coords
from actstore.generation.models import LoadedModel, apply_control, load_model
from actstore.progress import Progress
from actstore.generation.prompts import load_prompts, prompts_fingerprint

STORE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class CaptureConfig:
    """What is captured and how it is stored: part of a store's fingerprint."""

    store_dtype: str = "float16"
    codec: str = DEFAULT_CODEC
    keep_uncond: bool = False
    x0: bool = True


@dataclass(frozen=True)
class MaterializeSettings:
    """Everything a materialize run is told besides model, prompts and store, passed whole
    from the command line through the flow to the library (every default lives here or in
    the two configs it holds). ``gen`` and ``cap`` change the stored arrays and are part of
    the store's fingerprint; the rest only changes how fast they are made."""

    gen: GenerationConfig = field(default_factory=GenerationConfig)
    cap: CaptureConfig = field(default_factory=CaptureConfig)
    batch_size: int = 4
    dtype: str = "float32"
    device: str = "auto"
    control: str | None = None
    block_size: int | None = None  # None: the store's, or DEFAULT_BLOCK_SIZE for a new one

    def with_options(self, **options) -> "MaterializeSettings":
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


def parse_region(images: str | None, n_images: int, block_size: int) -> tuple[int, int]:
    """``"A:B"`` → (A, B), checked against the store size and its block grid."""
    if not images:
        return 0, n_images
    try:
        a_text, b_text = images.split(":")
        a = int(a_text) if a_text else 0
        b = int(b_text) if b_text else n_images
    except ValueError:
        raise ActstoreError(f"--images {images!r}: expected START:STOP, e.g. 0:{n_images}") from None
    if not 0 <= a < b <= n_images:
        raise ActstoreError(f"--images {images}: out of range; the prompt table has "
                            f"{n_images} images, so use START:STOP with 0 <= START < STOP <= "
                            f"{n_images}")
    if a % block_size or (b % block_size and b != n_images):
        raise ActstoreError(f"--images {images}: not aligned to the store's {block_size}-image "
                            f"blocks; use multiples of {block_size} (or STOP={n_images}) so "
                            "workers never share a block")
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


def model_fingerprint(model: LoadedModel, gen: GenerationConfig, cap: CaptureConfig,
                      layers: list) -> dict:
    """Everything that changes what a variant's arrays hold; a store refuses a mismatch."""
    return {"weights_sha256": model.weights_hash, "variant": model.variant,
            "dtype": str(model.dtype).replace("torch.", ""),
            "generation": asdict(gen), "scheduler_config": _jsonable(model.scheduler_config),
            "capture": asdict(cap), "layers": [info.name for info in layers],
            "layer_shapes": {i.name: [i.height, i.width, i.channels] for i in layers}}


def _jsonable(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@dataclass
class _Run:
    """A materialize run once its store and variant exist: what is left to do, and how."""

    model: LoadedModel
    table: object
    gen: GenerationConfig
    layers: list
    block_size: int
    region: list[tuple[int, int]]
    todo: list[tuple[int, int]]


def _open_run(model: str | LoadedModel, prompts: str, store: str,
              settings: MaterializeSettings, images: str | None) -> _Run:
    """Check the input, load the model, create or check the store and the variant."""
    cap = settings.cap
    if settings.batch_size < 1:
        raise ActstoreError(f"--batch-size {settings.batch_size}: must be at least 1")
    if cap.store_dtype not in STORE_DTYPES:
        raise ActstoreError(f"store dtype {cap.store_dtype!r}: use one of {STORE_DTYPES}")
    codec_chain(cap.codec)  # fail on a bad codec name before any work
    table = load_prompts(prompts)
    sha = prompts_fingerprint(table)
    _check_store_location(store, table, sha, settings.block_size, images)
    if isinstance(model, str):
        model = load_model(model, dtype=settings.dtype, device=settings.device)
    model = apply_control(model, settings.control)
    gen = settings.gen.resolved(model)
    f = model.vae_scale_factor
    if gen.height % (8 * f) or gen.width % (8 * f):
        raise ActstoreError(f"--height/--width {gen.height}x{gen.width}: must be multiples of "
                            f"{8 * f} for this model")
    layers = capture_points(model, ("attn1",), latent_h=gen.height // f,
                            latent_w=gen.width // f)
    root = st.create_or_check_root(store, table, sha, settings.block_size)
    start, stop = parse_region(images, len(table), root["block_size"])
    fingerprint = model_fingerprint(model, gen, cap, layers)
    provenance = {"model": model.name, "model_source": model.source,
                  "guidance": gen.guidance, "library_versions": library_versions(),
                  "schema_version": actstore.SCHEMA_VERSION,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    st.check_or_create_model(store, model.variant, fingerprint, provenance, layers, gen.steps,
                             (gen.height, gen.width), schedule_coords(model, gen), cap.codec,
                             cap.store_dtype, cap.keep_uncond)
    done = st.completed_blocks(store, model.variant)
    region = st.blocks_of(len(table), root["block_size"], start, stop)
    return _Run(model, table, gen, layers, root["block_size"], region,
                [blk for blk in region if blk not in done])


def materialize(model: str | LoadedModel, prompts: str, store: str,
                settings: MaterializeSettings = MaterializeSettings(), *,
                images: str | None = None, progress: bool = True) -> dict:
    """Fill ``store`` (or its region ``images`` = "A:B") with ``model``'s activations for the
    prompt table; returns a summary."""
    run = _open_run(model, prompts, store, settings, images)
    bar = Progress(sum(b - a for a, b in run.todo), run.gen.steps,
                   f"materialize {run.model.variant}", enabled=progress)
    t0 = time.perf_counter()
    writer = st.BlockWriter(store, st.model_path(run.model.variant), on_written=bar.images)
    try:
        for a, b in run.todo:
            arrays, ids, finish = _materialize_block(run.model, run.table.iloc[a:b], run.gen,
                                                     settings.cap, run.layers,
                                                     settings.batch_size, bar)
            writer.submit(a, b, arrays, {"images": ids, "written": time.time()}, finish)
    finally:
        written = writer.close()
        bar.close()
    return {"store": store, "model": run.model.variant, "blocks_written": len(run.todo),
            "blocks_skipped": len(run.region) - len(run.todo),
            "images": sum(b - a for a, b in run.todo), "bytes": written,
            "seconds": time.perf_counter() - t0}


def prepare(model: str | LoadedModel, prompts: str, store: str,
            settings: MaterializeSettings = MaterializeSettings(), *,
            images: str | None = None) -> dict:
    """Create (or check) the store and the variant once, before workers fan out over its
    blocks, and say which blocks are still missing: workers then never race to create the
    same metadata, and a rerun of a complete store schedules nothing."""
    run = _open_run(model, prompts, store, settings, images)
    return {"store": store, "model": run.model.variant, "n_images": len(run.table),
            "block_size": run.block_size, "blocks": len(run.region),
            "pending": [list(blk) for blk in run.todo]}


def completion(store: str) -> dict[str, dict[str, int]]:
    """Images whose block is recorded complete, per variant: is the store finished?"""
    n = st.read_root_attrs(store)["n_images"]
    return {variant: {"complete": sum(b - a for a, b in st.completed_blocks(store, variant)),
                      "images": n}
            for variant in st.model_variants(store)}


def format_completion(store: str, counts: dict[str, dict[str, int]]) -> str:
    """One line a person reads at the end of a run."""
    parts = [f"{v} {c['complete']}/{c['images']} images" for v, c in counts.items()]
    done = counts and all(c["complete"] == c["images"] for c in counts.values())
    state = "complete" if done else "INCOMPLETE"
    return f"store {store}: {state} ({', '.join(parts) or 'no model variant yet'})"


def _check_store_location(store: str, table, sha: str, block_size: int | None,
                          images: str | None) -> None:
    """Cheap checks before the model loads, so bad input fails in a second, not a minute."""
    attrs = st.existing_root(store)
    if attrs is not None:
        if attrs["prompts_sha256"] != sha:
            st.create_or_check_root(store, table, sha, block_size)  # raises the specific error
        parse_region(images, len(table), attrs["block_size"])
    else:
        parse_region(images, len(table), block_size or st.DEFAULT_BLOCK_SIZE)


def _materialize_block(model: LoadedModel, rows, gen: GenerationConfig, cap: CaptureConfig,
                       layers: list, batch_size: int, bar: Progress):
    """Generate one block in batches, held on the host until the writer takes it.

    Returns the block's arrays (store path → rows), its image ids, and ``finish``: the
    finiteness check and the decoding of every step's x0, which the writer runs while the
    next block generates (on a second core, or queued behind the UNet on a GPU).
    """
    n = len(rows)
    ids = rows["image_id"].astype(str).tolist()
    capture = StepCapture(layers, n, gen.steps, ids, np.dtype(cap.store_dtype), cap.keep_uncond)
    f = model.vae_scale_factor
    x0_latents = (torch.empty((n, gen.steps, model.unet.config.in_channels, gen.height // f,
                               gen.width // f)) if cap.x0 else None)
    final = np.empty((n, gen.height, gen.width, 3), np.uint8)
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        capture.set_batch(lo, ids[lo:hi])

        def on_start(i: int) -> None:
            capture.step = i

        def on_end(i: int, _latents, x0_step) -> None:
            if x0_latents is not None:
                x0_latents[lo:hi, i] = x0_step.to("cpu", torch.float32)
            bar.step(hi - lo)

        with attn1_hooks(model.unet, [info.name for info in layers], capture):
            final[lo:hi] = generate(model, rows["prompt"].iloc[lo:hi].tolist(),
                                    rows["seed"].iloc[lo:hi].tolist(), gen, on_start, on_end)
    acts = {name: buf[0] for name, buf in capture.buffers.items()}
    uncond = {name: buf[1] for name, buf in capture.buffers.items()} if cap.keep_uncond else None

    def finish() -> dict[str, np.ndarray]:
        capture.check_finite()
        if x0_latents is None:
            return {}
        flat = x0_latents.reshape(n * gen.steps, *x0_latents.shape[2:])
        images = np.concatenate([decode_images(model, flat[k:k + batch_size].to(model.device))
                                 for k in range(0, len(flat), batch_size)])
        return {"x0_image": images.reshape(n, gen.steps, *images.shape[1:])}

    return st.block_arrays(acts, final, uncond), ids, finish
