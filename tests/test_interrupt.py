"""Ctrl-C (SIGINT) of a real command once its store exists: one line saying the run is
resumable, exit code 130, in both modes, within seconds, and none of the command's
processes (its temporary Prefect server, its local Dask workers) outlives it; ``--debug``
shows the traceback. A terminal's Ctrl-C goes to the whole process group (the command,
its Prefect server, its local Dask workers): the same, and so is Ctrl-C pressed again and
again while the command stops (only the first counts). On a user's cluster
(``--cluster ADDRESS``) the tasks of materialize, label and intervene stop too and write
nothing once the command has exited, the cluster stays up, and a rerun completes (label's
leaves the store an uninterrupted run leaves)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import psutil
import pytest

from conftest import DEMO, REPO, tree_digest
from flows.cli import main
from storecheck import assert_same_store
from test_cli import _alive, _up_server

# how soon it happens is asserted: run while no other test runs (tests/alone.py)
pytestmark = pytest.mark.alone


def interrupted(command: str) -> str:
    """The one line a Ctrl-C of ``command`` prints."""
    return (f"actstore {command}: interrupted; completed blocks are kept, rerun the same "
            "command to resume")


LINE = interrupted("materialize")
# Seconds from SIGINT to the command's exit: 0.9-2.8 s in every case here at load 7-10
# (2026-12-05); before, 6-9 s with --workers 2 when Python raised KeyboardInterrupt at
# once, and 52-141 s when the signal left the main thread asleep until a task ended.
LIMIT = 15


class Stopped(NamedTuple):
    code: int
    err: str
    servers: list    # the temporary Prefect servers seen while it ran
    outlived: list   # its processes still running once it exited (not the resource tracker)
    tracker: list    # multiprocessing's resource tracker, which ends as its pipe closes
    workers: int     # Dask worker processes it had when interrupted


CLI = [sys.executable, "-m", "flows.cli"]


def command(tmp_path: Path, *args: str) -> tuple[list[str], dict]:
    """The command line ``args`` as a user runs it, and its environment."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    return [*CLI, "--quiet", *args], env


def materialize(tmp_path: Path, *flags: str, fan: tuple = (), prompts: str = DEMO,
                steps: int = 500) -> tuple[list[str], dict]:
    """The command (500 steps by default: its tasks run long) and its environment; ``fan``:
    where its tasks go (``--workers N``, ``--cluster ADDRESS``) and what else it is given."""
    return command(tmp_path, *flags, "materialize", "--model", "tiny-random", "--prompts",
                   prompts, "--store", str(tmp_path / "s.zarr"), "--steps", str(steps), *fan,
                   *(["--block-size", "4"] if fan else []))


