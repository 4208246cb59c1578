"""Labels fanned out over a 2-process Dask cluster equal the serial run object by object;
a run that died half-way is resumed (its versions adopted, done blocks kept) by the
fan-out, with the same result; the command line takes --workers."""

from __future__ import annotations

import json
import shutil

import pytest

from actstore.errors import ActstoreError
from actstore.label import blocks
from actstore.label.labels import prepare_labels, write_labels
from actstore.label.providers import get_provider
from actstore.label.settings import LabelSettings
from actstore.store import labelsets
from flows.cli import main
from flows.label import label_flow
from storecheck import assert_same_store

TARGETS = ["depth", "salient"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The serial run and each worker with one torch thread: conv sums depend on it."""
    monkeypatch.setenv("ACTSTORE_THREADS", "1")


@pytest.fixture(scope="module")
def serial(tmp_path_factory, tiny_store):
    with pytest.MonkeyPatch.context() as env:   # a value set before the tests is put back
        env.setenv("ACTSTORE_THREADS", "1")
        uri = str(tmp_path_factory.mktemp("fan") / "serial.zarr")
        shutil.copytree(tiny_store, uri)
        write_labels(uri, "toyworld", TARGETS, progress=False)
    return uri


class Dies:
    """The toy labeler, failing (not with bad labels: as a crash would) after ``n`` calls."""

    def __init__(self, n: int):
        self.real, self.n = get_provider("toyworld"), n
        self.spec, self.targets = self.real.spec, self.real.targets
        self.provenance, self.name = self.real.provenance, self.real.name

    def __call__(self, images):
        self.n -= 1
        if self.n < 0:
            raise RuntimeError("worker died")
        return self.real(images)


def test_fanout_equals_serial_and_resumes(tmp_path, tiny_store, serial, prefect_harness):
    uri = str(tmp_path / "fan.zarr")
    shutil.copytree(tiny_store, uri)
    # A run that died in pass 2: pass 1 and one block of pass 2 recorded.
    dies = Dies(5)    # 4 blocks: 4 calls in pass 1, then pass 2 dies in its second block
    with pytest.raises(RuntimeError, match="worker died"):
        write_labels(uri, dies, TARGETS, progress=False)
    (version,) = {p.rsplit("/", 1)[-1] for p in _uncommitted(uri)}
    out = label_flow(uri, "toyworld", TARGETS, workers=2, progress=False)
    assert out["depth"]["blocks_resumed"] == {"pass1": 4, "pass2": 1}
    assert labelsets.current(uri)["depth"]["version"] == version
    assert_same_store(uri, serial)


def _uncommitted(uri: str) -> list[str]:
    from pathlib import Path

    return [str(p.parent) for p in Path(uri, "labels").glob("*/v-*/_pending")]


def test_cli_workers_equal_serial(tmp_path, tiny_store, serial, capsys, prefect_harness):
    uri = str(tmp_path / "cli.zarr")
    shutil.copytree(tiny_store, uri)
    assert main(["--quiet", "--json", "label", "--store", uri, "--provider", "toyworld",
                 "--target", *TARGETS, "--workers", "2"]) == 0
    out = json.loads(capsys.readouterr().out.split("\n\n")[0])
    assert out["depth"]["workers"] == 2
    assert_same_store(uri, serial)


def test_workers_need_prefect(tmp_path, tiny_store, capsys):
    assert main(["--no-prefect", "label", "--store", tiny_store, "--provider", "toyworld",
                 "--target", "depth", "--workers", "2"]) == 2
    assert "drop --no-prefect" in capsys.readouterr().err


def test_job_of_other_settings_is_not_adopted(tmp_path, tiny_store):
    """A dead run of another job is collected, not resumed."""
    uri = str(tmp_path / "s.zarr")
    shutil.copytree(tiny_store, uri)
    prov = get_provider("toyworld")
    job = prepare_labels(uri, prov, TARGETS, LabelSettings(on_x0=False))
    labelsets.release(job.paths)                      # its writer is gone
    other = prepare_labels(uri, prov, TARGETS, LabelSettings(on_x0=True))
    assert other.paths != job.paths
    assert _uncommitted(uri) and all(p.endswith(other.paths["depth"].rsplit("/", 1)[-1])
                                     for p in _uncommitted(uri))
    labelsets.release(other.paths)


def test_unreachable_cluster_is_one_line(tiny_store, capsys):
    import time

    t0 = time.monotonic()
    assert main(["label", "--store", tiny_store, "--provider", "toyworld", "--target",
                 "depth", "--cluster", "tcp://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cluster tcp://127.0.0.1:9" in err[0], err
    assert time.monotonic() - t0 < 30


def test_fanout_bars_count_what_each_pass_does(tmp_path, tiny_store):
    """Pass 1 labels each final image once, pass 2 each step's x0 image: pass 1's bar
    counted images under the unit 'img-step' (a soak run's '0/128 img-step', then
    '9.06s/img-step'), pass 2's image-steps. The real command, its temporary Prefect API
    and one local worker process."""
    import re

    from test_cli import run

    uri = str(tmp_path / "bars.zarr")
    shutil.copytree(tiny_store, uri)
    res = run("label", "--store", uri, "--provider", "toyworld", "--target", "depth",
              "--workers", "1", timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    bars = [b for b in re.split(r"[\r\n]", res.stderr) if b.startswith("label pass")]
    pass1 = [b for b in bars if b.startswith("label pass1")]
    pass2 = [b for b in bars if b.startswith("label pass2")]
    assert pass1 and pass2, res.stderr[-2000:]
    assert all("img-step" not in b and "/16 " in b and "image" in b for b in pass1), pass1
    assert all("img-step" in b for b in pass2) and "/64 " in pass2[-1], pass2


@pytest.mark.parametrize("case", ["target", "store", "existing"])
def test_fan_out_refuses_bad_input_before_it_reaches_a_cluster(case, tiny_store,
                                                               explore_store, tmp_path):
    """`label --workers 2 --target dpth` started its local cluster (43 s on a loaded
    2-core machine, against 9 s in process) before the store and targets were looked at.
    The oracle: with an unreachable --cluster, a check made first names the input, one made
    after the cluster names the address."""
    from conftest import tree_digest

    store, target, words = {
        "target": (tiny_store, "dpth", "makes no target 'dpth'"),
        "store": (str(tmp_path / "nope.zarr"), "depth", "does not exist"),
        "existing": (explore_store, "depth", "already has labels 'depth'"),
    }[case]
    before = tree_digest(explore_store)
    with pytest.raises(ActstoreError, match=words):
        label_flow.fn(store, "toyworld", target, cluster="tcp://127.0.0.1:9")
    assert tree_digest(explore_store) == before
