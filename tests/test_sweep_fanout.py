"""A sweep's cells fanned out as ``intervene``'s experiments are (``sweep --workers N |
--cluster ADDRESS``): on a real 2-process Dask cluster, from the command line with
``--workers 2`` and with ``--cluster`` on ``dask scheduler``/``dask worker`` processes
started as a user starts them, the store ends up as the in-process sweep leaves it, object by object
(the sweep record, every cell's and the evaluation's arrays and attributes), resuming a
sweep killed in its first cell (a command killed with its workers, on the command
line); each cell's blocks get the fan-out's bar; a bad
``--workers`` or ``--cluster`` is one line, exit 2, the store unchanged, and so is a probe
run, image set or cell the store cannot give, before the command's flow starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actstore.intervene.plan import plan_interventions
from actstore.intervene.results import completed_blocks
from actstore.intervene.run import begin_experiment, run_blocks
from actstore.intervene.settings import InterventionSettings as IS, SweepSettings
from actstore.intervene.sweep import list_sweeps, plan_sweep, run_sweep
from actstore.intervene.tables import format_cells, format_sweeps
from conftest import REPO, tree_digest
from flows.cli_report import summary
from storecheck import assert_same_store
from test_cli import one_line, run
from test_cluster_workers import UserCluster, user_cluster  # noqa: F401 - a fixture
from test_intervene_fanout import cluster, probed  # noqa: F401 - fixtures

# Two cells (steps 0, steps 0-1) × two strengths on the first 3 test images (store blocks
# 8:12 and 12:16, so each cell is two block groups), the chosen one on the last 3; a cap no
# edit of the tiny model reaches, so a setting is chosen and evaluated.
SETTINGS = SweepSettings(kinds=("attn1",), step_counts=(1, 2), strengths=(0.5, 1.0),
                         validation=3, evaluation=3, max_edit_size=1e6,
                         base=IS(n_targets=2, device="cpu"))
ARGS = ["--kinds", "attn1", "--step-counts", "1", "2", "--strength", "0.5", "1",
        "--validation", "3", "--evaluation", "3", "--max-edit-size", "1e6",
        "--n-targets", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def api(prefect_harness) -> str:
    """The session's Prefect API, for the command-line subprocesses."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The in-process sweep and each worker with one torch thread: conv sums depend on it."""
    monkeypatch.setenv("ACTSTORE_THREADS", "1")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, probed):  # noqa: F811
    """``intervene``'s fan-out store (labelled by a label model workers load by name,
    toyworld; a probe run on two decoder points) and a copy swept in process: (store, swept
    copy, run, record, seconds the in-process sweep took)."""
    uri, _, rid = probed
    serial = str(tmp_path_factory.mktemp("swfan") / "serial.zarr")
    shutil.copytree(uri, serial)
    with pytest.MonkeyPatch.context() as env:   # a value set before the tests is put back
        env.setenv("ACTSTORE_THREADS", "1")
        t0 = time.perf_counter()
        rec = run_sweep(serial, [rid], SETTINGS, progress=False)["targets"]["salient"]
        seconds = time.perf_counter() - t0
    assert rec["evaluation"] is not None and len(rec["experiments"]) == 2
    return uri, serial, rid, rec, seconds


def _kill_in_first_cell(uri: str, rid: str) -> tuple[str, dict]:
    """What a sweep killed in its first cell leaves: that experiment created, one of its
    blocks recorded; (its id, the block records' bytes)."""
    plan = plan_sweep(uri, [rid], SETTINGS)
    cell = plan.cells[rid][0]
    first = SETTINGS.base.with_(layers=tuple(cell["layers"]), steps=tuple(cell["steps"]),
                                strengths=SETTINGS.strengths, images=tuple(plan.validation))
    exp = begin_experiment(plan_interventions(uri, rid, first,
                                              provenance={"role": "sweep validation"}))
    run_blocks(exp, exp.pending()[:1])
    return exp.plan.experiment_id, _records(uri, exp.plan.experiment_id)