def interrupt(tmp_path: Path, *flags: str, group: bool = False, workers: int | None = None,
              fan: tuple = (), ready: Callable[[], bool] = lambda: True,
              run: tuple | None = None, again: float | None = None,
              sig: int = signal.SIGINT, background: bool = False) -> Stopped:
    """Start materialize (or ``run``: a :func:`command` on the store ``tmp_path/s.zarr``),
    send SIGINT a moment after the store exists and ``ready()`` (to its process group with
    ``group``, as a terminal does), and see what is left when it exits. With ``again``,
    SIGINT again every ``again`` seconds until it has exited: Ctrl-C pressed again while the
    command stops, whatever it is doing then (killing workers, stopping its server,
    shutting down the interpreter)."""
    store = tmp_path / "s.zarr"
    cmd, env = run or materialize(tmp_path, *flags,
                                  fan=(*(["--workers", str(workers)] if workers else []), *fan))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=group,
                            preexec_fn=_ignore_sigint if background else None)
    servers = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and \
                not ((store / "zarr.json").exists() and ready()):
            server = _up_server(psutil.Process(proc.pid))
            servers += [server] if server is not None and server not in servers else []
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(1)
        family = {p: " ".join(_cmd(p)) for p in psutil.Process(proc.pid).children(recursive=True)}
        t0 = time.time()
        while True:
            if group:
                os.killpg(proc.pid, sig)   # its workers, once it has exited
            else:
                proc.send_signal(sig)
            try:
                _, err = proc.communicate(timeout=again or 120)
                break
            except subprocess.TimeoutExpired:
                if again is None or time.time() - t0 > 120:
                    raise
        took = time.time() - t0
        left = [p for p in family if _alive(p)]
        tracker = [p for p in left if "multiprocessing.resource_tracker" in family[p]]
        assert took < LIMIT, f"Ctrl-C took {took:.1f} s to take effect"
        return Stopped(proc.returncode, err, servers,
                       [family[p] for p in left if p not in tracker], tracker,
                       sum("multiprocessing.spawn" in cmd for cmd in family.values()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()


def _ignore_sigint() -> None:
    """As a shell script's ``command &`` starts it (a batch job's way): SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _cmd(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def gone(stopped: Stopped) -> None:
    """Nothing the command started runs once it has exited; the resource tracker, a
    moment later."""
    assert stopped.outlived == [], f"outlived the command: {stopped.outlived}"
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in stopped.tracker):
        time.sleep(0.1)
    assert not any(_alive(p) for p in stopped.tracker)


@pytest.mark.parametrize("mode, again", [([], None), (["--no-prefect"], None),
                                         (["--no-prefect"], 0.1)],
                         ids=["prefect", "no-prefect", "no-prefect-pressed-again"])
def test_ctrl_c_is_one_line_and_exit_130(tmp_path, mode, again):
    stopped = interrupt(tmp_path, *mode, again=again)
    assert stopped.code == 130 and stopped.err.strip() == LINE, stopped.err
    assert len(stopped.servers) == (0 if mode else 1)
    gone(stopped)


@pytest.mark.parametrize("mode, workers, background", [(["--no-prefect"], None, False),
                                                       ([], 2, True)],
                         ids=["no-prefect", "prefect-workers-2-in-background"])
def test_sigterm_is_one_line_and_exit_143(tmp_path, mode, workers, background):
    """``kill``, ``timeout``, a batch scheduler's cancel: before 2026-12-07 SIGTERM killed
    the command with no line at all (exit 143), its local workers and temporary Prefect
    server left to their parent watch; in the background (SIGINT ignored) nothing of the
    Ctrl-C path ran either. Now it stops as Ctrl-C does."""
    stopped = interrupt(tmp_path, *mode, workers=workers, sig=signal.SIGTERM,
                        background=background)
    assert stopped.code == 143, stopped.err
    assert stopped.err.strip() == ("actstore materialize: terminated (SIGTERM); completed "
                                   "blocks are kept, rerun the same command to resume"), \
        stopped.err
    gone(stopped)
    if workers:
        assert stopped.workers == workers


def test_ctrl_c_with_debug_shows_the_traceback(tmp_path):
    stopped = interrupt(tmp_path, "--no-prefect", "--debug")
    lines = stopped.err.strip().splitlines()
    assert stopped.code == 130 and lines[-1] == LINE
    assert lines[0].startswith("Traceback") and "KeyboardInterrupt" in stopped.err


@pytest.mark.parametrize("workers, again", [(None, None), (2, None), (2, 0.1)],
                         ids=["in-process", "2-workers", "2-workers-pressed-again"])
def test_terminal_ctrl_c_reaches_the_group_and_is_one_line(tmp_path, workers, again):
    """``again``: Ctrl-C pressed again and again while the command stops; the first one
    counts, and the clean-up it starts always completes."""
    stopped = interrupt(tmp_path, group=True, workers=workers, again=again)
    assert stopped.code == 130 and stopped.err.strip() == LINE, stopped.err
    assert len(stopped.servers) == 1
    assert stopped.workers == (workers or 0)     # so they were among the processes checked
    gone(stopped)


# A user's scheduler and two worker processes, in a process (and session) of their own.
USER_CLUSTER = """
import logging, sys
from distributed import LocalCluster
with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                  silence_logs=logging.ERROR) as cluster:
    print(cluster.scheduler_address, flush=True)
    sys.stdin.read()     # until the test closes this pipe
"""
# Four images (one block) at STEPS steps, so each command's task runs long enough to be
# interrupted in its middle and still have work left once the command has exited (1-3 s
# after SIGINT): a region about 20 s, pass 2 of a label group (1000 x0 images) 6-8 s, a
# group of two interventions about 20 s at load 3 (2026-12-05). Train images at positions
# 0, 2 and 3 fall in two of the probes' cross-validation folds
# (actstore.probe.stats.fold_of); demo-010 is the test image the interventions edit.
FOUR = ["demo-000", "demo-010", "demo-001", "demo-002"]
STEPS = 250
LAYER = "up_blocks.3.attentions.0"   # probed at step 0 only: what the interventions edit (its
# 8x8 tokens hold both classes, so its probe has weights: a zero-weight one is refused)


@contextmanager
def user_cluster(tmp_path: Path) -> Iterator[str]:
    """The address of a cluster this test starts as a user would, stopped afterwards."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "workers")}
    with open(tmp_path / "cluster.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", USER_CLUSTER], env=env, cwd=REPO,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                text=True, start_new_session=True)
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Cluster(NamedTuple):
    address: str
    client: object    # a distributed.Client of it


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """One user's cluster for the module (each test checks it is still up after its own
    Ctrl-C); its workers keep their models from one test to the next."""
    from distributed import Client

    with user_cluster(tmp_path_factory.mktemp("cluster")) as address, \
            Client(address, timeout=30) as client:
        yield Cluster(address, client)


