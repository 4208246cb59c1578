"""Shared fixtures: one small reference store, built once per test session."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from alone import pytest_runtest_protocol  # noqa: F401 - a hook: `alone` tests

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "prompts" / "demo.csv")
# Small but real: every layer, every step, 16 images in 4 blocks.
TINY = {"steps": 4, "batch_size": 4, "block_size": 4}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# A suite started in the background by a non-interactive shell (`bash scripts/test.sh &`,
# nohup, a CI step's subshell) inherits SIGINT ignored, as POSIX has asynchronous lists
# ignore it, and so would every command a test starts: the Ctrl-C tests (test_interrupt)
# need the disposition a terminal gives, whatever started the suite.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# Tests run in parallel processes (pytest-xdist, `bash scripts/test.sh` runs 3, by file;
# `bash scripts/test.sh -n 0` runs them one by one): each has a Prefect home
# of its own, set before Prefect is imported, so the temporary servers of commands run at
# once in two of them never share one SQLite database (nor migrate a new one together).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["PREFECT_HOME"] = str(
        Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
        / f"xdist-{os.environ['PYTEST_XDIST_WORKER']}")


@pytest.fixture(scope="session")
def tiny_model():
    from actstore.generation.models import load_model

    return load_model("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_model) -> str:
    """The uninterrupted reference run every resumed or concurrent run is compared with."""
    from actstore.generation.sampling import GenerationConfig
    from actstore.generation.materialize import MaterializeSettings, materialize

    uri = str(tmp_path_factory.mktemp("ref") / "ref.zarr")
    materialize(tiny_model, DEMO, uri,
                MaterializeSettings(gen=GenerationConfig(steps=TINY["steps"]),
                                    batch_size=TINY["batch_size"],
                                    block_size=TINY["block_size"]),
                progress=False)
    return uri


def store_catalog(folder: Path, uri: str, name: str = "iv") -> str:
    """A catalog.yaml in ``folder`` naming store ``uri`` ``name``; its path, for --catalog."""
    path = folder / "catalog.yaml"
    path.write_text("models:\n  tiny:\n    builtin: tiny-random\n"
                    f"prompt_sets:\n  demo:\n    path: {DEMO}\n"
                    f"stores:\n  {name}:\n    uri: {uri}\n    model: tiny\n    prompts: demo\n",
                    encoding="utf-8")
    return str(path)


def cli(*args: str, timeout: float = 600, env: dict | None = None,
        **popen) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh process, as a user would."""
    cmd = [sys.executable, "-m", "flows.cli", "--no-prefect", "--quiet", "--json", *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=REPO, **popen)


