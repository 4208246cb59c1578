"""What hashing the weights would add to ``materialize``'s early check of a stored variant.

The command compares a rerun's settings with the variant's fingerprint before a cluster
or a model starts (``check_stored_settings``): everything but ``weights_sha256``, a sha256
over the weight tensors as loaded (state-dict names, load dtype). Checking the weights
there too means hashing them in the command. This times, rotated on one store, the check
as it is and the check plus the hash the fingerprint holds (``load_model`` +
``weights_hash``, the only way to get that value), for a model folder (default the toy
LDM); and sha256 over a ``--gib`` GiB file (read from the page cache, i.e. hashing only),
to put SD v1.4's 3.97 GiB of float32 weights (unet 859.5 M, VAE 83.7 M, text encoder
123.1 M parameters) on the same scale.

    python benchmarks/bench_weights_check.py [--model models/toy-ldm] [--repeats 5] [--gib 1]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actstore.generation.fingerprint import check_stored_settings  # noqa: E402
from actstore.generation.materialize import MaterializeSettings, materialize  # noqa: E402
from actstore.generation.models import load_model  # noqa: E402

SD14_GIB = (859.52e6 + 83.65e6 + 123.06e6) * 4 / 2**30   # float32 parameters, GiB


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _sha256_file(path: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)


def bench(model: str, repeats: int, gib: float) -> dict:
    settings = MaterializeSettings(batch_size=4, block_size=4).with_options(steps=2)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "s.zarr")
        materialize(model, str(ROOT / "prompts" / "toyworld.csv"), store, settings, images="0:4",
                    progress=False)
        plain, hashed = [], []
        for _ in range(repeats):        # rotated: load hits both alike
            plain.append(_timed(lambda: check_stored_settings(store, model, settings)))
            hashed.append(_timed(lambda: (check_stored_settings(store, model, settings),
                                          load_model(model, device="cpu").weights_hash)))
        big = os.path.join(tmp, "weights.bin")
        with open(big, "wb") as f:
            for _ in range(int(gib * 64)):
                f.write(os.urandom(1 << 24))
        _sha256_file(big)               # into the page cache
        sha = statistics.median(_timed(lambda: _sha256_file(big)) for _ in range(repeats))
    check, with_hash = statistics.median(plain), statistics.median(hashed)
    rate = gib / sha
    return {"model": model, "check_s": round(check, 4), "check_with_hash_s": round(with_hash, 3),
            "ratio": round(with_hash / check, 1), "sha256_gib_per_s": round(rate, 3),
            "sd14_hash_only_s": round(SD14_GIB / rate, 1),
            "load_average": os.getloadavg()[0]}


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "toy-ldm"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gib", type=float, default=1.0)
    return p


def main() -> None:
    a = build_parser().parse_args()
    print(bench(a.model, a.repeats, a.gib))


if __name__ == "__main__":
    main()
