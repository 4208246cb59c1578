"""The suite's own scheduling (tests/alone.py): in a parallel run an ``alone`` test runs
while no other test runs, the others still run side by side, and a process a test forks
does not keep the lock after the test. A small suite of sleeping tests, run by pytest in
3 processes, records when each ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO

RECORD = textwrap.dedent("""
    import json, os, time

    def record(name, seconds, log=os.environ["ALONE_LOG"]):
        t0 = time.time()
        time.sleep(seconds)
        with open(log, "a") as f:
            f.write(json.dumps([name, os.environ["PYTEST_XDIST_WORKER"], t0, time.time()]) + "\\n")
""")
FILES = {
    "conftest.py": "from alone import pytest_runtest_protocol  # noqa: F401\n",
    "record.py": RECORD,
    "test_a.py": textwrap.dedent("""
        import pytest
        from record import record

        @pytest.mark.alone
        @pytest.mark.parametrize("i", range(2))
        def test_alone(i):
            record(f"alone{i}", 1.0)
    """),
    **{f"test_{x}.py": textwrap.dedent(f"""
        from record import record

        def test_{x}_1():
            record("{x}1", 1.5)

        def test_{x}_2():
            record("{x}2", 1.5)
    """) for x in "bc"},
}


def test_alone_tests_run_with_no_other_and_the_rest_side_by_side(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    for name, text in FILES.items():
        (suite / name).write_text(text)
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    alone: run alone\n")
    log = tmp_path / "log.jsonl"
    env = {**os.environ, "ALONE_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(suite)])}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "3", "--dist",
                           "loadfile", "-p", "no:cacheprovider", "--basetemp",
                           str(tmp_path / "bt"), str(suite)], cwd=suite, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = {name: (worker, t0, t1) for name, worker, t0, t1 in
            map(json.loads, log.read_text().splitlines())}
    assert len(runs) == 6, sorted(runs)

    def overlap(a: str, b: str) -> bool:
        return runs[a][1] < runs[b][2] and runs[b][1] < runs[a][2]
    others = [n for n in runs if not n.startswith("alone")]
    for a in ("alone0", "alone1"):
        assert not [o for o in others if overlap(a, o)], (a, runs)
    # the others did run side by side, so the check above could fail
    assert any(overlap(f"b{i}", f"c{j}") for i in (1, 2) for j in (1, 2)), runs


def test_a_process_forked_during_a_test_does_not_keep_its_lock(tmp_path, monkeypatch):
    """A child the test forked, still running after the test, would hold the test's shared
    lock (an open file it shares) and keep every ``alone`` test waiting for it."""
    import fcntl
    import signal
    import time
    from types import SimpleNamespace

    import alone

    monkeypatch.setattr(alone, "_lock", None)
    config = SimpleNamespace(option=SimpleNamespace(basetemp=str(tmp_path / "gw0")))
    alone._take(config, exclusive=False)
    ready, tell = os.pipe()
    child = os.fork()
    if child == 0:                # past the fork's hooks: say so, then outlive the test
        os.write(tell, b"x")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(ready, 1) == b"x"
        alone._release()                              # the test ends, its child runs on
        with open(tmp_path / "rw", "a") as other:     # an alone test of another process
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)   # BlockingIOError if kept
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready)
        os.close(tell)
