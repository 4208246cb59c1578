"""What an analyst pays to read a store on an object store: S3 requests and wall time per call.

A notebook opens a store lazily and reads a little of it; on S3 every request is a round
trip (tens of milliseconds), so what grows with the store (blocks, arrays) is what hurts.
Against moto's S3 server (its own process; every request it receives is counted from its
log, see ``tests/counted_s3.py``), each reader call is measured once, in order, as a
notebook makes them:

* **SD-shaped stores** of two sizes (``--images``, default 80 and 640: blocks ×1 and ×8),
  SD v1.4's 16 attn1 layers (64×64×320 ... 8×8×1280), 15 steps, both variants, 512 px
  final and x0 images, the store's own layout and writer. Block 0 holds random values in
  the biggest layer (the one-image read), every other block constant ones (a few KB
  compressed), so 640 images fit in the server's memory; blocks past the second are
  server-side copies of its objects, each with its own completion record.
* **The notebook** (``notebooks/explore.ipynb``), cell by cell, on the small store the test
  suite gives it (tiny-random model, toyworld labels, a probe run per target, one
  intervention), written to the server.

With ``--code TREE ...`` the calls run in a child process importing the library from each
tree in turn (an export of an earlier commit and this checkout): before and after side by
side, against the same stores and server.

    python benchmarks/bench_open.py --code /tmp/before .
    python benchmarks/bench_open.py --images 80 640 --skip notebook
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("ACTSTORE_BENCH_CODE") or str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))   # the counted S3 server

import numpy as np  # noqa: E402

from counted_s3 import CountedS3  # noqa: E402

# SD v1.4's attn1 points: token side and channels per block (320/640/1280/1280 channels)
SD_ATTN1 = {**{f"down_blocks.{b}.attentions.{j}": (64 >> b, 320 << b) for b in range(3)
               for j in range(2)},
            "mid_block.attentions.0": (8, 1280),
            **{f"up_blocks.{b}.attentions.{j}": (8 << b, 2560 >> b) for b in (1, 2, 3)
               for j in range(3)}}
BIG, MID = "down_blocks.0.attentions.0", "up_blocks.2.attentions.1"   # 64×64×320, 32×32×640
STEP = 7
MARK = "bench-open: "   # a child's result lines (a notebook cell prints too)


def build_sd_store(uri: str, n_images: int, steps: int = 15, block: int = 4,
                   variants: tuple[str, ...] = ("trained", "randomized"),
                   layers: dict[str, tuple[int, int]] = SD_ATTN1) -> None:
    """An SD-shaped store (see the module docstring) written by the store's own code
    (``layers``: name → token side, channels; the tests take two of SD's)."""
    import pandas as pd

    from actstore.generation.capture import LayerInfo
    from actstore.store import commit, io
    from actstore.store import core as st

    train = n_images // 2
    table = pd.DataFrame({"image_id": [f"img{i:04d}" for i in range(n_images)],
                          "prompt": "synthetic", "seed": np.arange(n_images),
                          "split": ["train"] * train + ["test"] * (n_images - train)})
    st.create_or_check_root(uri, table, f"bench-open-{n_images}", block)
    infos = [LayerInfo(n, "attn1", f"{n}.transformer_blocks.0.attn1", n.split(".attentions")[0],
                       h, h, c) for n, (h, c) in layers.items()]
    rng = np.random.default_rng(0)
    loc = io.location(uri)
    fs, root = loc.fs, loc.root
    for variant in variants:
        fp = {"variant": variant, "layers": list(layers), "generation": {"steps": steps},
              "layer_shapes": {i.name: [i.height, i.width, i.channels] for i in infos}}
        st.check_or_create_model(uri, variant, fingerprint=fp, provenance={"model": "synthetic"},
                                 layers=infos, n_steps=steps, image_hw=(512, 512),
                                 step_coords={"timestep": np.arange(steps, dtype=np.float32),
                                              "sigma": np.ones(steps, np.float32)},
                                 codec="zstd", store_dtype="float16")
        writer = st.BlockWriter(uri, st.model_path(variant))
        for a in (0, block):   # the two blocks the writer makes; the rest are copies of the 2nd
            arrays = {"final_image": np.zeros((block, 512, 512, 3), np.uint8),
                      "x0_image": np.zeros((block, steps, 512, 512, 3), np.uint8)}
            for n, (h, c) in layers.items():
                arrays[f"layers/{n}/{st.ACTIVATION}"] = (
                    rng.standard_normal((block, steps, h, h, c), np.float32).astype(np.float16)
                    if a == 0 and n == BIG else np.full((block, steps, h, h, c), 0.5, np.float16))
            writer.submit(a, a + block, arrays, {"images": table.image_id[a:a + block].tolist()})
        writer.close()
        base = f"{root}/{st.model_path(variant)}"
        src = [k for k in fs.find(base) if k.rsplit("/", 1)[-1].startswith("c.1.")]
        blocks = st.blocks_of(n_images, block)[2:]
        fs.copy([k for k in src for _ in blocks],
                [k.replace("/c.1.", f"/c.{a // block}.") for k in src for a, _ in blocks])
        record = commit.block_record(uri, st.model_path(variant), block, 2 * block)
        for a, b in blocks:
            commit.write_block_record(uri, st.model_path(variant), a, b,
                                      {**record, "images": table.image_id[a:b].tolist()})


def build_notebook_store(uri: str) -> None:
    """The notebook's store as the test suite builds it (tests/conftest.py explore_store)."""
    from actstore.generation.materialize import MaterializeSettings, materialize
    from actstore.generation.models import load_model
    from actstore.generation.sampling import GenerationConfig
    from actstore.intervene.run import run_interventions
    from actstore.intervene.settings import InterventionSettings
    from actstore.label.labels import write_labels
    from actstore.probe.runs import run_probes

    layers = ["up_blocks.3.attentions.0", "up_blocks.2.attentions.0"]
    materialize(load_model("tiny-random", device="cpu"), str(ROOT / "prompts" / "demo.csv"), uri,
                MaterializeSettings(gen=GenerationConfig(steps=4), batch_size=4, block_size=4),
                progress=False)
    write_labels(uri, "toyworld", ["salient", "depth"], progress=False)
    runs = {t: run_probes(uri, t, layers=layers, scheduler="threads", progress=False)
            for t in ("salient", "depth")}
    run_interventions(uri, runs["salient"], InterventionSettings(
        layers=layers, steps=[0, 1], images=["demo-012", "demo-013"], n_targets=1),
        progress=False)


def sd_calls(uri: str):
    """(name, call) in a notebook's order; ``ctx`` carries the view between calls."""
    import actstore

    ctx: dict = {}
    return [
        ("open_store (first in a process)", lambda: ctx.update(s=actstore.open_store(uri))),
        ("print(view): blocks, layers", lambda: repr(ctx["s"])),
        ("view.images (image table)", lambda: ctx["s"].images.to_dataframe()),
        ("view[layer] (lazy)", lambda: ctx.update(a=ctx["s"][BIG])),
        ("one image, one step: mean", lambda: float(
            ctx["a"].sel(image="img0001", step=STEP).astype("float32").mean().compute())),
        ("one step, every image: mean (32x32x640)", lambda: ctx["s"][MID].sel(step=STEP)
         .astype("float32").mean(["y", "x", "channel"]).compute()),
        ("x0 image of one image, one step", lambda: ctx["s"].x0_images.sel(
            image="img0001", step=STEP).values),
        ("open_store(model='randomized'), layers", lambda: actstore.open_store(
            uri, model="randomized").layers),
    ]


def notebook_calls(uri: str):
    """Each code cell of notebooks/explore.ipynb, run in one namespace as a kernel would."""
    import matplotlib

    matplotlib.use("Agg")
    os.environ["ACTSTORE_STORE"] = uri
    cells = [c for c in json.loads((ROOT / "notebooks" / "explore.ipynb").read_text())["cells"]
             if c["cell_type"] == "code"]
    ns: dict = {}

    def run(source: str):
        import matplotlib.pyplot as plt

        exec(compile(source, "<cell>", "exec"), ns)
        plt.close("all")
    return [(f"cell {i + 1}: {''.join(c['source']).splitlines()[-1][:40]}",
             lambda src="".join(c["source"]): run(src)) for i, c in enumerate(cells)]


def child(kind: str, uri: str, server: str) -> None:
    """Measure each call of ``kind`` on ``uri``; one JSON line per call."""
    import warnings

    import dask.array  # noqa: F401  imported before the clock, as a notebook's kernel has them
    import xarray  # noqa: F401
    import zarr  # noqa: F401

    import actstore  # noqa: F401

    warnings.filterwarnings("ignore")
    counter = CountedS3(attach=server)
    for name, call in (sd_calls(uri) if kind == "sd" else notebook_calls(uri)):
        with counter.counting() as reqs:
            t0 = time.perf_counter()
            call()
            wall = time.perf_counter() - t0
        print(MARK + json.dumps({"name": name, "wall": wall, "requests": len(reqs),
                          "kinds": reqs.summary(), "mb": reqs.sent / 1e6}), flush=True)


def measure(kind: str, uri: str, server: CountedS3, code: str) -> list[dict]:
    env = {**os.environ, **server.env(), "ACTSTORE_BENCH_CODE": str(Path(code).resolve())}
    out = subprocess.run([sys.executable, __file__, "--child", kind, uri, server.address],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{kind} calls on {uri} with {code} failed:\n{out.stderr[-3000:]}")
    return [json.loads(line[len(MARK):]) for line in out.stdout.splitlines()
            if line.startswith(MARK)]


def table(title: str, runs: dict[str, list[dict]]) -> None:
    """One row per call: each tree's requests, MB served and wall time; ratios last/first."""
    trees = list(runs)
    print(f"\n{title}")
    head = " | ".join(f"{Path(t).resolve().name}: req, MB, ms" for t in trees)
    print(f"{'call':44s} | {head}" + (" | req ratio, time ratio" if len(trees) > 1 else ""))
    for i, row in enumerate(runs[trees[0]]):
        cells = [runs[t][i] for t in trees]
        line = " | ".join(f"{c['requests']:5d} {c['mb']:8.2f} {c['wall'] * 1e3:8.0f}"
                          for c in cells)
        if len(trees) > 1:
            a, b = cells[0], cells[-1]
            line += (f" | {a['requests'] / max(b['requests'], 1):6.1f}x "
                     f"{a['wall'] / max(b['wall'], 1e-9):6.1f}x")
        print(f"{row['name'][:44]:44s} | {line}   [{cells[-1]['kinds']}]", flush=True)


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, nargs="+", default=[80, 640],
                    help="sizes of the SD-shaped stores (whole blocks of 4)")
    ap.add_argument("--code", nargs="+", default=[str(ROOT)], metavar="TREE",
                    help="library trees to compare (e.g. an export of main, then .)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["sd", "notebook", "local"])
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if args.child:
        return child(*args.child)
    server = CountedS3()
    os.environ.update(server.env())
    tmp = tempfile.mkdtemp(prefix="bench-open-")
    try:
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bench")
        print(f"moto S3 server {server.endpoint}; load average {os.getloadavg()[0]:.1f}")
        stores = [] if "sd" in args.skip else [
            ("sd", f"s3://bench/sd-{n}.zarr", f"SD-shaped store, {n} images "
             f"({n // 4} blocks), s3://") for n in args.images]
        if "local" not in args.skip and stores:
            n = args.images[-1]
            stores.append(("sd", str(Path(tmp) / f"sd-{n}.zarr"),
                           f"SD-shaped store, {n} images, local disk (no requests)"))
        if "notebook" not in args.skip:
            stores.append(("notebook", "s3://bench/explore.zarr",
                           "notebooks/explore.ipynb, cell by cell, s3://"))
        for kind, uri, title in stores:
            t0 = time.perf_counter()
            if kind == "sd":
                build_sd_store(uri, int(uri.rsplit("-", 1)[1].split(".")[0]))
            else:
                build_notebook_store(uri)
            print(f"built {uri} in {time.perf_counter() - t0:.0f} s", flush=True)
            table(title, {code: measure(kind, uri, server, code) for code in args.code})
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
