"""Ctrl-C (SIGINT) of a real command once its store exists: one line saying the run is
resumable, exit code 130, in both modes; in the default mode the command's temporary
Prefect server is gone afterwards; ``--debug`` shows the traceback. A terminal's Ctrl-C
goes to the whole process group (the command, its Prefect server, its local Dask
workers): the same one line, within seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import DEMO, REPO
from test_cli import _alive, _up_server

LINE = ("actstore materialize: interrupted; completed blocks are kept, rerun the same command "
        "to resume")


def interrupt(tmp_path: Path, *flags: str, group: bool = False,
              workers: int | None = None) -> tuple[int, str, list]:
    """Start materialize, send SIGINT a moment after the store appears (to its process
    group with ``group``, as a terminal does): (exit code, stderr, the temporary Prefect
    servers seen while it ran)."""
    store = tmp_path / "s.zarr"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--quiet", *flags, "materialize", "--model",
         "tiny-random", "--prompts", DEMO, "--store", str(store), "--steps", "500",
         *(["--workers", str(workers), "--block-size", "4"] if workers else [])],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=group)
    servers = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and \
                not (store / "zarr.json").exists():
            server = _up_server(psutil.Process(proc.pid))
            servers += [server] if server is not None and server not in servers else []
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(1)
        t0 = time.time()
        if group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert time.time() - t0 < 30, "Ctrl-C took long to take effect"
        return proc.returncode, err, servers
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()


@pytest.mark.parametrize("mode", [[], ["--no-prefect"]], ids=["prefect", "no-prefect"])
def test_ctrl_c_is_one_line_and_exit_130(tmp_path, mode):
    code, err, servers = interrupt(tmp_path, *mode)
    assert code == 130 and err.strip() == LINE, err
    assert len(servers) == (0 if mode else 1)
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(s) for s in servers):
        time.sleep(0.2)
    assert not any(_alive(s) for s in servers), "the temporary Prefect server outlived Ctrl-C"


def test_ctrl_c_with_debug_shows_the_traceback(tmp_path):
    code, err, _ = interrupt(tmp_path, "--no-prefect", "--debug")
    lines = err.strip().splitlines()
    assert code == 130 and lines[-1] == LINE
    assert lines[0].startswith("Traceback") and "KeyboardInterrupt" in err


@pytest.mark.parametrize("workers", [None, 2], ids=["in-process", "2-workers"])
def test_terminal_ctrl_c_reaches_the_group_and_is_one_line(tmp_path, workers):
    code, err, servers = interrupt(tmp_path, group=True, workers=workers)
    assert code == 130 and err.strip() == LINE, err
    assert len(servers) == 1
    deadline = time.time() + 30
    while time.time() < deadline and _alive(servers[0]):
        time.sleep(0.2)
    assert not _alive(servers[0])
