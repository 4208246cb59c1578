"""Scaling out on one machine, side by side in one process tree:

1. **Materialize, 1 vs 2 worker processes** (one torch thread each): images/s of the toy
   model through the real fan-out flow (``materialize_flow(..., workers=N)``: Prefect task
   runs on a local Dask cluster), beside the in-process run on one thread. Runs rotate
   order each round. *regions* is the fan-out phase (the workers' model loads included,
   the cluster's start and the plan step not); *wall* is the whole call; *CPU-s/img* is
   this process's and its finished workers' CPU time per image (robust to a busy
   machine). Beside them, one worker started with Dask's default environment
   (``MALLOC_TRIM_THRESHOLD_`` set, as `dask worker` starts it), which actstore retunes
   when it loads the model (``actstore.runtime.tune_malloc``): it should match the others.
2. **Probe grid, 1 vs 2 worker processes**: ``run_probes`` on the store from 1 (labelled
   once with the toy world's labeller) against a ``LocalCluster`` of N single-threaded
   processes.
3. **s3:// vs local disk**, against a local S3 server (moto's server mode on loopback,
   started here) and a local folder: *materialize* (img/s of a whole run into each),
   *write* (the store's block writer alone, the same activation blocks, raw MB/s, as in
   ``bench_store_write.py``) and *read* (every activation array read once through
   ``open_store``, raw MB/s).
5. **Interventions, in process vs 1 vs 2 worker processes**: one experiment (every image
   of the store from 1, one shift target, the probe edit and its random control) through
   ``intervene_flow`` in this process and with ``workers=N``; each run a new experiment
   id in the same store, so every run generates everything.
4. **SD v1.4 rates for docs/scale.md** (the architecture with random weights, one torch
   thread): seconds per CFG UNet call of one image at 256 and 512 px, the activation
   bytes one image-step stores (fp16, every attn1 layer), the store's compress + write
   rate per CPU-second on SD activations (256 px), and the closed-form probe's X^T X rate
   at SD's channel widths (what bounds the grid per GB read).

    python benchmarks/bench_scaling.py --images 32 --repeats 2
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ["ACTSTORE_THREADS"] = "1"   # one torch thread per process, workers included
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TOY = str(ROOT / "models" / "toy-ldm")
TOYWORLD = ROOT / "prompts" / "toyworld.csv"


def _table(n: int, out: Path) -> str:
    import pandas as pd

    rows = pd.read_csv(TOYWORLD)
    rows = pd.concat([rows[rows["split"] == "train"].head(n - n // 4),
                      rows[rows["split"] == "test"].head(n // 4)])
    rows.to_csv(out, index=False)
    return str(out)


def _cpu_seconds() -> float:
    """CPU-s of this process and of its finished children (closed clusters' workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@contextmanager
def _dask_default_worker():
    """One worker process as Dask starts it by default (MALLOC_TRIM_THRESHOLD_ set), to
    check that actstore's retuning at model load (``actstore.runtime.tune_malloc``) reaches it."""
    from distributed import LocalCluster

    from actstore.cluster import WORKER_PRELOAD

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=logging.WARNING,
                      env={"ACTSTORE_THREADS": "1"}, preload=[WORKER_PRELOAD]) as cluster:
        yield cluster.scheduler_address


def materialize_rates(prompts: str, tmp: Path, args) -> tuple[dict, str]:
    """Section 1; returns the per-configuration (regions img/s, wall img/s, CPU-s per
    image) and one finished store."""
    from actstore.generation.materialize import MaterializeSettings
    from flows.materialize import materialize_flow

    settings = MaterializeSettings().with_options(steps=args.steps, guidance=3, device="cpu",
                                                  batch_size=4, block_size=4)
    configs = {"in-process, 1 thread": None, "1 worker process": 1, "2 worker processes": 2,
               "1 worker, Dask's env": "default"}
    times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in configs}
    keep = None
    for r in range(args.repeats):
        order = list(configs)[r % 4:] + list(configs)[:r % 4]
        for name in order:
            store = str(tmp / f"m-{r}-{configs[name]}.zarr")
            t0, c0 = time.perf_counter(), _cpu_seconds()
            if configs[name] == "default":
                with _dask_default_worker() as address:
                    out = materialize_flow(TOY, prompts, store, settings, cluster=address,
                                           progress=False)
            else:
                out = materialize_flow(TOY, prompts, store, settings, workers=configs[name],
                                       progress=False)
            wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            times[name].append((out["images"] / out["seconds"], out["images"] / wall,
                                cpu / out["images"]))
            print(f"  round {r} {name:22s} regions {out['images'] / out['seconds']:.3f} img/s"
                  f"  wall {out['images'] / wall:.3f} img/s  {cpu / out['images']:.2f} CPU-s/img",
                  flush=True)
            if keep is None and configs[name] == 2:
                keep = store
            else:
                shutil.rmtree(store, ignore_errors=True)
    return times, keep


