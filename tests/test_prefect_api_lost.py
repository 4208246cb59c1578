"""A temporary Prefect server gone mid-run, seen from a library caller: what the command
silences while its API is gone (the loggers of each failed send, ``logging.raiseExceptions``)
is put back when the server's context ends, so later work in the same process, against a
live API, still says when a send fails. The command line's one line: tests/test_cli.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO

SCRIPT = textwrap.dedent("""
    import json, logging, psutil
    from prefect.server.api.server import SubprocessASGIServer
    from flows.prefect_api import SEND_LOGGERS, PrefectApiLost, prefect_api

    def state():
        return [logging.raiseExceptions] + [logging.getLogger(n).disabled
                                            for n in SEND_LOGGERS]

    before, raised = state(), None
    try:
        with prefect_api():
            watch = psutil.Process(SubprocessASGIServer._instances[None].server_process.pid)
            for p in [*watch.children(recursive=True), watch]:
                p.kill()
            watch.wait(30)
            raise RuntimeError("a request of the flow failed")
    except PrefectApiLost as exc:
        raised = str(exc)
    print(json.dumps({"before": before, "after": state(), "raised": raised}))
""")


def test_silence_ends_with_the_servers_context(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_CLIENT_MAX_RETRIES": "1"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["raised"] and seen["raised"].endswith("stopped answering during the run")
    assert seen["before"] == [True, False, False, False, False]
    assert seen["after"] == seen["before"], seen     # was [False, True, True, True, True]
