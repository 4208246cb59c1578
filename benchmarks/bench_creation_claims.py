"""What a creator's look at its claim costs per creation write.

A creator checks, before each write and removal of a creation, that its claim's birth
record is still there (one small read: ``claims._held``), so one taken for gone while it
lived stops instead of writing into what a rerun created. This times the same creation
(a store's root with its image table, then a model variant with ``--layers`` capture
points: array metadata, layer groups, step coordinates) with the look before every write
and without it, on fresh stores, alternating, and reports medians: per write, the write's
own cost and the look's. ``--s3`` runs it against moto's S3 server on loopback (started
here, as the tests start it), the local disk otherwise.

    python benchmarks/bench_creation_claims.py                  # local disk, 64 layers
    python benchmarks/bench_creation_claims.py --s3 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

from actstore.generation.pointnames import CapturePoint  # noqa: E402
from actstore.store import claims, io  # noqa: E402
from actstore.store import core as st  # noqa: E402
from rivals import table  # noqa: E402


def create(uri: str, layers: list[CapturePoint], steps: int = 2) -> None:
    """The writes a materialize run's creation makes, in its order, with no claim."""
    prompts = table("cat")
    st._create_root(uri, prompts, {"prompts_sha256": "sha", "block_size": 4})
    st._create_model(uri, "trained", {"generation": {"steps": steps}}, {"created": "now"},
                     layers, steps, (8, 8), {"timestep": np.arange(steps, dtype=np.float32)},
                     "zstd", "float16", False)


def timed(uri: str, layers: list[CapturePoint], guarded: bool) -> tuple[float, int]:
    """Seconds for one creation, and how many writes it made (the looks, when guarded)."""
    count = [0]
    if guarded:
        mine = f"{claims.claims_path('')}/claim-bench"
        io.put_group(uri, f"{mine}/{claims.BORN}", {claims.CLAIM_KEY: {}})
        held = partial(claims._held, uri, mine, "this store")

        def look() -> None:
            count[0] += 1
            held()
    else:
        def look() -> None:
            count[0] += 1
    t0 = time.perf_counter()
    with io.guarded(look):
        create(uri, layers)
    return time.perf_counter() - t0, count[0]


def s3_base() -> tuple[str, object]:
    import logging

    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_DEFAULT_REGION="us-east-1")
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}", server


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--s3", action="store_true")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    layers = [CapturePoint(f"up.{i}", "attn1", f"up.{i}", "up", 4, 4, 8)
              for i in range(args.layers)]
    server = None
    if args.s3:
        base, server = s3_base()
    else:
        base = tempfile.mkdtemp(prefix="bench-claims-")
    try:
        runs = {False: [], True: []}
        writes = 0
        for i in range(args.repeats + 1):
            for guarded in ((False, True) if i % 2 else (True, False)):
                seconds, writes = timed(f"{base}/s{i}-{int(guarded)}.zarr", layers, guarded)
                if i:   # the first round warms up
                    runs[guarded].append(seconds)
    finally:
        if server is not None:
            server.stop()
    plain, looked = (statistics.median(runs[g]) for g in (False, True))
    where = "moto S3 server (loopback)" if args.s3 else "local disk"
    print(f"{where}: root + variant of {args.layers} layers, {writes} creation writes, "
          f"median of {args.repeats}")
    print(f"  without looks {plain * 1e3:8.1f} ms  ({plain / writes * 1e3:.3f} ms a write)")
    print(f"  with looks    {looked * 1e3:8.1f} ms  (+{(looked - plain) / writes * 1e3:.3f} ms "
          f"a write, +{(looked / plain - 1) * 100:.0f}%)")


if __name__ == "__main__":
    main()