def running(client) -> int:
    """Tasks running on the cluster's workers, cancelled ones included."""
    return sum(client.run(lambda dask_worker: dask_worker.state.executing_count).values())


def inside(name: str) -> Callable:
    """For ``client.run``: is a task of the worker inside a call of the function ``name``
    (sent by value: a closure)."""
    def check(dask_worker) -> bool:
        import sys

        frames = sys._current_frames()
        for thread in list(dask_worker.active_threads):
            frame = frames.get(thread)
            while frame is not None and frame.f_code.co_name != name:
                frame = frame.f_back
            if frame is not None:
                return True
        return False
    return check


class After(NamedTuple):
    stopped: Stopped
    running: int      # tasks of the command still running on the cluster 10 s after its exit
    queued: dict      # tasks the scheduler still holds for each worker
    workers: int      # the cluster's workers then
    written: list     # store files written or removed after the command exited


def interrupt_on(cluster: Cluster, tmp_path: Path, run: tuple, where: str) -> After:
    """A terminal's Ctrl-C of ``run`` (a :func:`command` on ``tmp_path/s.zarr`` with
    ``--cluster``) once one of its tasks is inside the function ``where``; then what its
    tasks did on the cluster after it exited."""
    client, store = cluster.client, tmp_path / "s.zarr"
    stopped = interrupt(tmp_path, group=True, run=run,
                        ready=lambda: any(client.run(inside(where)).values()))
    at_exit = tree_digest(store)
    deadline = time.time() + 10
    while time.time() < deadline and running(client):
        time.sleep(0.2)
    now = tree_digest(store)
    return After(stopped, running(client), client.processing(),
                 len(client.scheduler_info(n_workers=-1)["workers"]),
                 sorted(k for k in at_exit.keys() | now.keys() if at_exit.get(k) != now.get(k)))


def assert_stopped(after: After, name: str) -> None:
    """One line, exit 130, nothing the command started outlives it; its tasks on the
    cluster stop within 10 s having written nothing more; the cluster and both its
    workers stay up."""
    stopped = after.stopped
    assert stopped.code == 130 and stopped.err.strip() == interrupted(name), stopped.err
    gone(stopped)
    assert after.running == 0 and after.queued == {w: () for w in after.queued}
    assert after.written == [], f"written after the command exited: {after.written[:4]}"
    assert after.workers == 2


@pytest.fixture(scope="module")
def materialized(tmp_path_factory, cluster, prefect_harness) -> tuple[After, tuple, Path]:
    """materialize interrupted on the user's cluster in its denoising loop, then rerun
    (exit code and output); the store it leaves (FOUR at STEPS steps) is where label and
    intervene start."""
    tmp = tmp_path_factory.mktemp("materialize")
    with open(DEMO, newline="") as f:
        rows = {row["image_id"]: row for row in csv.DictReader(f)}
    with open(tmp / "four.csv", "w", newline="") as f:
        table = csv.DictWriter(f, fieldnames=list(rows[FOUR[0]]))
        table.writeheader()
        table.writerows(rows[i] for i in FOUR)
    run = materialize(tmp, fan=("--cluster", cluster.address), prompts=str(tmp / "four.csv"),
                      steps=STEPS)
    after = interrupt_on(cluster, tmp, run, "generate")
    with redirect_stdout(StringIO()) as out:
        code = main(run[0][len(CLI):])    # the same command, in this process
    return after, (code, out.getvalue()), tmp / "s.zarr"


