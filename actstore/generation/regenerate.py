"""The regeneration check: does this machine reproduce a store's images and activations?

Every image of a store is a pure function of its prompt, seed, the model's weights and the
generation settings (each image draws its noise from its own CPU generator), so a store can
be re-derived, and must be before anything is added to it: adding a capture kind to stored
blocks regenerates them, and activations from a generation that differs from the stored one
would sit beside images they do not belong to.

Equality: **bitwise** when the store was made on CPU by the same CPU kernels as this run's
(:func:`cpu_kernels`, recorded in the variant's attributes). torch picks its CPU kernels by
instruction set, and kernels of different instruction sets round differently; CUDA kernels
are not bitwise deterministic at all. So when either side ran on CUDA, the store was made
with other CPU kernels, or it does not record them (the ``cpu_kernels`` attribute, recorded
since 2026-12-05), final and x0 images may differ by at most :data:`LOOSE_IMAGE_LEVELS`
uint8 levels per pixel, and each image's activations by at most
:data:`LOOSE_ACTIVATION_RTOL` of that image's largest stored magnitude.
"""

from __future__ import annotations

import functools
import platform
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from actstore.errors import ActstoreError
from actstore.store import commit
from actstore.store import core as st
from actstore.store import io
from actstore.store.layout import image_column, layer_path

if TYPE_CHECKING:
    import torch

LOOSE_IMAGE_LEVELS = 2
DEFAULT_BATCH_SIZE = 4   # MaterializeSettings' default too
LOOSE_ACTIVATION_RTOL = 1e-2
# CPU features that change which kernels torch, oneDNN and MKL run (and so their rounding).
_KERNEL_FLAGS = ("avx", "amx", "fma", "f16c", "sse4", "asimd", "sve", "neon")


@functools.cache
def cpu_kernels() -> str:
    """This process's CPU kernel family: torch's dispatch level, the architecture and a
    digest of the vector extensions its BLAS libraries dispatch on. Equal on two machines,
    a CPU generation is bitwise reproducible between them. Read once per process: the CPU does not change under it."""
    import hashlib

    import torch

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
        flags = " ".join(sorted(x for x in line.split(":", 1)[-1].split()
                                if x.startswith(_KERNEL_FLAGS)))
    except OSError:  # not Linux: the processor string stands in for the flags
        flags = platform.processor()
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"{torch.backends.cpu.get_cpu_capability()}/{platform.machine()}/{digest}"


def is_exact(store_attrs: dict, device: str | torch.device) -> bool:
    """Bitwise comparison only when the store and this run are on CPU with the same CPU
    kernels; stores that do not record theirs are compared loosely (they may come from
    another machine)."""
    cpu = str(store_attrs.get("device") or "cpu").startswith("cpu") and \
        str(device).startswith("cpu")
    return cpu and store_attrs.get("cpu_kernels") == cpu_kernels()


