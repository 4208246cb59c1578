"""The progress of ``materialize --cluster`` when another writer fills part of its plan:
two commands started on one new store at once both plan every block, and the one whose
regions then find the blocks recorded counts them as done. Before 2026-12-06 its bar
counted only the images it generated and ended at 25% ('images 32/128', an ETA of
minutes) above a 'complete' line. Its bar, and ``intervene --cluster``'s, move while a
task runs. Real processes: ``dask scheduler``, ``dask worker``, the command with its
temporary Prefect API, and a second command in its own process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import DEMO, IV_LAYERS, REPO
from test_cli import run
from test_cluster_env import killable_scheduler  # noqa: F401 - a fixture
from test_intervene_fanout import probed  # noqa: F401 - a fixture
from test_interrupt import inside

# how soon it happens is asserted: run while no other test runs (tests/alone.py)
pytestmark = pytest.mark.alone

ARGS = ["--model", "tiny-random", "--prompts", DEMO, "--steps", "40", "--batch-size", "4",
        "--block-size", "4"]


def test_blocks_another_writer_recorded_meanwhile_count_as_done(
        tmp_path, killable_scheduler):  # noqa: F811 - the fixture imported above
    from distributed import Client

    address, _, _ = killable_scheduler
    store = str(tmp_path / "s.zarr")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    with Client(address, timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        (pid,) = client.run(os.getpid).values()
        cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "materialize", *ARGS,
                                "--store", store, "--cluster", address], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 240
            while not any(client.run(inside("materialize_region")).values()):
                assert cli.poll() is None and time.monotonic() < deadline, cli.stderr.read()
                time.sleep(0.05)
            os.kill(pid, signal.SIGSTOP)          # its region planned, begun, held
            try:
                other = run("materialize", *ARGS, "--store", store, "--no-prefect",
                            "--quiet", timeout=300)
                assert other.returncode == 0, other.stderr[-2000:]
            finally:
                os.kill(pid, signal.SIGCONT)
            out, err = cli.communicate(timeout=300)
        finally:
            cli.kill()
    assert cli.returncode == 0, err[-2000:]
    assert "complete (trained 16/16 images)" in out, out
    last = re.split(r"[\r\n]", err.strip())[-1]
    assert "100%" in last and "images 16/16" in last, last


def test_the_bar_moves_while_a_region_runs(tmp_path, killable_scheduler):  # noqa: F811
    """One region of 4 images x 120 steps on one worker: the bar shows its steps as the
    worker makes them, not only when the region ends (before 2026-12-06 it went from 0 to
    480 at once; a soak run's bars sat at 0% for up to 2 min 24 s)."""
    address, _, _ = killable_scheduler
    res = run("materialize", "--model", "tiny-random", "--prompts", DEMO, "--store",
              str(tmp_path / "s.zarr"), "--steps", "120", "--batch-size", "4",
              "--block-size", "4", "--images", "0:4", "--cluster", address, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    counts = {int(m) for m in re.findall(r"\| *(\d+)/480 \[", res.stderr)}
    assert counts & set(range(1, 480)), sorted(counts)
    assert 480 in counts and "images 4/4" in re.split(r"[\r\n]", res.stderr.strip())[-1]


def test_the_bar_moves_while_an_intervention_group_runs(tmp_path, probed,  # noqa: F811
                                                       killable_scheduler):  # noqa: F811
    """One block group (4 images, one intervention generated at a time) on one worker,
    held for 1.5 s with SIGSTOP in its first generation so that it relays before its end
    however fast the machine: the bar shows the group's steps as the worker makes them
    (before 2026-12-06 it went from 0 to the whole group at once; a soak run's sat at 0%
    for 83 s)."""
    uri, probe_run = str(tmp_path / "p.zarr"), probed[2]
    shutil.copytree(probed[0], uri)
    address, _, _ = killable_scheduler
    counts, total = held_run(address, "generate_edited", "intervene", "--store", uri,
                             "--probe-run", probe_run, "--layers", *IV_LAYERS, "--steps",
                             "0", "1", "--images", "0:4", "--n-targets", "1",
                             "--batch-size", "1", "--device", "cpu")
    assert counts & set(range(1, total)), (sorted(counts), total)
    assert total in counts


def test_the_bar_moves_while_a_label_group_runs(tmp_path, killable_scheduler):  # noqa: F811
    """16 blocks of one image on one worker: pass 1 in 4 groups of 4 blocks, the worker
    held 1.5 s with SIGSTOP in its first block. The bar counts each block as the worker
    labels it (before 2026-12-06 only each group's end, 0/4/8/12/16; a soak run's pass 1
    sat at 0% for 2 min 24 s)."""
    address, _, _ = killable_scheduler
    uri = str(tmp_path / "s.zarr")
    made = run("materialize", "--model", "tiny-random", "--prompts", DEMO, "--store", uri,
               "--steps", "4", "--batch-size", "4", "--block-size", "1", "--no-prefect",
               "--quiet", timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    counts, total = held_run(address, "raw_block", "label", "--store", uri, "--provider",
                             "toyworld", "--target", "salient", "--device", "cpu",
                             total=16)
    assert {c % 4 for c in counts} - {0}, sorted(counts)
    assert total in counts


def held_run(address: str, inside_of: str, *argv: str, total: int | None = None
             ) -> tuple[set[int], int]:
    """Run the command on the cluster at ``address``, its one worker held 1.5 s with
    SIGSTOP once a task is inside ``inside_of``: the counts its bar showed (of ``total``,
    else of its only total), and that total."""
    from distributed import Client

    with Client(address, timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        (pid,) = client.run(os.getpid).values()
        held = threading.Event()

        def hold() -> None:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                if any(client.run(inside(inside_of)).values()):
                    os.kill(pid, signal.SIGSTOP)
                    time.sleep(1.5)
                    os.kill(pid, signal.SIGCONT)
                    held.set()
                    return
                time.sleep(0.02)
        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        try:
            res = run(*argv, "--cluster", address, timeout=300)
        finally:
            holder.join(timeout=10)
            os.kill(pid, signal.SIGCONT)
    assert res.returncode == 0 and held.is_set(), res.stderr[-2000:]
    bars = [(int(k), int(n)) for k, n in re.findall(r"\| *(\d+)/(\d+) \[", res.stderr)]
    if total is None:
        (total,) = {n for _, n in bars}
    return {k for k, n in bars if n == total}, total
