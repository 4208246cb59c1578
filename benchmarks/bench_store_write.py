"""Store write throughput: MB/s written by the store vs ``numpy.save`` of the same bytes.

Both write the same activation blocks, one block at a time (the unit materialize writes),
to the same disk; the store with each named codec, ``numpy.save`` uncompressed. MB/s are of
raw (uncompressed) activation bytes; the compression ratio is raw bytes / bytes on disk.
Writers alternate within each round, in an order rotated every round, after one untimed
warm-up round; medians are compared.

- *npy*: ``numpy.save`` per block array, the target's baseline.
- *store*: the store's own ``BlockWriter``, completion records included.
- *bound*: the same codec with zarr taken out: every block array compressed by numcodecs
  with the codec's own Blosc settings on one thread per core, written to its own file.
  What any store could reach on this machine with this codec.

Two clocks: *cached* stops when the writes return (data may still sit in the page cache, so
``numpy.save`` runs at memcpy speed), *durable* also includes ``os.sync()`` so both
writers' bytes are on the disk.

Two regimes, set by how much one run writes (``--mb``):

- *sustained* (the default: 1.5 × the kernel's dirty-page limit, about 6 GB on a 24 GiB
  machine): past that limit the kernel throttles every writer to the disk's pace and
  writes back while the writer compresses, as in any materialize run bigger than a few GB.
  The target (store / numpy.save ≥ 0.5, durable) is judged here.
- *burst* (``--mb`` below the limit): everything fits in the page cache, nothing is written
  back until the closing ``os.sync()``, so compressing and flushing run one after the
  other; a quick check of CPU costs, pessimistic for compressing writers.

Each writer's files are deleted right after its timing, so the disk needs one run's bytes.

    python benchmarks/bench_store_write.py                       # tiny-random activations
    python benchmarks/bench_store_write.py --store runs/main/store.zarr   # toy model's
    python benchmarks/bench_store_write.py --model sd14 --size 256  # SD v1.4's
    python benchmarks/bench_store_write.py --mb 256 --repeats 8      # burst: quick

The toy model's layers are small (0.06-2 MB per block array), so per-array costs weigh
most there; SD v1.4's (random weights, 256 px: 2-39 MB per block array) are the use case.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actstore.store.codecs import CODEC_NAMES  # noqa: E402
from actstore.store.io import put_group  # noqa: E402
from actstore.store.core import (  # noqa: E402
    BlockWriter, block_arrays, block_layout, create_array, model_path)

DEMO = str(Path(__file__).resolve().parent.parent / "prompts" / "demo.csv")


def source_blocks(store: str | None, block: int, model: str = "tiny-random",
                  size: int | None = None) -> dict[str, np.ndarray]:
    """One block (``block`` images × all steps) of every layer's activations, from
    ``store`` or materialized from ``model`` (tiny-random, sd14 or a folder)."""
    if store is None:
        from actstore.generation.sampling import GenerationConfig
        from actstore.generation.materialize import CaptureConfig, MaterializeSettings, materialize
        if model == "sd14":
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from sd14 import sd14_folder
            model = sd14_folder()
        store = tempfile.mkdtemp() + "/src.zarr"
        materialize(model, DEMO, store,
                    MaterializeSettings(gen=GenerationConfig(steps=15, height=size, width=size),
                                        cap=CaptureConfig(x0=False), batch_size=min(block, 2),
                                        device="cpu", block_size=block),
                    images=f"0:{block}", progress=True)
    from actstore.store.view import open_store
    view = open_store(store)
    return {layer: view[layer].isel(image=slice(0, block)).values for layer in view.layers}


def disk_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def create_zarr(root: str, blocks: dict[str, np.ndarray], copies: int, codec: str) -> None:
    """The arrays, made by the store's own ``create_array`` with ``block_layout``'s
    chunks and shards: made once per store, so not timed."""
    zarr.open_group(root, mode="w", zarr_format=3)
    model = model_path("m")
    b = next(iter(blocks.values())).shape[0]
    for layer, data in blocks.items():
        shape = (b * copies,) + data.shape[1:]
        chunks, shards = block_layout(shape, b, data.dtype.itemsize, lead=2)
        create_array(root, f"{model}/layers/{layer}/activation", shape=shape, chunks=chunks,
                     shards=shards, dtype=data.dtype, dims=None, codec=codec)
        put_group(root, f"{model}/layers/{layer}")
    for kind in {layer.split("/")[0] for layer in blocks if "/" in layer}:
        put_group(root, f"{model}/layers/{kind}")   # block/..., vae/...: a group per kind
    create_array(root, f"{model}/final_image", shape=(b * copies, 1, 1, 3),
                 chunks=(b, 1, 1, 3), dtype="uint8", dims=None)
    for group in (f"{model}/layers", model, "models"):
        put_group(root, group)


def write_zarr(root: str, blocks: dict[str, np.ndarray], copies: int) -> None:
    """The store's own write path: ``BlockWriter``, completion records included."""
    b = next(iter(blocks.values())).shape[0]
    final = np.zeros((b, 1, 1, 3), np.uint8)
    writer = BlockWriter(root, model_path("m"))
    for k in range(copies):
        writer.submit(k * b, (k + 1) * b, block_arrays(blocks, final), {})
    writer.close()