def _records(uri: str, experiment_id: str) -> dict:
    """{block: its completion record's bytes}; they hold the time the block was written."""
    from actstore.intervene.results import group_path

    return {f.parent.name: f.read_bytes() for f in
            Path(uri, group_path(experiment_id), "_blocks").glob("*/zarr.json")}


def test_sweep_on_a_cluster_resumes_and_equals_in_process(tmp_path, swept, cluster,
                                                          prefect_harness):
    from flows.intervene import sweep_flow

    base, serial, rid, rec, _ = swept
    uri = str(tmp_path / "fan.zarr")
    shutil.copytree(base, uri)
    first, records = _kill_in_first_cell(uri, rid)
    assert first == rec["experiments"][0] and len(completed_blocks(uri, first)) == 1
    assert len(records) == 1
    out = sweep_flow(uri, [rid], SETTINGS, cluster=cluster.scheduler.address, progress=False)
    assert out["workers"] == 2
    table = "\n\n".join([format_cells(out["targets"]), format_sweeps(out["targets"])])
    assert summary("sweep", {**out, "table": table}).splitlines()[0] == \
        f"{uri}: sweeps {rec['sweep_id']} (cells run by 2 workers)"
    got = out["targets"]["salient"]
    assert got["sweep_id"] == rec["sweep_id"] and got["chosen"] == rec["chosen"]
    assert got["cells"] == rec["cells"] and got["result"] == rec["result"]
    after = _records(uri, first)       # the killed sweep's block was kept, not redone
    assert len(after) == 2 and {k: after[k] for k in records} == records
    assert_same_store(uri, serial)
    assert list_sweeps(uri)[rec["sweep_id"]]["evaluation"] == rec["evaluation"]


def test_cli_sweep_workers_killed_then_rerun_equals_in_process(tmp_path, swept, api):
    """``sweep --workers 2`` killed (-9, with its worker processes) once its first cell has
    recorded a block, then the same command again: it resumes, keeping what was recorded,
    and the store is the in-process sweep's."""
    base, serial, rid, rec, in_process = swept
    uri = str(tmp_path / "cli.zarr")
    shutil.copytree(base, uri)
    argv = ["sweep", "--store", uri, "--probe-run", rid, *ARGS, "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": api,
           "ACTSTORE_THREADS": "1"}
    cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "--quiet", *argv], cwd=REPO,
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    first = rec["experiments"][0]
    try:
        deadline = time.monotonic() + 300
        while not _records(uri, first) and cli.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(cli.pid, signal.SIGKILL)     # the command and the workers it started
        cli.wait()
    kept = _records(uri, first)
    assert kept and rec["sweep_id"] not in list_sweeps(uri), "killed too late"
    t0 = time.perf_counter()
    res = run("--json", *argv, api=api, env={"ACTSTORE_THREADS": "1"})
    seconds = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.split("\n\n")[0])
    assert out["workers"] == 2 and out["targets"]["salient"]["sweep_id"] == rec["sweep_id"]
    assert {k: v for k, v in _records(uri, first).items() if k in kept} == kept
    assert_same_store(uri, serial)
    # every experiment's blocks went through the fan-out, with its bar on stderr
    for eid in [*rec["experiments"], rec["evaluation"]]:
        assert f"intervene {eid} (" in res.stderr and "2 workers)" in res.stderr, eid
    print(f"sweep in process {in_process:.1f} s; --workers 2 rerun: command {seconds:.1f} s, "
          f"its sweep {out['targets']['salient']['seconds']:.1f} s")


