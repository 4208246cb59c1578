"""An intervention experiment fanned out over a real 2-process Dask cluster equals the
serial run object by object (arrays, attributes, block records, summary), resuming a run
that died half-way; the command line takes --workers; a scheduler that does not answer
is one line within seconds and nothing is written."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter

import pytest

from actstore.errors import ActstoreError
from actstore.intervene.plan import plan_interventions
from actstore.intervene.run import begin_experiment, run_blocks, run_interventions
from actstore.intervene.settings import InterventionSettings as IS
from conftest import IV_LAYERS, IV_STEPS, PixelLabels, tree_digest
from flows.cli import main
from flows.cli_report import summary
from storecheck import assert_same_store

# Every image of the store (4 blocks), one shift target, the probe edit and its control.
SETTINGS = IS(layers=IV_LAYERS, steps=IV_STEPS, images="0:16", n_targets=1, device="cpu")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The serial run and each worker with one torch thread: conv sums depend on it."""
    monkeypatch.setenv("ACTSTORE_THREADS", "1")


@pytest.fixture(scope="module")
def probed(tmp_path_factory, tiny_store):
    """The reference store, labelled by a label model workers load by name (toyworld), a
    probe run, and the experiment run serially: (store without it, store with it, run)."""
    from actstore.label.labels import write_labels
    from actstore.probe.runs import run_probes

    with pytest.MonkeyPatch.context() as env:   # a value set before the tests is put back
        env.setenv("ACTSTORE_THREADS", "1")
        root = tmp_path_factory.mktemp("ivfan")
        uri = str(root / "probed.zarr")
        shutil.copytree(tiny_store, uri)
        write_labels(uri, "toyworld", "salient", on_x0=False, progress=False)
        run = run_probes(uri, "salient", layers=IV_LAYERS, steps=IV_STEPS, scheduler="threads",
                         progress=False)
        serial = str(root / "serial.zarr")
        shutil.copytree(uri, serial)
        out = run_interventions(serial, run, SETTINGS, progress=False)
        assert out["complete"] and out["blocks_written"] == 4
    return uri, serial, run


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes, one task and one torch thread each."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, env={"ACTSTORE_THREADS": "1"}) as lc, \
            Client(lc) as client:
        yield client


def test_fan_out_resumes_and_equals_serial(tmp_path, probed, cluster, prefect_harness):
    from actstore.generation.regions import model_loads
    from flows.intervene import intervene_flow

    base, serial, run = probed
    uri = str(tmp_path / "fan.zarr")
    shutil.copytree(base, uri)
    # A run that died after its first block: that block is recorded, the rest is not.
    exp = begin_experiment(plan_interventions(uri, run, SETTINGS))
    run_blocks(exp, exp.pending()[:1])
    out = intervene_flow(uri, run, SETTINGS, cluster=cluster.scheduler.address,
                         progress=False)
    assert out["complete"] and (out["blocks_complete"], out["blocks"]) == (4, 4)
    assert (out["blocks_written"], out["blocks_skipped"]) == (3, 1)
    assert out["workers"] == 2 and sum(Counter(out["groups_by_worker"]).values()) == 3
    assert set(cluster.run(model_loads).values()) <= {0, 1}   # no worker loaded twice
    assert summary("intervene", out).splitlines()[0] == (
        f"{uri}: intervention experiment {out['experiment_id']} complete (4/4 blocks): 3 "
        "blocks written by 2 workers, 1 already stored")
    assert_same_store(uri, serial)
    again = intervene_flow(uri, run, SETTINGS, cluster=cluster.scheduler.address,
                           progress=False)
    assert again["complete"] and again["blocks_written"] == 0 and again["groups"] == 0
    assert_same_store(uri, serial)


def test_cli_workers_equal_serial(tmp_path, probed, capsys, prefect_harness):
    base, serial, run = probed
    uri = str(tmp_path / "cli.zarr")
    shutil.copytree(base, uri)
    assert main(["--quiet", "--json", "intervene", "--store", uri, "--probe-run", run,
                 "--layers", *IV_LAYERS, "--steps", *map(str, IV_STEPS), "--images", "0:16",
                 "--n-targets", "1", "--device", "cpu", "--workers", "2"]) == 0
    out = json.loads(capsys.readouterr().out.split("\n\n")[0])
    assert out["complete"] and out["workers"] == 2 and out["blocks_written"] == 4
    assert_same_store(uri, serial)