def write_npy(root: str, blocks: dict[str, np.ndarray], copies: int) -> None:
    os.makedirs(root, exist_ok=True)
    for layer, data in blocks.items():
        for k in range(copies):
            np.save(f"{root}/{_file(layer)}.{k}.npy", data)


def _file(layer: str) -> str:
    """One file per layer in one folder: a kind's layers are named ``kind/site``."""
    return layer.replace("/", "--")


def bound_encoder(root: str, layer: str):
    """The store's own codec as one numcodecs call: zarr's ``BloscCodec._blosc_codec`` of a
    created array, which carries the typesize zarr derived from the dtype (so the shuffle
    is the store's). None when the chain is not a lone Blosc compressor (bit-rounding's
    filter needs zarr's own pipeline)."""
    array = zarr.open_array(root, path=f"models/m/layers/{layer}/activation", mode="r")
    if array.filters:
        return None
    if not array.compressors:
        return lambda a: a
    (c,) = array.compressors
    if not isinstance(c, BloscCodec):
        return None
    numcodecs.blosc.use_threads = False  # one call per thread, like zarr's worker threads
    return c._blosc_codec.encode


def write_bound(root: str, blocks: dict[str, np.ndarray], copies: int, encode) -> None:
    os.makedirs(root, exist_ok=True)

    def one(job: tuple[int, str]) -> None:
        k, layer = job
        with open(f"{root}/{_file(layer)}.{k}", "wb") as f:
            f.write(encode(blocks[layer]))

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(one, [(k, layer) for k in range(copies) for layer in blocks]))


def dirty_limit_mb() -> float | None:
    """The kernel's dirty-page limit (``vm.dirty_bytes``, else ``vm.dirty_ratio`` % of
    available memory): writing past it throttles a writer to the disk's pace. None where
    /proc does not say (not Linux)."""
    try:
        vm = Path("/proc/sys/vm")
        limit = int((vm / "dirty_bytes").read_text())
        if limit:
            return limit / 1e6
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available_kb = int(meminfo["MemAvailable"].split()[0])
        return int((vm / "dirty_ratio").read_text()) / 100 * available_kb / 1e3
    except (OSError, KeyError, ValueError):
        return None


def run_size_mb(requested: float | None, work: str) -> tuple[float, str]:
    """MB written per run and the regime's name; the default is sustained."""
    limit = dirty_limit_mb()
    mb = requested if requested is not None else max(256.0, 1.5 * (limit or 4000.0))
    free = shutil.disk_usage(work).free / 1e6
    if mb > 0.9 * free:
        raise SystemExit(f"--mb {mb:.0f}: only {free:.0f} MB free in {work}; "
                         "free space, set BENCH_DIR to a bigger disk or pass a smaller --mb")
    regime = ("sustained" if limit is not None and mb > limit else "burst")
    return mb, f"{regime} (kernel dirty limit {limit or float('nan'):.0f} MB)"