def test_cli_sweep_on_a_hand_started_cluster_equals_in_process(tmp_path, swept, api,
                                                              user_cluster):
    """``sweep --cluster ADDRESS`` on a scheduler and two workers started as a user starts
    them (``dask scheduler``, ``dask worker``, the checkout on their PYTHONPATH): the store
    equals the in-process sweep's, and no worker loaded the store's model or the label model
    twice for the sweep's three experiments (each keeps them, as docs/interventions.md
    says; before 2026-12-06 a worker loaded the label model again for each experiment)."""
    from distributed import Client

    from actstore.generation.regions import model_loads
    from actstore.label.providers import provider_loads

    base, serial, rid, rec, _ = swept
    uri = str(tmp_path / "user.zarr")
    shutil.copytree(base, uri)
    for _ in range(2):
        user_cluster.worker()
    user_cluster.wait_for(2)
    res = run("--json", "sweep", "--store", uri, "--probe-run", rid, *ARGS, "--cluster",
              user_cluster.address, api=api, env={"ACTSTORE_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.split("\n\n")[0])
    assert out["workers"] == 2 and out["targets"]["salient"]["sweep_id"] == rec["sweep_id"]
    assert_same_store(uri, serial)
    with Client(user_cluster.address, timeout=30) as client:
        loads, labellers = client.run(model_loads), client.run(provider_loads)
    assert len(loads) == 2 and max(loads.values()) == 1, loads
    assert max(labellers.values()) == 1, labellers


@pytest.mark.parametrize("extra, words", [
    (["--workers", "0"], "argument --workers: "),
    (["--cluster", "nosuch:1"], "--cluster nosuch:1: "),
    (["--workers", "2", "--device", "gpu"], "--device 'gpu'"),
    (["--workers", "2", "--device", "cuda"], "--workers 2"),
])
def test_bad_fan_out_is_one_line_and_the_store_unchanged(swept, extra, words):
    base, _, rid, _, _ = swept
    before = tree_digest(base)
    t0 = time.monotonic()
    res = run("sweep", "--store", base, "--probe-run", rid, *ARGS[:-2], *extra, timeout=120)
    assert res.returncode == 2, res.stderr
    assert words in one_line(res.stderr), res.stderr
    assert time.monotonic() - t0 < 60
    assert tree_digest(base) == before


def test_fan_out_needs_prefect(swept):
    base, _, rid, _, _ = swept
    before = tree_digest(base)
    res = run("--no-prefect", "sweep", "--store", base, "--probe-run", rid, "--workers", "2")
    assert res.returncode == 2 and "drop --no-prefect" in one_line(res.stderr), res.stderr
    assert tree_digest(base) == before


def _sweep_flow_runs(uri: str) -> list:
    """The Prefect API's sweep flow runs on store ``uri``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["sweep"])))
    return [r for r in runs if r.parameters.get("store") == uri]


@pytest.mark.parametrize("fan", [[], ["--workers", "2"]], ids=["in-process", "workers"])
@pytest.mark.parametrize("probe_run, kinds, validation, words", [
    ("nosuch", "attn1", "3", "no probe run 'nosuch'"),
    (None, "attn1", "20", "a sweep needs 20 validation + 3 evaluation"),
    (None, "block", "3", "has no probes of kind(s) block"),
], ids=["probe-run", "images", "cells"])
def test_the_store_s_refusals_come_before_a_flow_starts(swept, api, fan, probe_run, kinds,
                                                        validation, words):
    """A probe run, image sets or cells the store cannot give are refused before the
    command's Prefect flow (and its temporary server, without a standing API) starts, as
    docs/interventions.md says: before 2026-12-06 they were found inside the sweep flow,
    a failed flow run and a server start (10 s here) later."""
    base, _, rid, _, _ = swept
    before = tree_digest(base)
    argv = ["sweep", "--store", base, "--probe-run", probe_run or rid, "--kinds", kinds,
            "--validation", validation, "--evaluation", "3", "--n-targets", "2",
            "--device", "cpu", *fan]
    res = run(*argv, api=api, timeout=120)
    assert res.returncode == 2 and words in one_line(res.stderr), res.stderr
    assert _sweep_flow_runs(base) == []
    assert tree_digest(base) == before