def test_terminal_ctrl_c_on_a_users_cluster_stops_its_tasks_and_a_rerun_completes(
        materialized):
    """One block, interrupted in its denoising loop (one interrupted as it started ended
    within seconds even before: a test of nothing), which would run on and record its
    block after the command exited if not stopped."""
    from actstore.generation.materialize import completion

    after, (code, out), store = materialized
    assert_stopped(after, "materialize")
    # the stopped task recorded nothing after the command exited; the rerun did it all
    assert code == 0 and "4 images generated in 1 blocks (0 blocks already stored)" in out, out
    assert completion(str(store))["trained"]["complete"] == 4


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, materialized) -> tuple[str, str]:
    """That store with salient labels made in this process (the uninterrupted run) and a
    probe run on LAYER at step 0: (store, probe run)."""
    from actstore.label.labels import write_labels
    from actstore.probe.runs import run_probes

    uri = str(tmp_path_factory.mktemp("labelled") / "s.zarr")
    shutil.copytree(materialized[2], uri)
    write_labels(uri, "toyworld", "salient", progress=False)
    return uri, run_probes(uri, "salient", layers=[LAYER], steps=[0], scheduler="threads",
                           progress=False)


def test_ctrl_c_of_label_on_a_users_cluster_stops_its_block_group_and_a_rerun_equals_one_run(
        tmp_path, cluster, materialized, labelled, prefect_harness):
    """Interrupted while a worker labels the block's x0 images (pass 2); before, the group
    went on and wrote the block's labels and pass-2 record after the command exited. A
    reader sees no labels; the rerun resumes the staged version and leaves the store an
    uninterrupted run leaves: nothing stale is kept."""
    from actstore.store import labelsets

    store = tmp_path / "s.zarr"
    shutil.copytree(materialized[2], store)
    args = ("label", "--store", str(store), "--provider", "toyworld", "--target", "salient",
            "--cluster", cluster.address)
    assert_stopped(interrupt_on(cluster, tmp_path, command(tmp_path, *args), "final_block"),
                   "label")
    assert labelsets.current(str(store)) == {}
    assert main(["--quiet", *args]) == 0
    assert_same_store(str(store), labelled[0], skip=("probes",))


def test_ctrl_c_of_intervene_on_a_users_cluster_stops_its_generation(
        tmp_path, cluster, labelled, prefect_harness, capsys):
    """Interrupted while a worker generates the test image's two interventions (the edit
    and its random control); the rerun generates and records the block."""
    store = tmp_path / "s.zarr"
    shutil.copytree(labelled[0], store)
    args = ("intervene", "--store", str(store), "--probe-run", labelled[1], "--layers", LAYER,
            "--steps", "0", "--n-targets", "1", "--cluster", cluster.address)
    assert_stopped(interrupt_on(cluster, tmp_path, command(tmp_path, *args), "generate"),
                   "intervene")
    assert main(["--quiet", "--json", *args]) == 0
    out = json.loads(capsys.readouterr().out.split("\n\n")[0])
    assert out["complete"] and out["blocks_written"] == 1, out


def test_an_interrupt_a_library_turned_into_its_own_error_is_still_one(tmp_path, monkeypatch,
                                                                         capsys):
    """pydantic-core turns a KeyboardInterrupt raised inside a serializer into a
    PydanticSerializationError with no cause: a Ctrl-C landing in Prefect's serialization
    of a task's parameters ended the command as 'unexpected', exit 1. Placed here with
    pydantic itself: the press arrives while a model is serialized."""
    import flows.cli as cli
    from pydantic import BaseModel, field_serializer

    class Parameters(BaseModel):
        store: str = "s.zarr"

        @field_serializer("store")
        def pressed(self, value):
            os.kill(os.getpid(), signal.SIGINT)
            return value

    monkeypatch.setattr(cli, "_run", lambda args: Parameters().model_dump_json())
    try:
        code = main(["materialize", "--store", str(tmp_path / "s.zarr"), "--no-prefect"])
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert code == 130 and capsys.readouterr().err.strip() == LINE
