"""Sample grids and sample-quality measures for the toy LDM.

The grid puts each generated image under the render of the same prompt (same seed), so
a reader can judge at a glance whether ground, objects, colours and lighting were
learned; the quality measures use the toy label model on generated images, the same way
the probing pipeline will label them.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.stats import spearmanr

from actstore.errors import ActstoreError
from actstore.runtime import configure_cpu_threads
from actstore.toyworld.model import load_pipeline
from actstore.toyworld.render import render_scene

if TYPE_CHECKING:
    from diffusers import SchedulerMixin, StableDiffusionPipeline


def read_prompts(prompts_csv: str | Path) -> list[dict]:
    with open(prompts_csv, newline="") as f:
        return [dict(r, seed=int(r["seed"])) for r in csv.DictReader(f)]


# Samplers a grid row can use. The main job (and the paper) use LMS; the stochastic ones
# are here because, measured on this model, they leave less clutter at the same weights.
# DDPM must not clip x0 to [-1, 1] (its default): these latents have std 1, not range 1.
SAMPLERS = {
    "lms": ("LMSDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
}


@dataclass(frozen=True)
class Sampling:
    """How one row of samples is generated: ``SAMPLER:STEPS:GUIDANCE`` on the command line."""

    sampler: str = "lms"
    steps: int = 15
    # toy-ldm's catalog guidance (a test keeps the two equal); at SD's 7.5 it adds blobs
    guidance: float = 3.0

    @classmethod
    def parse(cls, text: str) -> "Sampling":
        parts = text.split(":")
        try:
            name, steps, guidance = parts
            spec = cls(name, int(steps), float(guidance))
        except ValueError:
            raise ActstoreError(f"sampling {text!r}: expected SAMPLER:STEPS:GUIDANCE, "
                                f"e.g. lms:15:3") from None
        if spec.sampler not in SAMPLERS:
            raise ActstoreError(f"sampling {text!r}: sampler {spec.sampler!r} is not known; "
                                f"choose one of {', '.join(SAMPLERS)}")
        if spec.steps < 1:
            raise ActstoreError(f"sampling {text!r}: steps must be >= 1")
        return spec

    def __str__(self) -> str:
        return f"{self.sampler}:{self.steps}:{self.guidance:g}"

    def scheduler(self, model_dir: str | Path) -> SchedulerMixin:
        """A fresh scheduler of this kind with the model's own betas and timestep spacing."""
        import diffusers

        cls_name, overrides = SAMPLERS[self.sampler]
        cls = getattr(diffusers, cls_name)
        return cls.from_config(cls.load_config(str(model_dir), subfolder="scheduler"), **overrides)


