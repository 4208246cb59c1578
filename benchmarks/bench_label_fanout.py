"""Labels in one process vs fanned out over 1 and 2 worker processes, side by side.

A store of the tiny-random model at the toy world's 64×64 px (its activations don't
matter here: labelling reads only the final and per-step x0 images) is labelled for the
toy labeller's three targets with every step's x0 image, in this process (one torch
thread) and through ``label_flow(..., workers=N)`` (Prefect task runs on a local Dask
cluster of N single-threaded processes; *wall* includes the cluster's start and the
workers' model loads). Runs rotate order each round; the stores must come out equal.

    python benchmarks/bench_label_fanout.py --images 64 --steps 8 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["ACTSTORE_THREADS"] = "1"   # one torch thread per process, workers included
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from flows.cli_env import quiet_libraries  # noqa: E402

# as the actstore commands: no Prefect telemetry (offline, each temporary server logged an
# ERROR line failing to send it), no Hub lookups, no model-load chatter
quiet_libraries()
TARGETS = ["depth", "salient", "shading"]


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    return ap


def main() -> None:
    args = build_parser().parse_args()

    from actstore.generation.materialize import MaterializeSettings, materialize
    from actstore.label.labels import write_labels
    from flows.label import label_flow
    from storecheck import assert_same_store

    tmp = Path(tempfile.mkdtemp(prefix="bench-label-"))
    try:
        table = tmp / "p.csv"
        lines = (ROOT / "prompts" / "toyworld.csv").read_text().splitlines(keepends=True)
        table.write_text("".join(lines[:args.images + 1]))
        base = str(tmp / "base.zarr")
        materialize("tiny-random", str(table), base, MaterializeSettings().with_options(
            steps=args.steps, height=64, width=64, batch_size=8, block_size=8),
            progress=False)
        configs = {"in-process, 1 thread": None, "1 worker process": 1,
                   "2 worker processes": 2}
        times: dict[str, list[float]] = {k: [] for k in configs}
        ref = None
        for r in range(args.repeats):
            order = list(configs)[r % 3:] + list(configs)[:r % 3]
            for name in order:
                store = str(tmp / f"l-{r}-{configs[name]}.zarr")
                shutil.copytree(base, store)
                t0 = time.perf_counter()
                if configs[name] is None:
                    write_labels(store, "toyworld", TARGETS, progress=False)
                else:
                    label_flow(store, "toyworld", TARGETS, workers=configs[name],
                               progress=False)
                times[name].append(time.perf_counter() - t0)
                n = args.images * (1 + args.steps)
                print(f"  round {r} {name:22s} {times[name][-1]:6.1f} s  "
                      f"{n / times[name][-1]:6.1f} labelled images/s", flush=True)
                if ref is None:
                    ref = store
                else:
                    assert_same_store(store, ref)
                    shutil.rmtree(store)
        serial = statistics.median(times["in-process, 1 thread"])
        print(f"\n{args.images} images x (1 + {args.steps} x0 steps), {len(TARGETS)} targets; "
              f"median wall, ratio = in-process time / time (higher is faster)")
        for name, ts in times.items():
            print(f"  {name:22s} {statistics.median(ts):6.1f} s  {serial / statistics.median(ts):.2f}x")
        print(f"load average: {os.getloadavg()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