def image_errors(stored: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Per image: the largest |difference| in uint8 levels."""
    diff = np.abs(stored.astype(np.int16) - new.astype(np.int16))
    return diff.reshape(len(diff), -1).max(axis=1)


def images_match(errors: np.ndarray, exact: bool) -> np.ndarray:
    return errors <= (0 if exact else LOOSE_IMAGE_LEVELS)


def activations_match(stored: np.ndarray, new: np.ndarray, exact: bool) -> tuple[np.ndarray,
                                                                                 np.ndarray]:
    """Per image (first axis): reproduced?, largest |difference|."""
    a, b = stored.astype(np.float32), new.astype(np.float32)
    err = np.abs(a - b).reshape(len(a), -1).max(axis=1)
    if exact:
        same = np.array([np.array_equal(stored[i], new[i]) for i in range(len(a))])
    else:
        same = err <= LOOSE_ACTIVATION_RTOL * np.abs(a).reshape(len(a), -1).max(axis=1)
    return same, err


def recorded_batch_size(store: str, variant: str, start: int, stop: int) -> int | None:
    """The number of images per UNet call a stored block was generated with, from its
    completion record (recorded since 2026-12-05; None before). The float arithmetic of a
    batch depends on its size (tiny-random on CPU: batches of 2 and 4 give activations and
    x0 images a few float16 steps apart), so only the same batch size regenerates a block
    bit for bit."""
    return commit.block_record(store, st.model_path(variant), start, stop).get("batch_size")


def stored_table(store: str) -> pd.DataFrame:
    """The store's own image table (image_id, prompt, seed): what regeneration uses."""
    return pd.DataFrame({k: [v.item() if hasattr(v, "item") else v
                             for v in io.open_array(store, image_column(k))[:]]
                         for k in ("image_id", "prompt", "seed")})


def stored_final_images(store: str, variant: str, start: int, stop: int) -> np.ndarray:
    return np.asarray(st.model_array(store, variant, "final_image")[start:stop])


def check_regenerated(store: str, variant: str, start: int, *, ids: list[str],
                      final: np.ndarray, exact: bool, batch_recorded: bool = True) -> None:
    """Raise (one line) unless regenerated ``final`` images equal the stored ones; a block
    that records no batch size was regenerated with a guessed one, which the line names."""
    errors = image_errors(stored_final_images(store, variant, start, start + len(ids)), final)
    bad = np.flatnonzero(~images_match(errors, exact))
    if len(bad):
        i = int(bad[0])
        rule = ("bitwise (same CPU kernels)" if exact else
                f"within {LOOSE_IMAGE_LEVELS} levels (CUDA or other CPU kernels)")
        raise ActstoreError(
            f"regeneration check: image {ids[i]!r} (store position {start + i}) of model "
            f"'{variant}' regenerates differently from its stored final image (max "
            f"|diff| {int(errors[i])}/255, must match {rule}; {len(bad)} of {len(ids)} in its "
            "block); the model, seeds, settings or library versions differ from the store's"
            + ("" if batch_recorded else ", or its batch size: the block records none (made "
               "before 2026-12-05), so pass the --batch-size it was made with (the main "
               "job's is 8)") + ", so nothing is added")


def verify(store: str, *, model: str | None = None, images: str | None = None,
           variants: list[str] | None = None, device: str = "auto",
           batch_size: int | None = None, progress: bool = True) -> dict:
    """Regenerate stored images and report, per image, whether its final image, x0 images
    and every readable activation are reproduced. Writes nothing.

    ``model``: the model to regenerate with (default: the folder recorded in the store);
    its weights must be the store's. ``images``: a block-aligned region ``A:B``.
    ``batch_size``: images per UNet call (default: each block's recorded one, else
    :data:`DEFAULT_BATCH_SIZE`); another than the block's may not be bitwise
    (CPU-dependent)."""
    from actstore.generation.capture import capture_block
    from actstore.generation.materialize import parse_region
    from actstore.generation.models import apply_control, load_model
    from actstore.generation.sampling import GenerationConfig
    from actstore.progress import Progress
    from actstore.store.view import StoreView

    root = st.read_root_attrs(store)
    have = st.model_variants(store)
    variants = variants or have
    st.check_variants(store, variants, have, "drop it from --models")
    start, stop = parse_region(images, root["n_images"], root["block_size"],
                               why="as verify regenerates whole stored blocks")
    table = stored_table(store)
    rows, loaded, unrecorded, overridden = [], {}, 0, set()
    # a control permutes the loaded model in place: the trained variant first, and a
    # permuted model is never reused for another variant
    for variant in sorted(variants, key=lambda v: v != "trained"):
        view = StoreView(store, variant, complete_only=False)
        attrs = view.attrs
        fp = attrs["fingerprint"]
        ref = model or attrs.get("model_source") or attrs["model"]
        key = (ref, fp["dtype"])
        if key not in loaded:
            loaded[key] = load_model(ref, dtype=fp["dtype"], device=device)
        m = loaded[key] if variant == "trained" else apply_control(loaded.pop(key), variant)
        if m.weights_hash != fp["weights_sha256"]:
            raise ActstoreError(f"verify: model {ref!r} is not the one store {store} was made "
                                f"with (weights sha256 {m.weights_hash[:12]}... vs "
                                f"{fp['weights_sha256'][:12]}...); pass --model with the "
                                "store's model")
        gen = GenerationConfig(**fp["generation"])
        cap = fp["capture"]
        exact = is_exact(attrs, m.device)
        done = st.completed_blocks(store, variant)
        blocks = [blk for blk in st.blocks_of(root["n_images"], root["block_size"], start, stop)
                  if blk in done]
        points = list(view.points.values())
        bar = Progress(sum(b - a for a, b in blocks), gen.steps, f"verify {variant}",
                       enabled=progress)
        for a, b in blocks:
            recorded = recorded_batch_size(store, variant, a, b)
            if batch_size and recorded and recorded != batch_size:
                overridden.add(recorded)     # a mismatch is then the option's, not the store's
            batch = batch_size or recorded
            unrecorded += batch is None
            batch = batch or DEFAULT_BATCH_SIZE
            block = capture_block(m, table.iloc[a:b], gen, points, batch_size=batch,
                                  store_dtype=cap["store_dtype"], x0=cap.get("x0", True),
                                  vae_source=_vae_source(view), bar=bar)
            extra = block.finish()
            rows += _compare_block(store, variant, a, b, block, extra, exact)
        bar.close()
    if not rows:        # '0/0 images reproduced', exit 0, would read as a pass
        where = f" in --images {images}" if images else ""
        raise ActstoreError(f"store {store}: no stored image blocks{where} of "
                            f"{', '.join(variants) or 'any complete model'} to verify; "
                            "`actstore materialize` them first")
    bad = [r for r in rows if not r["reproduced"]]
    return {"store": store, "images": len(rows), "reproduced": len(rows) - len(bad),
            "not_reproduced": [f"{r['model']}:{r['image']}" for r in bad],
            "comparison": "bitwise" if all(r["exact"] for r in rows) else "tolerance (CUDA or other CPU kernels)",
            "blocks_without_batch_size": unrecorded,
            "recorded_batch_sizes_overridden": sorted(overridden),
            "counted": counted(rows), "rows": rows, "table": format_verify(rows)}


def _vae_source(view) -> str:
    """The vae kind's source: the creation fingerprint's, or its added group's."""
    from actstore.store.captures import added_captures

    fp = view.attrs["fingerprint"]
    added = added_captures(view.uri, view.model).get("vae", {}).get("fingerprint", {})
    return fp["capture"].get("vae_source") or added.get("vae_source") or "latent"


def _compare_block(store: str, variant: str, a: int, b: int, block, extra: dict,
                   exact: bool) -> list[dict]:
    final_err = image_errors(stored_final_images(store, variant, a, b), block.final)
    final_ok = images_match(final_err, exact)
    x0_ok = None
    if "x0_image" in extra:
        x0_ok = images_match(image_errors(
            np.asarray(st.model_array(store, variant, "x0_image")[a:b]), extra["x0_image"]),
            exact)
    act_ok = np.ones(b - a, bool)
    act_err = np.zeros(b - a)
    wrong: list[list[str]] = [[] for _ in range(b - a)]
    for name, new in block.activations.items():
        stored = np.asarray(io.open_array(store, layer_path(variant, name))[a:b])
        same, err = activations_match(stored, new, exact)
        act_ok &= same
        act_err = np.maximum(act_err, err)
        for i in np.flatnonzero(~same):
            wrong[i].append(name)
    out = []
    for i, image in enumerate(block.ids):
        ok = bool(final_ok[i] and act_ok[i] and (x0_ok is None or x0_ok[i]))
        out.append({"model": variant, "image": image, "position": a + i, "reproduced": ok,
                    "final_image": bool(final_ok[i]), "final_max_diff": int(final_err[i]),
                    "x0_image": None if x0_ok is None else bool(x0_ok[i]),
                    "activations": bool(act_ok[i]), "activation_max_diff": float(act_err[i]),
                    "arrays_checked": len(block.activations), "not_reproduced": wrong[i][:5],
                    "exact": exact})
    return out


def format_verify(rows: list[dict]) -> str:
    head = (f"{'model':10s} {'image':14s} {'final':>6s} {'x0':>6s} {'activations':>11s} "
            f"{'max |diff| img/act':>20s}")
    lines = [head, "-" * len(head)]
    mark = {True: "ok", False: "DIFF", None: "-"}
    for r in rows:
        lines.append(f"{r['model']:10s} {r['image']:14s} {mark[r['final_image']]:>6s} "
                     f"{mark[r['x0_image']]:>6s} {mark[r['activations']]:>11s} "
                     f"{r['final_max_diff']:>9d} / {r['activation_max_diff']:<8.3g}")
    lines.append(f"{counted(rows)} reproduced")
    return "\n".join(lines)


def counted(rows: list[dict]) -> str:
    """What was counted, per model variant ('4/4 images of trained, 4/4 of randomized'): a
    row is one image of one variant, and '8/8 images reproduced' for 4 images of 2 variants
    read as 8 images."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    parts = []
    for m in models:
        mine = [r["reproduced"] for r in rows if r["model"] == m]
        parts.append(f"{sum(mine)}/{len(mine)}{' images' if not parts else ''} of {m}")
    return ", ".join(parts)
