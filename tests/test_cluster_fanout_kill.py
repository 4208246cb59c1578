"""``label --cluster`` and ``intervene --cluster`` whose only worker is killed mid-run (kill
-9, no nanny to restart it): after the grace period (``ACTSTORE_WORKER_GRACE``) the command
ends in one line, exit 2, nothing is written after it, the blocks its tasks recorded stay,
and the same command completes the run once a worker is back (materialize and the probe
grid: test_cluster_workers). Real ``dask scheduler`` / ``dask worker`` subprocesses."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEMO, REPO, tree_digest
from test_cli import api, run  # noqa: F401 - a fixture
from test_cluster_workers import GRACE, finish, lines_of, user_cluster, wait_until  # noqa: F401
from test_interrupt import inside

# Two blocks, each with a test image; enough steps that a block's pass 2 (its x0 images)
# and its interventions take seconds.
ROWS = ["demo-000", "demo-010", "demo-001", "demo-002", "demo-003", "demo-011", "demo-004",
        "demo-005"]
STEPS = 100
LAYER = "up_blocks.3.attentions.0"   # 8x8 tokens: both classes in its train labels, so its
# probe has weights to edit along (a one-class point's zero-weight probe is refused)


@pytest.fixture(scope="module")
def long_store(tmp_path_factory, tiny_model) -> str:
    from actstore.generation.materialize import MaterializeSettings, materialize
    from actstore.generation.sampling import GenerationConfig

    tmp = tmp_path_factory.mktemp("long")
    with open(DEMO, newline="") as f:
        rows = {row["image_id"]: row for row in csv.DictReader(f)}
    prompts = tmp / "eight.csv"
    with open(prompts, "w", newline="") as f:
        table = csv.DictWriter(f, fieldnames=list(rows[ROWS[0]]))
        table.writeheader()
        table.writerows(rows[i] for i in ROWS)
    uri = str(tmp / "s.zarr")
    materialize(tiny_model, str(prompts), uri,
                MaterializeSettings(gen=GenerationConfig(steps=STEPS), batch_size=4,
                                    block_size=4), progress=False)
    return uri


def start(api: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": api,
                                 "ACTSTORE_WORKER_GRACE": str(GRACE)})


def ends_in_one_line(cli: subprocess.Popen, store: Path, name: str, address: str) -> None:
    """The command, its only worker just killed: one line within the grace period and some
    seconds, exit 2; nothing written after it."""
    out, err, took = finish(cli, GRACE + 60)
    assert took < GRACE + 30, took
    lines = lines_of(err)
    assert cli.returncode == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"actstore {name}: error: "), lines[0]
    assert f"the Dask scheduler {address} has had no worker" in lines[0], lines[0]
    assert "what they recorded is kept" in lines[0] and "rerun the same command" in lines[0]
    at_exit = tree_digest(store)
    time.sleep(2)
    assert tree_digest(store) == at_exit


def records(store: Path, pattern: str) -> set[str]:
    """The block records under ``pattern`` (a record's folder exists before its one PUT)."""
    return {str(p.relative_to(store).parent) for p in store.glob(f"{pattern}/zarr.json")}


def test_label_whose_only_worker_is_killed_ends_in_one_line_and_a_rerun_resumes(
        tmp_path, user_cluster, api, long_store):
    from distributed import Client

    from actstore.store import labelsets

    store = tmp_path / "s.zarr"
    shutil.copytree(long_store, store)
    worker = user_cluster.worker()
    user_cluster.wait_for(1)
    args = ("label", "--store", str(store), "--provider", "toyworld", "--target", "salient",
            "--cluster", user_cluster.address)
    cli = start(api, *args)
    with Client(user_cluster.address, timeout=30) as client:
        wait_until(lambda: any(client.run(inside("final_block")).values()), cli,
                   "pass 2 running")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    pass1 = records(store, "labels/salient/*/_pass1/_blocks/*")
    assert len(pass1) == 2, pass1                     # pass 1 was done
    done = records(store, "labels/salient/*/_pass*/_blocks/*")
    ends_in_one_line(cli, store, "label", user_cluster.address)
    assert records(store, "labels/salient/*/_pass*/_blocks/*") == done   # kept
    assert labelsets.current(str(store)) == {}                           # nothing committed
    (version,) = {p.split("/")[2] for p in pass1}
    user_cluster.worker()
    user_cluster.wait_for(1)
    again = run("--json", *args, api=api, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    out = json.loads(again.stdout.split("\n\n")[0])
    assert out["blocks_resumed"]["pass1"] == 2, out
    assert labelsets.current(str(store))["salient"]["version"] == version


def test_intervene_whose_only_worker_is_killed_ends_in_one_line_and_a_rerun_completes(
        tmp_path, user_cluster, api, long_store):
    from actstore.label.labels import write_labels
    from actstore.probe.runs import run_probes

    store = tmp_path / "s.zarr"
    shutil.copytree(long_store, store)
    write_labels(str(store), "toyworld", "salient", on_x0=False, progress=False)
    probe_run = run_probes(str(store), "salient", layers=[LAYER], steps=[0],
                           scheduler="threads", progress=False)
    worker = user_cluster.worker()
    user_cluster.wait_for(1)
    args = ("intervene", "--store", str(store), "--probe-run", probe_run, "--layers", LAYER,
            "--steps", "0", "--n-targets", "1", "--cluster", user_cluster.address)
    cli = start(api, *args)
    wait_until(lambda: records(store, "interventions/*/_blocks/*"), cli,
               "a first recorded block")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    recorded = records(store, "interventions/*/_blocks/*")
    assert len(recorded) == 1, recorded                 # one of the two blocks
    ends_in_one_line(cli, store, "intervene", user_cluster.address)
    assert records(store, "interventions/*/_blocks/*") == recorded
    user_cluster.worker()
    user_cluster.wait_for(1)
    again = run("--json", *args, api=api, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    out = json.loads(again.stdout.split("\n\n")[0])
    assert out["complete"] and out["blocks_written"] == 1, out
    assert len(records(store, "interventions/*/_blocks/*")) == 2
