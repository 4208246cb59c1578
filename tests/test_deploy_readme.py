"""The README's deployment lines, run as written: a real ``dask scheduler`` and ``dask
worker`` pair on loopback, ``prefect work-pool create`` / ``deploy`` / ``worker start``
against the suite's Prefect API, the ``--cluster`` command and the ``fan-out`` deployment
writing to ``s3://`` (moto's server), plus the ``nightly-toy`` run ``prefect.yaml`` names;
each store then complete and equal, object by object, to a serial run on local disk.

The lines run through ``bash`` from a folder shaped like the repository root (its
``prefect.yaml``, ``flows/``, ``models/toy-ldm``; ``prompts/toyworld.csv`` cut to two
blocks), with ``$HOME`` holding a tiny ``~/sd-v1-4`` and ``p.csv`` beside it. Substituted,
as tests/test_readme.py does: the scheduler's address (loopback, a free port), the bucket.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from actstore.generation.materialize import MaterializeSettings, completion, materialize
from actstore.generation.models import load_model, save_pipeline_folder, tiny_random_components
from actstore.generation.sampling import GenerationConfig
from conftest import REPO
from storecheck import assert_same_store

pytestmark = pytest.mark.usefixtures("s3_server", "prefect_harness")
BIN = Path(sys.executable).parent
N_TRAIN, N_TEST = 4, 4
# README deployment lines, in order -> what runs instead (None: the line itself); every
# tcp://HEAD:8786 becomes the scheduler's address, bkt a fresh bucket.
SCHEDULER = "dask scheduler"
DASK_WORKER = "CUDA_VISIBLE_DEVICES=0 dask worker tcp://HEAD:8786 --nthreads 1 --resources GPU=1"
LINES = {
    SCHEDULER: "dask scheduler --host 127.0.0.1 --port 0 --dashboard-address 127.0.0.1:0",
    DASK_WORKER: None,
    "actstore materialize --store s3://bkt/p.zarr --model ~/sd-v1-4 --prompts p.csv "
    "--cluster tcp://HEAD:8786": None,
    "prefect work-pool create actstore-local --type process": None,
    "prefect deploy --all": None,
    "prefect worker start --pool actstore-local": None,
    "prefect deployment run materialize/fan-out -p cluster=tcp://HEAD:8786 "
    "-p store=s3://bkt/toy.zarr": None,
}
BACKGROUND = {SCHEDULER: "scheduler.log", DASK_WORKER: "dask-worker.log",
              "prefect worker start --pool actstore-local": "prefect-worker.log"}
NIGHTLY = "prefect deployment run materialize/nightly-toy"  # prefect.yaml's own comment


def deployment_lines() -> list[str]:
    """The README's bash lines under 'Deployment' that run a program, comments cut."""
    section = README_TEXT.split("## Deployment", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [" ".join(re.sub(r"\s#.*$", "", line).split())
             for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line]


README_TEXT = (REPO / "README.md").read_text(encoding="utf-8")


def test_every_deployment_line_has_a_case():
    assert deployment_lines() == list(LINES), "README deployment lines changed: update LINES"
    assert NIGHTLY in (REPO / "prefect.yaml").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A checkout's root as `prefect deploy` sees it, and a user's $HOME."""
    root = tmp_path_factory.mktemp("deploy").resolve()
    repo = root / "repo"
    (repo / "prompts").mkdir(parents=True)
    (repo / "models").mkdir()
    shutil.copy(REPO / "prefect.yaml", repo)
    (repo / "flows").symlink_to(REPO / "flows")
    (repo / "models" / "toy-ldm").symlink_to(REPO / "models" / "toy-ldm")
    toy = pd.read_csv(REPO / "prompts" / "toyworld.csv")
    small = pd.concat([toy[toy.split == "train"][:N_TRAIN], toy[toy.split == "test"][:N_TEST]])
    small.to_csv(repo / "prompts" / "toyworld.csv", index=False)
    small.to_csv(repo / "p.csv", index=False)
    save_pipeline_folder(root / "home" / "sd-v1-4", tiny_random_components())
    return repo


def _env(folder: Path, s3_server: dict) -> dict:
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "PWD"}
    return {**env, **s3_server, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "HOME": str(folder.parent / "home"), "PYTHONPATH": str(REPO),
            "PREFECT_HOME": str(folder.parent / "prefect-home"),
            "PREFECT_API_URL": PREFECT_API_URL.value(),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


class Shell:
    """Lines run by bash in the repository folder; background ones killed at the end."""

    def __init__(self, folder: Path, env: dict, subst: dict[str, str]):
        self.folder, self.env, self.subst, self.procs = folder, env, subst, []

    def line(self, text: str) -> str:
        for old, new in self.subst.items():
            text = text.replace(old, new)
        return text

    def run(self, text: str, timeout: float = 300) -> str:
        done = subprocess.run(["bash", "-c", self.line(text)], cwd=self.folder, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, (text, done.stdout[-2000:], done.stderr[-3000:])
        return done.stdout + done.stderr

    def start(self, text: str, log: str) -> Path:
        path = self.folder.parent / log
        with open(path, "w") as out:
            self.procs.append(subprocess.Popen(["bash", "-c", self.line(text)],
                                               cwd=self.folder, env=self.env, stdout=out,
                                               stderr=subprocess.STDOUT,
                                               start_new_session=True))
        return path

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_for(pattern: str, log: Path, timeout: float = 120) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m := re.search(pattern, log.read_text(errors="replace")):
            return m
        time.sleep(0.5)
    pytest.fail(f"{log.name}: no {pattern!r} within {timeout} s:\n{log.read_text()[-3000:]}")


def _wait_flow_run(flow_run_id: str, timeout: float = 900) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and state.is_final():
                assert state.is_completed(), (state.name, state.message)
                return
            time.sleep(1)
    pytest.fail(f"flow run {flow_run_id} not finished within {timeout} s")


def _complete(store: str) -> None:
    counts = completion(store)
    assert counts["trained"]["complete"] == counts["trained"]["images"] == N_TRAIN + N_TEST


def test_readme_deployment_lines_fill_stores_equal_to_serial_runs(folder, s3_server,
                                                                   tmp_path):
    bucket = f"bkt-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
    shell = Shell(folder, _env(folder, s3_server), {"s3://bkt/": f"s3://{bucket}/"})
    try:
        outputs = {}
        for text in LINES:
            line = LINES[text] or text
            if text == SCHEDULER:
                log = shell.start(line, BACKGROUND[text])
                addr = _wait_for(r"Scheduler at:\s+(tcp://127\.0\.0\.1:\d+)", log).group(1)
                shell.subst["tcp://HEAD:8786"] = addr
            elif text in BACKGROUND:
                log = shell.start(line, BACKGROUND[text])
                if text == DASK_WORKER:
                    _wait_for(r"Registered to:", log)
            else:
                outputs[text] = shell.run(line)
        flow_runs = [re.search(r"UUID: ([0-9a-f-]{36})", outputs[text]).group(1)
                     for text in LINES if text.startswith("prefect deployment run")]
        flow_runs.append(re.search(r"UUID: ([0-9a-f-]{36})", shell.run(NIGHTLY)).group(1))
        for flow_run in flow_runs:
            _wait_flow_run(flow_run)
    finally:
        shell.stop()
    assert all(proc.poll() is not None for proc in shell.procs)

    # The --cluster line: tiny SD on p.csv at the defaults, as the serial library writes it.
    ref = str(tmp_path / "p.zarr")
    materialize(load_model(str(folder.parent / "home" / "sd-v1-4"), device="cpu"),
                str(folder / "p.csv"), ref, MaterializeSettings(), progress=False)
    _complete(f"s3://{bucket}/p.zarr")
    assert_same_store(f"s3://{bucket}/p.zarr", ref)

    # Both deployments: toy-ldm on prompts/toyworld.csv, 15 steps at guidance 3.
    ref = str(tmp_path / "toy.zarr")
    materialize(load_model(str(folder / "models" / "toy-ldm"), device="auto"),
                str(folder / "prompts" / "toyworld.csv"), ref,
                MaterializeSettings(gen=GenerationConfig(steps=15, guidance=3), device="auto"),
                progress=False)
    for store in (f"s3://{bucket}/toy.zarr", str(folder / "runs" / "toy.zarr")):
        _complete(store)
        assert_same_store(store, ref)