def probe_rates(store: str, args) -> dict[int, list[float]]:
    """Section 2: the grid's seconds on N single-threaded worker processes."""
    from distributed import Client, LocalCluster

    from actstore.label.labels import write_labels
    from actstore.probe.runs import run_probes

    write_labels(store, "toyworld", "salient", progress=False)
    times: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.repeats):
        for n in ((1, 2) if r % 2 == 0 else (2, 1)):
            with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                              dashboard_address=None, silence_logs=logging.WARNING) as lc, \
                    Client(lc) as client:
                t0 = time.perf_counter()
                run_probes(store, "salient", scheduler=client, progress=False)
                times[n].append(time.perf_counter() - t0)
            print(f"  round {r} probe grid on {n} worker process(es): {times[n][-1]:.1f} s",
                  flush=True)
    return times


def intervene_rates(prompts: str, store: str | None, tmp: Path, args) -> dict:
    """Section 5: images/s of one experiment in process and on N worker processes."""
    from actstore.generation.materialize import MaterializeSettings, materialize
    from actstore.intervene.settings import InterventionSettings
    from actstore.label.labels import list_targets, write_labels
    from actstore.probe.runs import run_probes
    from actstore.store.view import open_store
    from flows.intervene import intervene_flow

    if store is None:
        store = str(tmp / "iv.zarr")
        materialize(TOY, prompts, store, MaterializeSettings().with_options(
            steps=args.steps, guidance=3, device="cpu", batch_size=4, block_size=4),
            progress=False)
    if "salient" not in list_targets(store):
        write_labels(store, "toyworld", "salient", progress=False)
    view = open_store(store)
    layers = [la for la in view.layers if la.startswith("up_blocks.")]
    run = run_probes(store, "salient", layers=layers, steps=list(range(5)),
                     scheduler="threads", progress=False)
    n = int(view.root_attrs["n_images"])
    configs = {"in-process": None, "1 worker process": 1, "2 worker processes": 2}
    times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in configs}
    for r in range(args.repeats):
        order = list(configs)[r % 3:] + list(configs)[:r % 3]
        for name in order:
            settings = InterventionSettings(images=f"0:{n}", n_targets=1, device="cpu",
                                            experiment_id=f"bench-{r}-{configs[name]}")
            t0, c0 = time.perf_counter(), _cpu_seconds()
            out = intervene_flow(store, run, settings, workers=configs[name], progress=False)
            wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            assert out["complete"] and out["blocks_written"] == out["blocks"]
            times[name].append((n / out["seconds"], n / wall, cpu / n))
            print(f"  round {r} {name:20s} run {n / out['seconds']:.3f} img/s  wall "
                  f"{n / wall:.3f} img/s  {cpu / n:.2f} CPU-s/img  load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
    return times


def _print_medians(times: dict, base_name: str, phase: str, base_label: str) -> None:
    """Medians of each configuration's (phase img/s, wall img/s, CPU-s/img) rounds."""
    base = statistics.median(t[0] for t in times[base_name])
    for name, ts in times.items():
        rate, wall, cpu = (statistics.median(t[i] for t in ts) for i in range(3))
        print(f"  {name:22s} {phase} {rate:.3f} img/s ({rate / base:.2f}x {base_label})"
              f"   wall {wall:.3f} img/s   {cpu:.2f} CPU-s/img")


def _stored_bytes(uri: str) -> int:
    """Activation bytes (fp16, uncompressed) the grid reads: every layer of the store."""
    from actstore.store.view import open_store

    view = open_store(uri)
    return sum(view[layer].nbytes for layer in view.layers)


def _read_all(uri: str) -> int:
    from actstore.store.view import open_store

    view = open_store(uri)
    nbytes = 0
    for layer in view.layers:
        nbytes += view[layer].values.nbytes
    return nbytes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(host: str, port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"moto server on {host}:{port} did not start")


def s3_vs_local(prompts: str, tmp: Path, args) -> dict[str, dict[str, list[float]]]:
    """Section 3: MB/s of the write pass and of the read pass, local folder vs s3://."""
    import fsspec
    from actstore.generation.materialize import MaterializeSettings, materialize
    from actstore.generation.models import load_model
    from bench_store_write import create_zarr, source_blocks, write_zarr

    port = _free_port()  # its own process: in this one it would compete for the GIL
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host = "127.0.0.1"
    _wait_for_port(host, port)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bench")
        model = load_model(TOY, device="cpu")
        settings = MaterializeSettings().with_options(steps=args.steps, guidance=3,
                                                      batch_size=4, block_size=4)
        rates: dict[str, dict[str, list[float]]] = {
            w: {"materialize": [], "write": [], "read": []} for w in ("local", "s3")}
        blocks = None
        for r in range(args.repeats):
            for where in (("local", "s3") if r % 2 == 0 else ("s3", "local")):
                uri = (str(tmp / f"w-{r}.zarr") if where == "local"
                       else f"s3://bench/w-{r}.zarr")
                out = materialize(model, prompts, uri, settings, progress=False)
                rates[where]["materialize"].append(out["images"] / out["seconds"])
                t0 = time.perf_counter()
                nbytes = _read_all(uri)
                rates[where]["read"].append(nbytes / (time.perf_counter() - t0) / 1e6)
                if blocks is None:
                    blocks = source_blocks(uri, 4)
                raw = (str(tmp / f"raw-{r}.zarr") if where == "local"
                       else f"s3://bench/raw-{r}.zarr")
                create_zarr(raw, blocks, args.images // 4, "zstd")
                t0 = time.perf_counter()
                write_zarr(raw, blocks, args.images // 4)
                raw_bytes = sum(b.nbytes for b in blocks.values()) * (args.images // 4)
                rates[where]["write"].append(raw_bytes / (time.perf_counter() - t0) / 1e6)
                print(f"  round {r} {where:5s} materialize "
                      f"{rates[where]['materialize'][-1]:.3f} img/s, block writer "
                      f"{rates[where]['write'][-1]:.1f} MB/s, read pass "
                      f"{rates[where]['read'][-1]:.1f} MB/s", flush=True)
        return rates
    finally:
        server.terminate()
        server.wait()


def sd14_rates(tmp: Path, args) -> None:
    """Section 4 (prints; the projections in docs/scale.md are derived from these)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from bench_store_write import create_zarr, source_blocks, write_zarr
    from sd14 import sd14_folder

    from actstore.generation.capture import probe_layout
    from actstore.generation.materialize import MaterializeSettings, materialize
    from actstore.generation.models import load_model

    torch.set_num_threads(1)
    model = load_model(sd14_folder(), device="cpu")
    for size in (256, 512):
        lat = size // 8
        x = torch.randn(2, 4, lat, lat)
        ctx = torch.randn(2, 77, 768)
        times, cpu = [], []
        with torch.no_grad():
            for k in range(3):  # the first call warms up
                t0, c0 = time.perf_counter(), time.process_time()
                model.unet(x, 500, encoder_hidden_states=ctx)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        layers = probe_layout(model.unet, lat, lat, 768)
        nbytes = sum(i.height * i.width * i.channels * 2 for i in layers)
        print(f"  {size} px: CFG UNet call (1 image) {statistics.median(times[1:]):.2f} s wall,"
              f" {statistics.median(cpu[1:]):.2f} CPU-s; "
              f"{len(layers)} layers store {nbytes / 1e6:.2f} MB per image-step (fp16)",
              flush=True)
    src = str(tmp / "sd.zarr")
    materialize(model, prompts_for_sd(tmp), src, MaterializeSettings().with_options(
        steps=2, height=256, width=256, x0=False, batch_size=1, block_size=1),
        progress=False)
    blocks = source_blocks(src, 1)
    raw = sum(b.nbytes for b in blocks.values()) * 8
    dst = str(tmp / "sd-write.zarr")
    create_zarr(dst, blocks, 8, "zstd")
    c0, t0 = time.process_time(), time.perf_counter()
    write_zarr(dst, blocks, 8)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    print(f"  compress + write (zstd) of SD 256 px activations: {raw / cpu / 1e6:.0f} MB per "
          f"CPU-second, {raw / wall / 1e6:.0f} MB/s wall", flush=True)
    from threadpoolctl import threadpool_limits

    for c in (320, 640, 1280):
        xs = np.random.default_rng(0).standard_normal((64 * 64, c)).astype(np.float32)
        with threadpool_limits(1):
            c0 = time.process_time()
            for _ in range(5):
                xs.T @ xs
            sec = (time.process_time() - c0) / 5  # CPU-seconds: the load moves wall time
        gb = xs.nbytes / 2 / 1e9  # stored fp16
        print(f"  X^T X at {c} channels: {2 * c * c * len(xs) / sec / 1e9:.1f} GFLOP/s, "
              f"{sec / gb:.1f} s per GB of fp16 activations", flush=True)


def prompts_for_sd(tmp: Path) -> str:
    import pandas as pd

    out = tmp / "sd-prompts.csv"
    pd.read_csv(TOYWORLD).head(1).to_csv(out, index=False)
    return str(out)


_TMP: list[Path] = []   # the run's scratch folder, for a SIGTERM to remove


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["materialize", "probes", "s3", "sd14", "intervene"])
    return ap


def main() -> None:
    args = build_parser().parse_args()
    from flows.prefect_api import flow_mode

    print(f"load average before: {os.getloadavg()}", flush=True)
    tmp = Path(tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR")))
    _TMP.append(tmp)
    prompts = _table(args.images, tmp / "prompts.csv")
    store = None
    try:
        if "materialize" not in args.skip:
            print(f"1. materialize {args.images} toy images x {args.steps} steps", flush=True)
            with flow_mode(verbose=False, debug=False):   # the commands' server and console
                times, store = materialize_rates(prompts, tmp, args)
            _print_medians(times, "1 worker process", "regions", "1 worker")
        if "probes" not in args.skip and store:
            print("2. probe grid (salient) on the store above", flush=True)
            pt = probe_rates(store, args)
            one, two = statistics.median(pt[1]), statistics.median(pt[2])
            gb = _stored_bytes(store) / 1e9
            print(f"  1 process {one:.1f} s, 2 processes {two:.1f} s: {one / two:.2f}x; "
                  f"{one / gb:.0f} s per GB of activations (fp16, {gb * 1e3:.0f} MB) on 1")
        if "intervene" not in args.skip:
            print("5. intervene: every image, 1 target, probe edit + random control",
                  flush=True)
            with flow_mode(verbose=False, debug=False):   # the commands' server and console
                it = intervene_rates(prompts, store, tmp, args)
            _print_medians(it, "in-process", "run", "in process")
        if "s3" not in args.skip:
            print("3. s3:// (moto server on loopback) vs local folder", flush=True)
            rates = s3_vs_local(prompts, tmp, args)
            for kind, unit in (("materialize", "img/s"), ("write", "MB/s"),
                               ("read", "MB/s")):
                loc = statistics.median(rates["local"][kind])
                s3 = statistics.median(rates["s3"][kind])
                print(f"  {kind:11s} local {loc:.2f} {unit}, s3 {s3:.2f} {unit}: s3/local "
                      f"{s3 / loc:.2f}")
        if "sd14" not in args.skip:
            print("4. SD v1.4 architecture (random weights), one torch thread", flush=True)
            sd14_rates(tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average after: {os.getloadavg()}, cores {os.cpu_count()}")


if __name__ == "__main__":
    import stopping

    stopping.run(main, "bench_scaling", _TMP)
