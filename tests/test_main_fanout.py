"""``actstore main`` on one Dask cluster for all its stages (``--workers N``, N > 1, or
``--cluster ADDRESS``): materialize (both variants), labels, the probe grid and the
sweep's experiments (its cells and its evaluation) run on the cluster's workers, and the
store equals the in-process job's object by object (probe runs, sweeps and experiments
have ids of their own: mapped onto the in-process job's). Whether a stage ran on the
workers is read off the processes themselves: this process loads no model and no label
model, the workers do, and the scheduler handed out the probe grid's tasks. A bad
``--cluster``, both options, or a ``--device`` the cluster's workers lack is one line,
exit 2, and no ``--out`` folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from actstore.generation.regions import model_loads
from actstore.intervene.settings import InterventionSettings, SweepSettings
from actstore.intervene.sweep import fit_split, list_sweeps, run_sweep
from actstore.label.providers import provider_loads
from actstore.probe.runs import latest_run
from conftest import DEMO, REPO
from flows.cli import main
from flows.main import MAIN_MATERIALIZE, MAIN_SWEEPS, main_flow
from storecheck import assert_same_store
from test_cli import _alive, api, one_line  # noqa: F401 - api: a fixture
from test_intervene_fanout import cluster  # noqa: F401 - a fixture

# The main job at its smallest: 16 images of 2 steps in blocks of 8, attn1 only, one
# target; a sweep of one cell at two strengths, on 2 validation images, evaluated on 4
# (tiny-random's probe weights are tiny, so a projection edit blows its UNet up; a few
# Adam steps are bounded, and an uncapped edit size makes sure a setting is chosen).
SETTINGS = MAIN_MATERIALIZE.with_options(steps=2, device="cpu", kinds="attn1")
SWEEP = SweepSettings(kinds=("attn1",), step_counts=(1,), strengths=(1.0, 2.0),
                      validation=2, evaluation=4, max_edit_size=1e9,
                      base=InterventionSettings(n_targets=2, batch_size=8,
                                                method="gradient", iterations=4))
JOB = {"model": "tiny-random", "prompts": DEMO, "settings": SETTINGS,
       "targets": ("salient",), "sweeps": {"salient": SWEEP}}
# Dask task names (the scheduler's prefixes) of each fanned-out stage: materialize's planning
# and regions, label block groups, the probe grid's fit and score tasks, an experiment's
# planning, block groups and summary.
STAGE_TASKS = {"plan_task", "region_task", "label_blocks_task", "fit_block", "score_block",
               "plan_blocks_task", "block_group_task", "finish_blocks_task"}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The in-process job and each worker with one torch thread: conv sums depend on it."""
    monkeypatch.setenv("ACTSTORE_THREADS", "1")


def _loads() -> tuple[int, int]:
    """Models and label models this process has loaded."""
    return model_loads(), provider_loads()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, prefect_harness):
    """The job with one worker (every stage in this process): (its store, its result, the
    seconds it took, the models and label models it loaded here)."""
    out = tmp_path_factory.mktemp("mainfan") / "serial"
    # module-scoped, so before `one_thread`; a value set before the tests is put back
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ACTSTORE_THREADS", "1")
        before, t0 = _loads(), time.perf_counter()
        result = main_flow(out=str(out), workers=1, **JOB)
        seconds = time.perf_counter() - t0
        loaded = tuple(b - a for a, b in zip(before, _loads()))
    assert result["workers"] == 1 and result["interventions"]["salient"]["evaluation"]
    return str(out / "store.zarr"), result, seconds, loaded


def _ids(store: str) -> list[str]:
    """The ids a job made afresh or derived from them, in one order for every job: the
    probe run, the sweep, its experiments and its evaluation."""
    (rec,) = list_sweeps(store).values()
    return [latest_run(store, "salient"), rec["sweep_id"], *rec["experiments"],
            rec["evaluation"]]


def _same_store(got: str, want: str) -> None:
    assert_same_store(got, want, alias=dict(zip(_ids(got), _ids(want))))


def test_workers_run_every_stage_on_one_cluster(tmp_path, in_process, prefect_harness):
    """``main --workers 2``: materialize's regions and the label block groups on both
    workers (neither is this process), nothing loaded here (the in-process job loaded the
    store's models and the label model here), the same store."""
    want, _, serial_s, loaded = in_process
    assert loaded[0] >= 2 and loaded[1] >= 1   # trained, randomized; the label model
    before, t0 = _loads(), time.perf_counter()
    result = main_flow(out=str(tmp_path / "fan"), workers=2, **JOB)
    seconds = time.perf_counter() - t0
    assert _loads() == before
    assert result["workers"] == 2
    here = f":{os.getpid()}"
    for variant in ("trained", "randomized"):
        ran = result[variant]["regions_by_worker"]
        assert len(ran) == 2 and not any(w.endswith(here) for w in ran), ran
    groups = result["labels"]["salient"]["groups_by_worker"]
    assert groups and not any(w.endswith(here) for w in groups), groups
    _same_store(str(tmp_path / "fan" / "store.zarr"), want)
    print(f"main in process {serial_s:.1f} s, --workers 2 {seconds:.1f} s")


