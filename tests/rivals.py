"""``python -m rivals ROLE BASE T0 ROUNDS OUT``: one creator process of tests/test_claims.py.

In round ``i`` it waits until wall-clock ``T0 + i * GAP`` (every process of the test waits
for the same instants: a barrier across processes), then creates store ``BASE/r<i>.zarr``
(its root and a model variant, or only the root) with the settings of ``ROLE``, and
appends one JSON line per round to ``OUT``: ``{"round", "ok", "error"}``.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pandas as pd

from actstore.errors import ActstoreError
from actstore.generation.pointnames import CapturePoint
from actstore.store import core as st

GAP = 1.0
LAYERS = [CapturePoint(f"up.{i}", "attn1", f"up.{i}", "up", 4, 4, 8) for i in range(6)]
# Two settings that differ in what the arrays hold (steps change every array's shape).
ROLES = {"a": {"steps": 2, "prompts": "cat"}, "b": {"steps": 3, "prompts": "dog"}}


def table(word: str) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"i{k}" for k in range(6)],
                         "prompt": [f"a {word} {k}" for k in range(6)],
                         "seed": np.arange(6), "split": ["train"] * 3 + ["test"] * 3})


def create(uri: str, role: str, what: str) -> None:
    """The creation every materialize run does, with ``role``'s settings."""
    spec = ROLES[role]
    prompts = table(spec["prompts"] if what == "root" else "cat")
    st.create_or_check_root(uri, prompts, f"sha-{prompts['prompt'][0]}", 4)
    if what == "root":
        return
    n = spec["steps"]
    fingerprint = {"generation": {"steps": n}, "layers": [la.name for la in LAYERS]}
    st.check_or_create_model(uri, "trained", fingerprint=fingerprint,
                             provenance={"created": "now"}, layers=LAYERS, n_steps=n,
                             image_hw=(8, 8),
                             step_coords={"timestep": np.arange(n, dtype=np.float32)},
                             codec="zstd", store_dtype="float16")


def main(role: str, base: str, t0: float, rounds: int, out: str, what: str) -> None:
    for i in range(rounds):
        time.sleep(max(0.0, t0 + i * GAP - time.time()))
        try:
            create(f"{base}/r{i}.zarr", role, what)
            result = {"round": i, "ok": True, "error": None}
        except ActstoreError as exc:
            result = {"round": i, "ok": False, "error": str(exc)}
        with open(out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
         sys.argv[6])
