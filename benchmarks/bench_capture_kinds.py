"""Cost of each capture kind: bytes per image, materialize time, probe time.

Bytes come from the capture points' shapes at a small latent, scaled to the model's native
resolution (token grids scale with the latent's area), and are checked against what the
store writer reports at the small resolution (an attn1 store, then each kind added to it).
Times are side by side in one process: materialize with attn1 alone, then attn1 + each
kind, interleaved over repeats (medians); then, for the toy model, the probe grid of one
target on each kind's layers.

    python benchmarks/bench_capture_kinds.py --model toy-ldm --prompts toyworld --images 32
    python benchmarks/bench_capture_kinds.py --model sd14 --size 64 --images 1 --bytes-only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from actstore.generation.materialize import MaterializeSettings, materialize  # noqa: E402
from actstore.generation.models import load_model  # noqa: E402
from actstore.generation.points import KINDS, capture_points  # noqa: E402
from actstore.generation.prompts import load_prompts  # noqa: E402
from actstore.generation.sampling import GenerationConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FP16 = 2


def bytes_per_image(points, steps: int, scale: float = 1.0) -> dict[str, int]:
    """fp16 bytes of one image's conditional-half activations, all steps, per kind."""
    out = {}
    for p in points:
        out[p.kind] = out.get(p.kind, 0) + round(p.height * p.width * scale) * p.channels
    return {k: v * steps * FP16 for k, v in out.items()}


def _table(path: Path, rows, n_train: int, n_test: int) -> str:
    import pandas as pd

    pd.concat([rows[rows["split"] == "train"].iloc[:n_train],
               rows[rows["split"] == "test"].iloc[:n_test]]).to_csv(path, index=False)
    return str(path)


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy-ldm", help="toy-ldm, tiny-random, sd14 or a folder")
    ap.add_argument("--prompts", default="toyworld")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--size", type=int, help="image side to measure at (default native)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bytes-only", action="store_true")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    ref = {"toy-ldm": str(REPO / "models" / "toy-ldm")}.get(args.model, args.model)
    if args.model == "sd14":
        from sd14 import sd14_folder
        ref = sd14_folder()
    model = load_model(ref, device="cpu")
    _ = model.weights_hash
    f = model.vae_scale_factor
    size = args.size or model.native_size
    native = model.native_size // f
    points = capture_points(model, KINDS, latent_h=size // f, latent_w=size // f)
    small = bytes_per_image(points, args.steps)
    full = bytes_per_image(points, args.steps, (native / (size // f)) ** 2)
    prompts = {"toyworld": REPO / "prompts" / "toyworld.csv",
               "demo": REPO / "prompts" / "demo.csv"}.get(args.prompts, args.prompts)
    rows = load_prompts(str(prompts))
    tmp = Path(tempfile.mkdtemp())
    n_test = min(args.images // 4, int((rows["split"] == "test").sum()))
    table = _table(tmp / "p.csv", rows, args.images - n_test, n_test)
    n = args.images
    gen = GenerationConfig(steps=args.steps, height=size, width=size,
                           guidance=3.0 if args.model == "toy-ldm" else 7.5)
    base_settings = MaterializeSettings(gen=gen, batch_size=min(n, 8), block_size=min(n, 8))

    def run(uri: str, **options) -> dict:
        return materialize(model, table, uri, base_settings.with_options(**options),
                           progress=False)

    # measured: an attn1 store, then each kind added (the writer counts only that kind)
    base = str(tmp / "measured.zarr")
    run(base, x0=False, kinds=("attn1",))
    measured = {"attn1": None}
    for kind in KINDS[1:]:
        s = run(base, x0=False, kinds=("attn1", kind))
        measured[kind] = s["bytes"] / n
    print(f"\nmodel {args.model}: bytes per image, fp16, conditional half, {args.steps} steps")
    print(f"{'kind':7s} {'points':>6s} {f'{size}px computed':>16s} {'measured':>10s} "
          f"{f'{model.native_size}px computed':>18s}")
    for kind in KINDS:
        k = sum(p.kind == kind for p in points)
        m = "-" if measured[kind] is None else f"{measured[kind]:,.0f}"
        print(f"{kind:7s} {k:6d} {small[kind]:16,d} {m:>10s} {full[kind]:18,d}"
              f"  ({full[kind] / 2**20:,.1f} MiB)")
    if args.bytes_only:
        return

    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for r in range(args.repeats):
        for kind in KINDS:
            kinds = ("attn1",) if kind == "attn1" else ("attn1", kind)
            t = time.perf_counter()
            run(str(tmp / f"t{r}-{kind}.zarr"), kinds=kinds)
            times[kind].append(time.perf_counter() - t)
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()),
              flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nmaterialize (with x0), {n} images, medians of {args.repeats}:")
    for kind in KINDS:
        print(f"  attn1{'+' + kind if kind != 'attn1' else '':7s} {med[kind]:7.1f} s   "
              f"ratio to attn1 {med[kind] / med['attn1']:.3f}")
    if args.prompts != "toyworld":
        return
    from actstore.label.labels import write_labels
    from actstore.probe.runs import run_probes
    from actstore.store.view import open_store

    write_labels(base, "toyworld", "depth", on_x0=False, progress=False)
    view = open_store(base)
    print(f"\nprobe grid, target depth, {n} images ({n_test} test), trained model:")
    probe: dict[str, float] = {}
    for kind in KINDS:
        layers = [la for la in view.layers if view.points[la].kind == kind]
        t = time.perf_counter()
        run_probes(base, "depth", layers=layers, scheduler="threads", progress=False)
        probe[kind] = time.perf_counter() - t
        print(f"  {kind:7s} {len(layers):3d} layers {probe[kind]:7.1f} s   ratio to attn1 "
              f"{probe[kind] / probe['attn1']:.3f}", flush=True)


if __name__ == "__main__":
    main()