def tree_digest(path: str | Path) -> dict[str, str]:
    """sha256 of every file under ``path``: 'nothing stored changed' made checkable."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def store_arrays(uri: str, model: str = "trained") -> dict:
    """Every array of a model variant (capture points of every kind), fully read, by path."""
    import zarr

    group = zarr.open_group(uri, path=f"models/{model}", mode="r")
    return {path: arr[...] for path, arr in group.members(max_depth=None)
            if isinstance(arr, zarr.Array)}


def plant_a_mismatch(uri: str, model: str = "trained") -> None:
    """Change one stored byte of the first final image, so regenerating its block fails on
    every machine: a failure that does not hang on how this CPU's kernels round."""
    import zarr

    final = zarr.open_array(uri, path=f"models/{model}/final_image", mode="r+")
    final[0, 0, 0, 0] = (int(final[0, 0, 0, 0]) + 9) % 256


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (starting one costs seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


EXPLORE_LAYERS = ["up_blocks.3.attentions.0", "up_blocks.2.attentions.0"]


@pytest.fixture(scope="session")
def explore_store(tmp_path_factory, tiny_store) -> str:
    """The reference store with what a reader opens next: toy-labeler labels (salient,
    depth), a probe run per target on two layers (every step, emergence table) and one
    finished projection intervention. Built from the code of this checkout, so the report
    and notebook tests can never read a stale store."""
    import shutil

    from actstore.intervene.run import run_interventions
    from actstore.label.labels import write_labels
    from actstore.probe.runs import run_probes

    uri = str(tmp_path_factory.mktemp("explore") / "store.zarr")
    shutil.copytree(tiny_store, uri)
    write_labels(uri, "toyworld", ["salient", "depth"], progress=False)
    runs = {t: run_probes(uri, t, layers=EXPLORE_LAYERS, scheduler="threads", progress=False)
            for t in ("salient", "depth")}
    from actstore.intervene.settings import InterventionSettings

    run_interventions(uri, runs["salient"],
                      InterventionSettings(layers=EXPLORE_LAYERS, steps=[0, 1],
                                           images=["demo-012", "demo-013"], n_targets=1),
                      progress=False)
    return uri


# Object storage: a real S3 API on loopback (moto's server mode), one per test session.
S3_KEY_ID = "actstore-test-key-id"
S3_SECRET = "actstore-test-secret-5f3c9e1b"   # grepped for: must never reach a store or log


@pytest.fixture(scope="session")
def s3_server():
    """Start moto's S3 server on a free loopback port and point the standard AWS
    environment at it (credentials, endpoint, region) for this process and its children."""
    import logging

    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def bucket(s3_server) -> str:
    """A fresh, empty bucket for one test."""
    import uuid

    import fsspec

    name = f"test-{uuid.uuid4().hex[:16]}"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(name)
    return name


# --- interventions: the reference store with pixel labels and small probe runs ---------

IV_LAYERS = ["up_blocks.3.attentions.0", "up_blocks.2.attentions.0"]   # 8x8 and 4x4 tokens
IV_STEPS = [0, 1]


class PixelLabels:
    """A label model that reads pixels (so it can read intervened images): brightness as
    'depth', brighter-than-average as 'salient'."""

    name = "pixel"
    spec = "pixel-test"
    targets = {"salient": "binary", "depth": "continuous"}

    def __call__(self, images):
        import numpy as np

        g = images.astype(np.float32).mean(-1) / 255
        return {"depth": g,
                "salient": (g > g.mean(axis=(1, 2), keepdims=True)).astype(np.float32)}


@pytest.fixture(scope="session")
def ivstore(tmp_path_factory, tiny_store):
    """The reference store + pixel labels + a probe run per target on two layers × steps."""
    import shutil

    from actstore.label.labels import write_labels
    from actstore.probe.runs import run_probes

    uri = str(tmp_path_factory.mktemp("iv") / "s.zarr")
    shutil.copytree(tiny_store, uri)
    for target in ("salient", "depth"):
        write_labels(uri, PixelLabels(), target, on_x0=False, progress=False)
    runs = {t: run_probes(uri, t, layers=IV_LAYERS, steps=IV_STEPS, scheduler="threads",
                          progress=False) for t in ("salient", "depth")}
    return {"uri": uri, "runs": runs}


def iv_cli(argv: list[str]):
    """``actstore intervene|sweep`` parsed as the command line does (no Prefect): a sweep's
    parsed arguments, or an intervention's result."""
    import argparse

    from flows.cli_intervene import add_intervene_parser, intervene_command

    parser = argparse.ArgumentParser()
    parser.add_argument("--no-prefect", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    add_intervene_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["--no-prefect", "--quiet", *argv])
    return args if argv[0] == "sweep" else intervene_command(args, None)


def small_experiment(ivstore: dict, folder: Path):
    """A copy of the intervention store, its depth probe run, and the settings of a
    two-image, one-target, strength-1 experiment on it (labels read by PixelLabels)."""
    import shutil

    from actstore.intervene.settings import InterventionSettings

    uri = str(folder / "copy.zarr")
    shutil.copytree(ivstore["uri"], uri)
    return uri, ivstore["runs"]["depth"], InterventionSettings(
        layers=IV_LAYERS, steps=IV_STEPS, images=("demo-012", "demo-013"), n_targets=1,
        strengths=(1.0,), provider=PixelLabels())