@pytest.mark.alone   # refused in seconds: run while no other test runs (tests/alone.py)
def test_unreachable_cluster_is_one_line_and_writes_nothing(probed, capsys):
    base, _, run = probed
    before = tree_digest(base)
    t0 = time.monotonic()
    assert main(["intervene", "--store", base, "--probe-run", run, "--images", "0:16",
                 "--cluster", "tcp://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "actstore intervene: error: --cluster tcp://127.0.0.1:9: "), err
    assert time.monotonic() - t0 < 30
    assert tree_digest(base) == before


def test_fan_out_needs_prefect_and_a_provider_spec(probed, capsys, prefect_harness):
    from flows.intervene import intervene_flow

    base, _, run = probed
    before = tree_digest(base)
    assert main(["--no-prefect", "intervene", "--store", base, "--probe-run", run,
                 "--workers", "2"]) == 2
    assert "drop --no-prefect" in capsys.readouterr().err
    with pytest.raises(ActstoreError, match="pass the provider as a spec"):
        intervene_flow(base, run, SETTINGS.with_(provider=PixelLabels()), workers=2)
    assert tree_digest(base) == before


def test_bad_images_on_workers_blame_no_worker(probed, capsys, prefect_harness):
    """A typo in --images is the user's: refused in the command's process, as without
    --workers, not on the worker that plans (whose address in it sent the user to look at
    that worker's environment)."""
    base, _, run = probed
    before = tree_digest(base)
    assert main(["intervene", "--store", base, "--probe-run", run, "--layers", *IV_LAYERS,
                 "--steps", *map(str, IV_STEPS), "--images", "toy-0000:toy-0000",
                 "--device", "cpu", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "actstore intervene: error: --images 'toy-0000:toy-0000': expected START:STOP"), err
    assert "worker" not in err[0], err
    assert tree_digest(base) == before


def test_input_errors_name_no_worker_store_errors_do(tmp_path, cluster):
    """On a real worker process: a typo (InputError) is the same everywhere, so it names
    no worker; a store missing there may be there for the user's shell, so it names one."""
    from actstore.cluster import names_worker
    from actstore.options import start_stop
    from actstore.store.core import read_root_attrs

    typo = cluster.submit(names_worker(start_stop), "a:b", 16, expected="START:STOP",
                          holder="the store")
    with pytest.raises(ActstoreError) as err:
        typo.result()
    assert str(err.value) == "--images 'a:b': expected START:STOP, e.g. 0:16"
    gone = cluster.submit(names_worker(read_root_attrs), str(tmp_path / "none.zarr"))
    with pytest.raises(ActstoreError, match=r"does not exist.*\(on Dask worker tcp://"):
        gone.result()


def _store_cases(base: str, run: str) -> dict[str, tuple[list[str], str]]:
    """Typos in intervene's options that only the store can tell apart from good input:
    (options, the start of what the one line says)."""
    from actstore.store.view import StoreView

    unprobed = next(la for la in StoreView(base).layers if la not in IV_LAYERS)
    return {
        "layer": (["--layers", unprobed], f"probe run {run}: has no probe for layer "
                                          f"{unprobed!r}"),
        "run": (["--probe-run", "nosuch"], f"store {base}: no probe run 'nosuch' (has: {run})"),
        "step": (["--steps", "2"], f"probe run {run}: has no probe for step 2"),
        "target": (["--target", "depth"], f"probe run {run} probes 'salient', not 'depth'"),
        "variant": (["--model-variant", "randomized"],
                    f"probe run {run}: has no probes for model 'randomized'"),
        "experiment": (["--experiment", "_x"], "--experiment '_x': use letters"),
        "insert": (["--targets", "insert"], "--targets insert copies an object's depth"),
    }


@pytest.mark.alone   # refused in seconds: run while no other test runs (tests/alone.py)
@pytest.mark.parametrize("case", ["layer", "run", "step", "target", "variant", "experiment",
                                  "insert"])
def test_store_typos_on_workers_are_refused_here_at_once(probed, case):
    """A typo the store finds (a layer or step the probe run lacks, a run id it does not
    have, ...) is the user's: refused by the command's process in seconds, before a local
    cluster or a Prefect server starts, naming no worker, nothing written. Before, the
    worker that plans found it after ~30 s of start-up and the line ended '(on Dask worker
    tcp://...)', as if that worker had failed."""
    from test_cli import one_line, run as cli

    base, _, run = probed
    options, words = _store_cases(base, run)[case]
    given = {options[0]}
    argv = [a for opt, values in (("--probe-run", [run]), ("--layers", IV_LAYERS),
                                  ("--steps", list(map(str, IV_STEPS))),
                                  ("--images", ["0:16"])) if opt not in given
            for a in (opt, *values)]
    before = tree_digest(base)
    t0 = time.monotonic()
    proc = cli("--quiet", "intervene", "--store", base, *argv, *options, "--device", "cpu",
               "--workers", "1", timeout=300)
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line(proc.stderr)
    assert line.startswith(f"actstore intervene: error: {words}"), line
    assert "worker" not in line, line
    assert took < 20, f"refused after {took:.1f} s: {line}"
    assert tree_digest(base) == before


@pytest.mark.parametrize("case", ["layer", "run"])
def test_store_typos_found_on_a_worker_name_no_worker(probed, cluster, case):
    """The planning task's own refusal, on a real worker process (a caller of the flow
    that skipped the command's check): the same line, no worker named."""
    from actstore.cluster import names_worker

    base, _, run = probed
    options, words = _store_cases(base, run)[case]
    settings = SETTINGS.with_(layers=(options[1],)) if case == "layer" else SETTINGS
    probe_run = options[1] if case == "run" else run
    before = tree_digest(base)
    with pytest.raises(ActstoreError) as err:
        cluster.submit(names_worker(plan_interventions), base, probe_run, settings).result()
    assert str(err.value).startswith(words) and "worker" not in str(err.value), err.value
    assert tree_digest(base) == before
