"""Capture overhead: materialize wall time / plain diffusers pipeline wall time.

Same model object, prompts, seeds, steps and resolution; runs are interleaved
(plain, materialize, materialize+x0, plain, ...) so machine load hits all alike, and the
medians are compared. ``materialize`` includes store creation, hooks, host copies,
non-finite checks, compression and writing; ``+x0`` also decodes x0 at every step.

    python benchmarks/bench_capture.py --model tiny-random --images 32
    python benchmarks/bench_capture.py --model sd14 --images 2 --size 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from actstore.generation.sampling import GenerationConfig  # noqa: E402
from actstore.generation.materialize import (CaptureConfig, MaterializeSettings,  # noqa: E402
                                              materialize)
from actstore.generation.models import diffusers_pipeline, load_model  # noqa: E402
from actstore.generation.prompts import load_prompts  # noqa: E402

DEMO = str(Path(__file__).resolve().parent.parent / "prompts" / "demo.csv")


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-random", help="tiny-random, sd14, or a folder")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--size", type=int, default=None, help="image side (default native)")
    ap.add_argument("--repeats", type=int, default=3)
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if args.model == "sd14":
        from sd14 import sd14_folder
        path = sd14_folder()
    else:
        path = args.model
    model = load_model(path, device="cpu")
    _ = model.weights_hash  # hashed once per process, like a long materialize run
    size = args.size or model.native_size
    rows = load_prompts(DEMO).iloc[: args.images]
    table = Path(tempfile.mkdtemp()) / "prompts.csv"
    rows.to_csv(table, index=False)
    gen = GenerationConfig(steps=args.steps, height=size, width=size)
    pipe = diffusers_pipeline(model)
    batch = min(args.images, 4)
    times: dict[str, list[float]] = {"plain": [], "materialize": [], "materialize+x0": []}
    for r in range(args.repeats):
        t = time.perf_counter()
        for lo in range(0, len(rows), batch):
            chunk = rows.iloc[lo:lo + batch]
            pipe(chunk["prompt"].tolist(), num_inference_steps=args.steps, guidance_scale=7.5,
                 height=size, width=size, output_type="np",
                 generator=[torch.Generator().manual_seed(int(s)) for s in chunk["seed"]])
        times["plain"].append(time.perf_counter() - t)
        for name, x0 in (("materialize", False), ("materialize+x0", True)):
            with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
                t = time.perf_counter()
                materialize(model, str(table), f"{tmp}/s.zarr",
                            MaterializeSettings(gen=gen, cap=CaptureConfig(x0=x0),
                                                batch_size=batch, block_size=batch),
                            progress=False)
                times[name].append(time.perf_counter() - t)
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nmodel {args.model}, {args.images} images, {args.steps} steps, {size}px, "
          f"batch {batch}, torch threads {torch.get_num_threads()}")
    for k, v in med.items():
        print(f"  {k:16s} median {v:8.2f} s   ratio to plain {v / med['plain']:.3f}")


if __name__ == "__main__":
    main()
