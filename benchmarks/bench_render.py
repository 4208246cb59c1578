"""Render throughput of the toy world (scenes per minute on one core).

Run: python benchmarks/bench_render.py [--n 500] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import time

from actstore.toyworld.render import render_scene


def bench(n: int = 500, size: int = 64) -> dict:
    render_scene(0, size)  # warm-up (imports, first allocation)
    t0 = time.perf_counter()
    for s in range(n):
        render_scene(s, size)
    dt = time.perf_counter() - t0
    return {"n": n, "size": size, "ms_per_scene": 1000 * dt / n, "scenes_per_minute": 60 * n / dt}


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--size", type=int, default=64)
    return p


def main() -> None:
    a = build_parser().parse_args()
    print(json.dumps(bench(a.n, a.size)))


if __name__ == "__main__":
    main()
