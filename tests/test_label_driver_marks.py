"""A fanned-out label run's driver (the command's process, which holds the run's marks)
keeps its marks during a pass, not only at its control steps and heartbeat: a mark a
displaced run's heartbeat put back over its own is put back within seconds while the
Dask workers label. Real processes: a ``dask scheduler``, one ``dask worker`` that stops
itself (SIGSTOP) in the middle of pass 1, the ``actstore label --cluster`` command, and
another label run of the target cleaning up in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from actstore.store import commit, io, labelsets
from actstore.store import layout as lay
from conftest import REPO
from flows.label import MARK_CHECK_S
from test_cli import api  # noqa: F401 - a fixture
from test_cluster_workers import UserCluster, finish, wait_until
from test_label_resume import TESTS

# dask worker --preload: the worker stops itself before labelling its second block
FREEZE = """
import os, signal
from actstore.label import blocks

# dask may load a preload more than once: wrap the original only
_raw_block = blocks.__dict__.setdefault("_unfrozen_raw_block", blocks.raw_block)
_calls = [0]


def raw_block(job, prov, a, b, *rest):
    _calls[0] += 1
    if _calls[0] == 2:
        os.kill(os.getpid(), signal.SIGSTOP)
    return _raw_block(job, prov, a, b, *rest)


blocks.raw_block = raw_block
"""

# another job's label run of the target: its begin removes versions of dead writers
CLEAN_UP = """
import sys
sys.path.insert(0, sys.argv[2])
from actstore.store import labelsets
other = labelsets.begin(sys.argv[1], ["depth"], "another job")
labelsets.abort(sys.argv[1], other)
labelsets.release(other)
"""


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_driver_puts_its_mark_back_during_a_pass_so_a_clean_up_keeps_its_version(
        tmp_path, tiny_store, api):  # noqa: F811
    """The run began more than a day ago as the store sees it (its birth record rewritten
    25 hours back: a long fan-out), and a displaced run's heartbeat has just put that
    run's mark (its process now gone) over the driver's. Until the driver's mark is back,
    a clean-up judges the version by the driver's birth record and takes it for gone.
    Before, only the block tasks checked during a pass, and a worker can't put the
    driver's mark back: the version stayed so until the driver's next control step or
    heartbeat (3 h), and another label run of the target removed it under the live run,
    which then failed ('removed while being written'). Now the driver checks its marks
    every MARK_CHECK_S while it waits: the clean-up keeps the version, the run commits."""
    uri = str(tmp_path / "s.zarr")
    shutil.copytree(tiny_store, uri)
    preload = tmp_path / "freeze_second_block.py"
    preload.write_text(FREEZE)
    cluster = UserCluster(tmp_path)
    cli = None
    try:
        worker = cluster.worker("--preload", str(preload))
        cluster.wait_for(1)
        cli = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "label", "--store", uri, "--provider",
             "toyworld", "--target", "depth", "--no-x0", "--cluster", cluster.address],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": api})
        wait_until(lambda: _stopped(worker.pid), cli, "the worker's freeze")
        [name] = [n for n in io.list_dir(uri, lay.label_target_path("depth"))
                  if n.startswith(labelsets.VERSION_PREFIX)]
        version = lay.label_version_path("depth", name)
        mark = commit.writer_of(uri, version)
        assert mark["pid"] == cli.pid
        born = f"{lay.pending_path(version)}/{mark['token']}"
        io.put_group(uri, born, {lay.WRITER_KEY: {**mark, "started": time.time() - 25 * 3600}})
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        io.put_group(uri, lay.pending_path(version), {lay.WRITER_KEY: {
            **mark, "token": "displaced", "pid": gone.pid, "seen": time.time()}})
        time.sleep(MARK_CHECK_S + 3)    # the driver's next look at its marks
        clean = subprocess.run([sys.executable, "-c", CLEAN_UP, uri, TESTS], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)},
                               capture_output=True, text=True, timeout=120)
        assert clean.returncode == 0, clean.stderr
        assert io.list_dir(uri, version), "the live run's version was removed"
        os.kill(worker.pid, signal.SIGCONT)
        _, err, _ = finish(cli, 300)
        assert cli.returncode == 0, err[-2000:]
    finally:
        if cli is not None and cli.poll() is None:
            cli.kill()
            cli.wait()
        cluster.close()
    assert labelsets.current(uri)["depth"]["path"] == version
    assert "full" in io.list_dir(uri, version)
    assert io.list_dir(uri, lay.pending_path(version)) == []
