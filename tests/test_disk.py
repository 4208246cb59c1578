"""A full disk and a read-only store, on a real tmpfs in a private mount namespace: one
well-formed line naming where it failed, exit 2, and what holds of the store.

A full disk in mid-run: every file the store had is byte-identical and readers see the
same labels; what the run wrote before the disk filled (a pending version, its blocks) is
invisible, and once space is freed the same command resumes or collects it, leaving no
writer mark behind. A read-only store: not a byte changes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from actstore.store.view import open_store
from conftest import REPO
from test_cli import one_line

NAMESPACE = shutil.which("unshare")
# Printed before and after each run, inside the namespace: every file's sha256, and what
# a reader sees (each visible label target and the version holding it).
STATE = ("import json, sys; sys.path.insert(0, 'tests'); from conftest import tree_digest; "
         "from actstore.store import labelsets; u = sys.argv[1]; "
         "print(json.dumps({'files': tree_digest(u), 'visible': {t: a['path'] for t, a in "
         "labelsets.current(u).items()}}))")
LINE = re.compile(r"^actstore label: error: No space left on device(: \S+| writing to \S+); "
                  r"free space, then rerun the same command")


def _in_namespace(script: str, tmp_path: Path) -> dict:
    """Run a shell script as root of a fresh user + mount namespace; its mounts vanish
    with it. Skips where the kernel or container forbids unprivileged namespaces."""
    if NAMESPACE is None or subprocess.run([NAMESPACE, "-rm", "true"],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs unprivileged user and mount namespaces (unshare -rm)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PY": sys.executable}
    env.pop("PREFECT_API_URL", None)
    res = subprocess.run([NAMESPACE, "-rm", "bash", "-euc", script], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _namespace_run(tmp_path: Path, setup: str, argv: str, then: str = "") -> dict:
    """``setup``, then the command: its exit code, stderr and the store's state before and
    after; with ``then`` (a shell step, e.g. freeing space) also the same command rerun
    after it, and the state after that."""
    state = f'(cd {REPO} && "$PY" -c "{STATE}" {tmp_path}/mnt/s.zarr)'
    command = f'(cd {REPO} && "$PY" -m flows.cli --quiet {argv})'
    rerun = f"""{then}
set +e; {command} > out2.txt 2> err2.txt; code2=$?; set -e
final=$( {state} )""" if then else "code2=0; final=null"
    script = f"""
mkdir -p mnt
{setup}
before=$( {state} )
set +e; {command} > out.txt 2> err.txt; code=$?; set -e
after=$( {state} )
{rerun}
"$PY" -c "import json, sys; print(json.dumps({{'code': $code, 'err': open('err.txt').read(),
  'before': json.loads(sys.argv[1]), 'after': json.loads(sys.argv[2]), 'code2': $code2,
  'final': json.loads(sys.argv[3])}}))" "$before" "$after" "$final"
"""
    return _in_namespace(script, tmp_path)


@pytest.fixture(params=["labelled", "fresh"])
def store(request, tmp_path, tiny_store) -> str:
    """A copy of the reference store, with a 'depth' target (labelled) or without labels."""
    from actstore.label.labels import write_labels

    uri = str(tmp_path / "s.zarr")
    shutil.copytree(tiny_store, uri)
    if request.param == "labelled":
        ids = list(open_store(uri).images["image"].values)
        np.savez(tmp_path / "depth.npz", image_id=np.array(ids),
                 depth=np.random.default_rng(0).normal(size=(len(ids), 64, 64)))
        write_labels(uri, f"array:{tmp_path / 'depth.npz'}", "depth", on_x0=False,
                     progress=False)
    return uri


def test_full_disk_keeps_committed_contents_and_the_rerun_finishes(tmp_path, store):
    """Labels (full + pooled + x0) do not fit in the space left: ENOSPC in mid-run."""
    size = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file())
    setup = (f"mount -t tmpfs -o size={size // 1024 + 2048}k tmpfs mnt && "
             f"cp -r {store} mnt/s.zarr && "
             "dd if=/dev/zero of=mnt/filler bs=1k count=1900 status=none || true")
    got = _namespace_run(tmp_path, setup, f"--no-prefect label --store {tmp_path}/mnt/s.zarr "
                         "--provider toyworld --target shading", then="rm mnt/filler")
    assert got["code"] == 2, got["err"]
    assert LINE.match(one_line(got["err"])), got["err"]
    before, after, final = got["before"], got["after"], got["final"]
    assert {k: after["files"].get(k) for k in before["files"]} == before["files"]
    assert after["visible"] == before["visible"]
    assert all(k.startswith("labels/") for k in set(after["files"]) - set(before["files"]))
    assert got["code2"] == 0
    assert final["visible"] == {**before["visible"], "shading": final["visible"]["shading"]}
    assert not [k for k in final["files"] if "_pending" in k]
    live = final["visible"]["shading"] + "/"
    assert all(k.startswith(live) for k in final["files"] if k.startswith("labels/shading/v-"))


def test_read_only_store_is_one_line(tmp_path, store):
    setup = (f"mount -t tmpfs tmpfs mnt && cp -r {store} mnt/s.zarr && "
             "mount -o remount,ro mnt")
    got = _namespace_run(tmp_path, setup, f"--no-prefect label --store {tmp_path}/mnt/s.zarr "
                         "--provider toyworld --target salient")
    assert got["code"] == 2 and got["after"] == got["before"], got
    assert "Read-only file system" in one_line(got["err"])
