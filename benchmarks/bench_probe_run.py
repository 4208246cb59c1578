"""A whole probe run against one plain read pass of the same activations, side by side.

Measures, in one process, on one store: a plain read of every activation array (dask sum,
threads), the fit alone, the score pass alone (given the fits), and the whole
``run_probes`` (fit + score + intervals + store writes + emergence), for each target.
Ratios are to the read pass measured in the same run (the mean of the reads before and
after), in wall time and in this process's CPU time.

The store is either a real one (``--store``, e.g. the main job's) or a synthetic one built
here at the toy's shapes or at SD v1.4's (64×64×320, 32×32×640, 16×16×1280 and 8×8×1280
token grids, 512×512 labels), with a planted linear signal so the probes have something to
find (random activations, float16, zstd, the store's own layout and writer).

    python benchmarks/bench_probe_run.py --store runs/main/store.zarr --targets salient depth
    python benchmarks/bench_probe_run.py --shapes sd --images 16 --steps 4

With ``--code TREE ...`` each whole run is made in a child process importing the library
from each tree in turn (e.g. an export of an earlier commit and this checkout), the trees
alternating, every run with a read pass of this process after it: before and after side by
side in one run, under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
# a whole run in a child process (--code) imports the library from the tree it compares
sys.path.insert(0, os.environ.get("ACTSTORE_BENCH_CODE") or str(ROOT))

from actstore.generation.capture import LayerInfo  # noqa: E402
from actstore.label.labels import write_labels  # noqa: E402
from actstore.metrics import upsample  # noqa: E402
from actstore.probe import reads  # noqa: E402
from actstore.probe.grid import fit_layer, score_layer  # noqa: E402
from actstore.probe.runs import load_targets, run_probes  # noqa: E402
from actstore.runtime import task_threads  # noqa: E402
from actstore.store import core as st  # noqa: E402
from actstore.store.view import open_store  # noqa: E402

SHAPES = {   # image side, {layer: (token side, channels)}
    "sd": (512, {"down_blocks.0.attentions.0": (64, 320), "down_blocks.1.attentions.0": (32, 640),
                 "down_blocks.2.attentions.0": (16, 1280), "mid_block.attentions.0": (8, 1280)}),
    "toy": (64, {"down_blocks.0.attentions.0": (16, 32), "down_blocks.1.attentions.0": (8, 64),
                 "down_blocks.2.attentions.0": (4, 64), "mid_block.attentions.0": (2, 64)}),
}


def build_store(uri: str, shapes: str, n_images: int, n_steps: int, block: int,
                variants: list[str], seed: int = 0) -> None:
    """A store of planted activations: each token = noise + field·direction, field a smooth
    per-image map whose upsampling (plus noise) is the depth label, salient = depth > 0."""
    side, layers = SHAPES[shapes]
    rng = np.random.default_rng(seed)
    n_train = (n_images // 2 // block) * block or block
    table = pd.DataFrame({"image_id": [f"img{i:04d}" for i in range(n_images)],
                          "prompt": "synthetic", "seed": np.arange(n_images),
                          "split": ["train"] * n_train + ["test"] * (n_images - n_train)})
    st.create_or_check_root(uri, table, f"synthetic-{shapes}-{n_images}-{seed}", block)
    infos = [LayerInfo(name, "attn1", f"{name}.transformer_blocks.0.attn1",
                       name.split(".attentions")[0], h, h, c)
             for name, (h, c) in layers.items()]
    field = rng.normal(size=(n_images, 4, 4)).astype(np.float32)
    depth = upsample(field, side) + 0.3 * rng.normal(size=(n_images, side, side)).astype(np.float32)
    for variant in variants:
        fp = {"variant": variant, "layers": list(layers), "generation": {"steps": n_steps},
              "layer_shapes": {i.name: [i.height, i.width, i.channels] for i in infos}}
        st.check_or_create_model(uri, variant, fingerprint=fp,
                                 provenance={"model": "synthetic"}, layers=infos,
                                 n_steps=n_steps, image_hw=(side, side),
                                 step_coords={"timestep": np.arange(n_steps, dtype=np.float32),
                                              "sigma": np.ones(n_steps, np.float32)},
                                 codec="zstd", store_dtype="float16")
        writer = st.BlockWriter(uri, st.model_path(variant))
        for a, b in st.blocks_of(n_images, block):
            arrays = {"final_image": np.zeros((b - a, side, side, 3), np.uint8)}
            for info in infos:
                h, c = info.height, info.channels
                z = upsample(field[a:b], h)[:, None, :, :, None]           # (b, 1, h, h, 1)
                gain = np.linspace(0.2, 1.0, n_steps)[None, :, None, None, None]
                x = rng.standard_normal((b - a, n_steps, h, h, c), np.float32)
                x += gain * z * rng.normal(size=c).astype(np.float32)
                arrays[f"layers/{info.name}/{st.ACTIVATION}"] = x.astype(np.float16)
            writer.submit(a, b, arrays, {"images": table["image_id"][a:b].tolist()})
        writer.close()
    npz = Path(uri).with_suffix(".labels.npz")
    np.savez(npz, image_id=table["image_id"].to_numpy(str), depth=depth,
             salient=(depth > 0).astype(np.float32))
    for target in ("depth", "salient"):
        write_labels(uri, f"array:{npz}", target, progress=False)


class Clock:
    """Wall seconds and this process's CPU seconds (every thread) of what ran inside: on a
    shared machine the wall time moves with the load, the CPU time much less."""

    wall = cpu = 0.0

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def __add__(self, o: "Clock") -> "Clock":
        out = Clock()
        out.wall, out.cpu = self.wall + o.wall, self.cpu + o.cpu
        return out

    def ratio(self, ref: "Clock") -> str:
        return f"{self.wall / ref.wall:.2f}x wall, {self.cpu / ref.cpu:.2f}x CPU"


def _timed(fn) -> Clock:
    with Clock() as c:
        fn()
    return c


def read_pass(uri: str) -> Clock:
    import dask

    def run():
        for m in st.model_variants(uri):
            view = open_store(uri, m)
            dask.compute(*[view[layer].data.sum(dtype=np.float32) for layer in view.layers],
                         scheduler="threads")
    with task_threads():
        return _timed(run)


def block_reads(uri: str) -> Clock:
    """The bare read: every activation block decompressed into memory, one at a time, as
    the probe run's block tasks read them, with nothing computed on it (the plain read
    pass above also sums, in float32, which costs about as much again)."""
    def run():
        for m in st.model_variants(uri):
            view = open_store(uri, m)
            for layer in view.layers:
                arr = reads.stored_array(uri, st.layer_path(m, layer))
                for a in range(0, arr.shape[0], view.block_size):
                    arr[a:a + view.block_size]
    with task_threads():
        return _timed(run)


def fit_and_score(uri: str, target: str) -> tuple[Clock, Clock]:
    """The fit alone and the score pass alone, every model × layer × step."""
    _, split, sources = load_targets(uri, target)
    fit_s = score_s = Clock()
    with task_threads():
        for m in st.model_variants(uri):
            view = open_store(uri, m)
            steps = np.arange(view.n_steps)
            for layer in view.layers:
                src = replace(sources[layer], activation=st.layer_path(m, layer))
                with Clock() as f:
                    fit = fit_layer(src, split, steps, scheduler="threads")
                with Clock() as s:
                    score_layer(src, split, steps, fit, scheduler="threads")
                fit_s, score_s = fit_s + f, score_s + s
    return fit_s, score_s


def whole_run(uri: str, target: str, code: str | None) -> Clock:
    """One ``run_probes`` from a cold start (labels and array metadata read again), in this
    process, or with ``code`` in a child process importing the library from that tree (its
    imports and a read pass untimed; its own clock reported)."""
    if code is None:
        reads._cached_labels.cache_clear()
        reads.stored_array.cache_clear()
        return _timed(lambda: run_probes(uri, target, scheduler="threads", progress=False))
    out = subprocess.run([sys.executable, __file__, "--store", uri, "--child-run", target],
                         env={**os.environ, "ACTSTORE_BENCH_CODE": str(Path(code).resolve())},
                         capture_output=True, text=True, check=True)
    c = Clock()
    c.wall, c.cpu = json.loads(out.stdout.strip().splitlines()[-1])
    return c


def mean(a: Clock, b: Clock) -> Clock:
    out = a + b
    out.wall, out.cpu = out.wall / 2, out.cpu / 2
    return out


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", help="a store with the targets labelled (else synthetic)")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="sd")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--models", nargs="+", default=["trained", "randomized"])
    ap.add_argument("--targets", nargs="+", default=["salient", "depth"])
    ap.add_argument("--repeats", type=int, default=1, help="whole runs per target")
    ap.add_argument("--whole-only", action="store_true",
                    help="skip the separate fit and score passes (half the time)")
    ap.add_argument("--code", nargs="+", metavar="TREE",
                    help="whole runs in child processes, alternating the library of these "
                         "trees (implies --whole-only)")
    ap.add_argument("--child-run", metavar="TARGET", help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if args.child_run:   # one whole run, its clock as JSON (see whole_run)
        import dask.array  # noqa: F401  imported, as in the parent's read pass
        import distributed  # noqa: F401  dask looks for it when a graph is computed
        import torch  # noqa: F401
        read_pass(args.store)   # untimed, as the parent's first: code paths warm
        run = whole_run(args.store, args.child_run, None)
        print(json.dumps([run.wall, run.cpu]))
        return
    args.whole_only = args.whole_only or bool(args.code)
    tmp = None
    uri = args.store
    if uri is None:
        tmp = tempfile.mkdtemp(prefix="bench-probe-run-")
        uri = str(Path(tmp) / "store.zarr")
        t = _timed(lambda: build_store(uri, args.shapes, args.images, args.steps,
                                       args.block_size, args.models))
        print(f"synthetic {args.shapes} store: {args.images} images x {args.steps} steps x "
              f"{len(SHAPES[args.shapes][1])} layers x {len(args.models)} models, built in "
              f"{t.wall:.1f} s")
    try:
        import torch  # noqa: F401  a run's first float16 upcast imports it: ~1 CPU s once per process
        print(f"load average before: {load()}")
        read_pass(uri)   # once untimed: metadata caches and page cache warm, as for the rest
        read, bare = read_pass(uri), block_reads(uri)
        gb = sum(open_store(uri, m)[la].nbytes for m in st.model_variants(uri)
                 for la in open_store(uri, m).layers) / 1e9
        print(f"plain read pass: {read.wall:.2f} s, {read.cpu:.2f} CPU s ({gb:.2f} GB float16, "
              f"{gb / read.wall * 1e3:.0f} MB/s); bare block reads {bare.wall:.2f} s, "
              f"{bare.cpu:.2f} CPU s [load {load()}]")
        for target in args.targets:
            if not args.whole_only:
                fit, score = fit_and_score(uri, target)
            for _, code in ((r, c) for r in range(args.repeats) for c in args.code or [None]):
                run = whole_run(uri, target, code)
                read2, bare2 = read_pass(uri), block_reads(uri)   # the machine's pace moves
                ref, ref_bare = mean(read, read2), mean(bare, bare2)
                parts = "" if args.whole_only else (
                    f"fit {fit.wall:.2f} s ({fit.ratio(ref)}), score {score.wall:.2f} s "
                    f"({score.ratio(ref)}), ")
                parts = f"[{code}] " + parts if code else parts
                print(f"{target}: {parts}whole run (fit + score + store) {run.wall:.2f} s, "
                      f"{run.cpu:.2f} CPU s ({run.ratio(ref)} read; {run.ratio(ref_bare)} "
                      f"bare read; read {read2.wall:.2f} s, {read2.cpu:.2f} CPU s this time) "
                      f"[load {load()}]", flush=True)
                read, bare = read2, bare2
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