def cpu_seconds() -> float:
    """CPU time of this process, all threads: a writer's work, whatever the disk does."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def report(codec: str, raw: float, compression: float, cached: dict, durable: dict,
           cpu: dict) -> None:
    """One line per writer: MB/s, durable MB/s over numpy.save's (the target's ratio), and
    CPU seconds per GB (all threads), which the disk's moods do not touch."""
    cache = {k: raw / statistics.median(v) for k, v in cached.items()}
    rate = {k: raw / statistics.median(v) for k, v in durable.items()}
    print(f"  {codec} (compression {compression:.2f}x)")
    for key in rate:
        print(f"    {key:14s} cached {cache[key]:7.1f} MB/s | durable {rate[key]:7.1f} MB/s, "
              f"/ numpy.save {rate[key] / rate['npy']:5.2f} | CPU "
              f"{statistics.median(cpu[key]) / raw * 1e3:5.2f} s/GB",
              flush=True)


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", help="take activations from this store")
    ap.add_argument("--model", default="tiny-random",
                    help="without --store, materialize a block of this model: tiny-random, "
                         "sd14 (SD v1.4 architecture, random weights) or a folder")
    ap.add_argument("--size", type=int, default=None, help="image side (default native)")
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--mb", type=float, default=None,
                    help="raw MB written per run (default: sustained, 1.5 x the kernel's "
                         "dirty-page limit)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--codecs", default=",".join(CODEC_NAMES))
    return ap


def main() -> None:
    args = build_parser().parse_args()
    blocks = source_blocks(args.store, args.block, args.model, args.size)
    raw_block = sum(a.nbytes for a in blocks.values())
    parent = os.environ.get("BENCH_DIR", ".")
    mb, regime = run_size_mb(args.mb, parent)
    work = tempfile.mkdtemp(dir=parent, prefix="bench-write-")
    copies = max(1, int(mb * 1e6 // raw_block))
    raw = raw_block * copies / 1e6
    print(f"{len(blocks)} layers, block of {args.block} images = {raw_block / 1e6:.2f} MB; "
          f"{copies} blocks per run = {raw:.0f} MB raw; {regime}; dir {work}")
    try:
        for codec in args.codecs.split(","):
            create_zarr(f"{work}/z", blocks, copies, codec)
            encode = bound_encoder(f"{work}/z", next(iter(blocks)))
            writers = {"npy": lambda p: write_npy(p, blocks, copies),
                       "store": lambda p: write_zarr(p, blocks, copies)}
            if encode is not None:
                writers["bound"] = lambda p: write_bound(p, blocks, copies, encode)
            cached: dict[str, list[float]] = {k: [] for k in writers}
            durable: dict[str, list[float]] = {k: [] for k in writers}
            cpu: dict[str, list[float]] = {k: [] for k in writers}
            names = list(writers)
            for rep in range(args.repeats + 1):  # round 0 warms the page cache and allocator
                # rotate the order each round: a writer's speed depends on what ran before
                # it (page cache and memory left behind), by up to 25% on this machine
                for key in names[rep % len(names):] + names[:rep % len(names)]:
                    write = writers[key]
                    path = f"{work}/{key}"
                    shutil.rmtree(path, ignore_errors=True)
                    if key == "store":
                        create_zarr(path, blocks, copies, codec)
                    os.sync()
                    c, t = cpu_seconds(), time.perf_counter()
                    write(path)
                    dt, dc = time.perf_counter() - t, cpu_seconds() - c
                    os.sync()
                    if rep:
                        cached[key].append(dt)
                        durable[key].append(time.perf_counter() - t)
                        cpu[key].append(dc)
                    if key == "store":
                        stored = disk_bytes(path)
                    shutil.rmtree(path)  # one run's bytes on disk at a time
            report(codec, raw, raw * 1e6 / stored, cached, durable, cpu)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
