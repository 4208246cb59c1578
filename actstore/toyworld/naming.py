"""When is the object named? The toy reader on every denoising step's decoded x0 image.

The follow-up to the paper found that probes read scene structure from the activations by
step 3 of 15, while a classifier run on the decoded intermediate images names the object
only around step 11-12. Here the toy reader (trained on renders) plays the classifier: at
each step it reads the x0 prediction decoded from that step's latent, and its agreement
with the prompt per step is drawn beside the probes' emergence curves.
"""

from __future__ import annotations

import numpy as np

from actstore.store.view import open_store
from actstore.toyworld.reader import ToyReader, agreement, attributes

QUESTIONS = ("light", "count", "named_objects_found", "object_set")


def reader_per_step(store: str, reader: ToyReader | str, *, model: str = "trained",
                    split: str = "test", batch: int = 64) -> dict:
    """Reader agreement with the prompt at every step (x0 images) and on the final images,
    over the ``split`` images (all images if the table has no such split)."""
    view = open_store(store, model)
    if isinstance(reader, str):
        reader = ToyReader.from_pretrained(reader)
    table = view.images
    rows = np.flatnonzero(table["split"].values == split)
    rows = rows if rows.size else np.arange(table.sizes["image"])
    prompts = [str(p) for p in table["prompt"].values[rows]]
    truth = attributes(prompts)
    x0 = view.x0_images.isel(image=rows)
    per_step = {q: [] for q in QUESTIONS}
    for s in range(view.n_steps):
        images = x0.isel(step=s).values
        got = agreement(_read(reader, images, batch), truth)
        for q in QUESTIONS:
            per_step[q].append(got[q])
    final = agreement(_read(reader, view.final_images.isel(image=rows).values, batch), truth)
    return {"model": model, "split": split, "n": int(len(rows)),
            "steps": list(range(view.n_steps)), "per_step": per_step,
            "final": {q: final[q] for q in QUESTIONS}}


def _read(reader: ToyReader, images: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    parts = [reader(images[i:i + batch]) for i in range(0, len(images), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def naming_step(per_step: list[float], final: float, frac: float = 0.9) -> int | None:
    """First step whose agreement reaches ``frac`` of the final image's (as emergence)."""
    for s, v in enumerate(per_step):
        if final > 0 and v >= frac * final:
            return s
    return None


def format_naming(naming: dict) -> str:
    """Reader agreement per step on x0 images: when the picture shows what was asked."""
    steps = naming["steps"]
    lines = [f"toy reader on each step's x0 image ({naming['n']} {naming['split']} images)",
             f"{'question':20s} " + " ".join(f"{s:>4d}" for s in steps) + "  final"]
    for q, values in naming["per_step"].items():
        lines.append(f"{q:20s} " + " ".join(f"{v:4.2f}" for v in values)
                     + f"  {naming['final'][q]:4.2f}")
    return "\n".join(lines)