def generate(model_dir: str | Path, prompts: list[str], seeds: list[int], *,
             sampling: Sampling = Sampling(), batch: int = 16,
             pipe: StableDiffusionPipeline | None = None) -> np.ndarray:
    """uint8 (N,H,W,3) images; each from its own ``torch.Generator().manual_seed(seed)``,
    so an image does not depend on the batch it was generated in (ancestral samplers too:
    diffusers draws their per-step noise from the same per-image generators)."""
    pipe = pipe or load_pipeline(model_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = sampling.scheduler(model_dir)
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch]]
        res = pipe(prompts[i:i + batch], num_inference_steps=sampling.steps,
                   guidance_scale=sampling.guidance, generator=gens, output_type="np")
        out.append(np.clip(np.round(res.images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def _grid(rows: list[np.ndarray], scale: int = 3, pad: int = 2) -> np.ndarray:
    n, h, w, _ = rows[0].shape
    hh, ww = h * scale + pad, w * scale + pad
    canvas = np.full((len(rows) * hh + pad, n * ww + pad, 3), 255, np.uint8)
    for r, imgs in enumerate(rows):
        for c in range(n):
            big = imgs[c].repeat(scale, 0).repeat(scale, 1)
            canvas[pad + r * hh: pad + r * hh + h * scale, pad + c * ww: pad + c * ww + w * scale] = big
    return canvas


def sample_grid(model_dir: str | Path, prompts_csv: str | Path, out_png: str | Path, *,
                n: int = 8, samplings: Sequence[Sampling] = (Sampling(),), rows: int = 1,
                pipe: StableDiffusionPipeline | None = None) -> dict:
    """PNG with ``rows`` groups of rows: renders on top, then the generated images of the
    same prompts and seeds, one row per sampling."""
    recs = read_prompts(prompts_csv)[: n * rows]
    pipe = pipe or load_pipeline(model_dir)
    gens = [generate(model_dir, [r["prompt"] for r in recs], [r["seed"] for r in recs],
                     sampling=sp, pipe=pipe) for sp in samplings]
    return write_grid(out_png, recs, gens, samplings=samplings, n=n, rows=rows,
                      model_dir=model_dir)


def write_grid(out_png: str | Path, recs: list[dict], gens: list[np.ndarray],
               *, samplings: list[Sampling], n: int, rows: int, model_dir: str | Path) -> dict:
    """Draw already generated images (``gens[i]`` with ``samplings[i]``, at least
    ``n * rows`` each, in ``recs`` order) under the renders of the same seeds."""
    from PIL import Image

    recs = recs[: n * rows]
    prompts, seeds = [r["prompt"] for r in recs], [r["seed"] for r in recs]
    size = gens[0].shape[1]
    ren = np.stack([render_scene(s, size=size).rgb for s in seeds])
    strips = []
    for k in range(rows):
        strips += [imgs[k * n:(k + 1) * n] for imgs in (ren, *gens)]
    Image.fromarray(_grid(strips)).save(out_png)
    Path(out_png).with_suffix(".json").write_text(json.dumps(
        {"model": str(model_dir), "samplings": [str(sp) for sp in samplings],
         "layout": "groups of rows: render, then generated with each sampling in order",
         "prompts": prompts, "seeds": seeds}, indent=1))
    return {"png": str(out_png), "prompts": prompts, "seeds": seeds}


def quality(images: np.ndarray, labeler: Callable[[np.ndarray], dict[str, np.ndarray]],
            min_pixels: int = 8,
            reader: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
            prompts: list[str] | None = None) -> dict:
    """Fraction with a salient object (>= min_pixels) and with depth increasing downward
    (per-image Spearman between predicted inverse depth and row index >= 0.5); with a
    ``reader``, also how often the picture shows what its prompt says (light side, object
    count, (colour, shape) set: see :mod:`actstore.toyworld.reader`)."""
    extra = {}
    if reader is not None:
        from actstore.toyworld.reader import agreement, attributes

        extra = {"prompt_agreement": agreement(reader(images), attributes(prompts))}
    lab = labeler(images)
    n, h, w = lab["depth"].shape
    has_obj = lab["salient"].reshape(n, -1).sum(1) >= min_pixels
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w)).ravel()
    rho = np.array([spearmanr(lab["depth"][i].ravel(), rows)[0] for i in range(n)])
    return {"n": int(n), "frac_salient": float(has_obj.mean()),
            "frac_depth_row_spearman_ge_0.5": float((rho >= 0.5).mean()),
            "median_depth_row_spearman": float(np.median(rho)), **extra}


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    p = argparse.ArgumentParser(description="Sample grid + quality of the toy LDM.")
    p.add_argument("--model", default="models/toy-ldm")
    p.add_argument("--prompts", default="prompts/toyworld.csv")
    p.add_argument("--labeler", default="models/toy-labeler")
    p.add_argument("--reader", default="models/toy-reader",
                   help="prompt reader for prompt agreement ('' to skip)")
    p.add_argument("--out", default="out/toy_samples.png")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--n-quality", type=int, default=64)
    p.add_argument("--sampling", nargs="+", default=[str(Sampling())],
                   metavar="SAMPLER:STEPS:GUIDANCE",
                   help=f"one generated row per value (samplers: {', '.join(SAMPLERS)}); "
                        "quality is measured for each")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        samplings = [Sampling.parse(t) for t in a.sampling]
    except ActstoreError as exc:
        p.error(str(exc))
    configure_cpu_threads()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    # one generation per sampling serves both the grid (first n * rows prompts) and the
    # quality sample (first n_quality), which overlap
    recs = read_prompts(a.prompts)[: max(a.n * a.rows, a.n_quality)]
    pipe = load_pipeline(a.model)
    gens = [generate(a.model, [r["prompt"] for r in recs], [r["seed"] for r in recs],
                     sampling=sp, pipe=pipe) for sp in samplings]
    write_grid(a.out, recs, gens, samplings=samplings, n=a.n, rows=a.rows, model_dir=a.model)
    if a.n_quality:
        from actstore.toyworld.labeler import ToyLabeler
        from actstore.toyworld.reader import ToyReader

        q = recs[: a.n_quality]
        lab = ToyLabeler.from_pretrained(a.labeler)
        judge = {"reader": ToyReader.from_pretrained(a.reader) if a.reader else None,
                 "prompts": [r["prompt"] for r in q]}
        res = {"renders": quality(np.stack([render_scene(r["seed"]).rgb for r in q]), lab,
                                  **judge)}
        for sp, gen in zip(samplings, gens):
            res[f"generated {sp}"] = quality(gen[: a.n_quality], lab, **judge)
        print(json.dumps(res, indent=1))
        Path(a.out).with_suffix(".quality.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