def test_cluster_runs_every_stage_on_its_workers(tmp_path, in_process, cluster,  # noqa: F811
                                                 prefect_harness):
    """``main --cluster ADDRESS`` on a running 2-process cluster: its workers loaded the
    models and the label model, its scheduler ran the probe grid's tasks, this process
    loaded nothing, and the store is the in-process job's."""
    want = in_process[0]
    before, t0 = _loads(), time.perf_counter()
    result = main_flow(out=str(tmp_path / "cl"), cluster=cluster.scheduler.address, **JOB)
    seconds = time.perf_counter() - t0
    assert _loads() == before and result["workers"] == 2
    assert sum(cluster.run(model_loads).values()) >= 2      # trained, randomized
    assert sum(cluster.run(provider_loads).values()) >= 1   # labels, sweep scores
    ran = cluster.run_on_scheduler(_tasks_run)
    assert STAGE_TASKS <= set(ran), sorted(ran)
    (rec,) = result["interventions"].values()     # every cell and the evaluation
    assert ran["plan_blocks_task"] == len(rec["experiments"]) + 1, ran
    _same_store(str(tmp_path / "cl" / "store.zarr"), want)
    print(f"main --cluster {seconds:.1f} s")


def test_the_command_as_typed_with_two_workers(tmp_path, in_process, api):  # noqa: F811
    """``actstore main --workers 2`` in a fresh process, as a user types it (the job of
    :data:`JOB`, but with the command's own sweep settings): exit 0; its materialized
    variants, labels and probe run are the in-process job's object by object; its sweep's
    experiment is the one the library makes from the in-process job's store with the
    command's sweep settings; and none of the processes it started outlives it."""
    import psutil

    out = tmp_path / "cli"
    argv = [sys.executable, "-m", "flows.cli", "--quiet", "--json", "main", "--workers", "2",
            "--model", "tiny-random", "--prompts", DEMO, "--steps", "2", "--targets",
            "salient", "--capture", "attn1", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": api,
           "ACTSTORE_THREADS": "1"}
    started: dict[int, psutil.Process] = {}
    names: dict[int, str] = {}
    with open(tmp_path / "stdout", "w+") as stdout, open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=stdout, stderr=err)
        command = psutil.Process(proc.pid)
        while proc.poll() is None:      # every process it starts, as it starts them
            try:
                for p in command.children(recursive=True):
                    started.setdefault(p.pid, p)
                    names[p.pid] = names.get(p.pid) or _cmdline(p)
            except psutil.Error:        # one ended while listed
                pass
            time.sleep(0.2)
        assert proc.wait() == 0, err.seek(0) or err.read()[-3000:]
        stdout.seek(0)
        result = json.load(stdout)
    workers = [pid for pid, name in names.items() if "multiprocessing" in name]
    assert result["workers"] == 2 and len(workers) >= 2, names
    deadline = time.time() + 15       # multiprocessing's resource tracker ends on its own
    while time.time() < deadline and any(_alive(p) for p in started.values()):
        time.sleep(0.2)
    assert not [p.pid for p in started.values() if _alive(p)], "a process outlived the command"

    want, got = in_process[0], str(out / "store.zarr")
    assert_same_store(got, want, skip=("interventions", "sweeps"))
    oracle = str(tmp_path / "oracle.zarr")
    shutil.copytree(want, oracle)
    settings = MAIN_SWEEPS["salient"]
    settings = fit_split(oracle, replace(settings, base=settings.base.with_(device="cpu")))
    # ACTSTORE_THREADS=1 here too: set by `one_thread` for the whole test
    (expected,) = run_sweep(oracle, [latest_run(oracle, "salient")], settings,
                            progress=False)["targets"].values()
    (made,) = result["interventions"].values()
    assert made["experiments"] and len(made["experiments"]) == len(expected["experiments"])
    alias = {latest_run(got, "salient"): latest_run(oracle, "salient"),
             **dict(zip(made["experiments"], expected["experiments"]))}
    for mine, theirs in zip(made["experiments"], expected["experiments"]):
        assert_same_store(f"{got}/interventions/{mine}", f"{oracle}/interventions/{theirs}",
                          alias=alias)


def _cmdline(p) -> str:
    try:
        return " ".join(p.cmdline())
    except Exception:  # noqa: BLE001 - gone already
        return ""


def _tasks_run(dask_scheduler) -> dict[str, int]:
    """On the scheduler: how many tasks of each name a worker has finished."""
    return {name: prefix.state_counts["memory"]
            for name, prefix in dask_scheduler.task_prefixes.items()}


def _refused(capsys, argv: list[str]) -> str:
    code = main(["--quiet", "main", "--model", "tiny-random", "--steps", "2", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    return one_line(err)


@pytest.mark.parametrize("extra, words", [
    (["--cluster", "nosuch:1"], "--cluster nosuch:1: "),
    (["--cluster", "tcp://127.0.0.1:1"], "--cluster tcp://127.0.0.1:1: "),
    (["--cluster", "tcp://127.0.0.1:1", "--workers", "2"], "--workers and --cluster: give one"),
    (["--cluster", "tcp://127.0.0.1:1", "--device", "gpu"], "--device 'gpu'"),
])
def test_bad_fan_out_is_one_line_before_anything_is_written(tmp_path, capsys, extra, words):
    out = tmp_path / "m"
    t0 = time.monotonic()
    line = _refused(capsys, ["--out", str(out), *extra])
    assert words in line, line
    assert time.monotonic() - t0 < 60 and not out.exists()


def test_cluster_workers_check_the_device(tmp_path, capsys, cluster,  # noqa: F811
                                          prefect_harness):
    """``--device cuda --cluster``: this process checks the name only (its workers may have
    GPUs it has not); each worker is asked before the store is made. Here none has CUDA:
    one line naming a worker."""
    out = tmp_path / "m"
    line = _refused(capsys, ["--out", str(out), "--device", "cuda", "--cluster",
                             cluster.scheduler.address])
    assert "CUDA is not available" in line and "on Dask worker" in line, line
    assert not out.exists()
