"""A --device no machine has (``gpu``, ``cuda:x``) or this one lacks (``cuda`` without
CUDA) is refused by every command that takes it in one line, exit 2, at once: before a
local cluster, a Prefect server or a store starts, nothing written. Before, ``--workers 2
--device gpu`` was refused by the workers' model load once the local cluster was up (31 s
for `actstore label` here, 2026-12-06), and ``cuda:x`` was called 'no GPU visible'."""

from __future__ import annotations

import shutil
import time

import pytest

from conftest import DEMO, IV_LAYERS, IV_STEPS, tree_digest
from storecheck import snapshot
from test_cli import api, one_line, run  # noqa: F401 (api: a fixture)
from test_cluster_workers import user_cluster  # noqa: F401 - a fixture

# Starting the interpreter and importing the command's modules (torch for a CUDA name)
# takes 2-4 s on the shared 2-core machine (up to 18 s loaded); starting a local cluster of
# 2 workers first took 30-99 s here.
AT_ONCE_S = 20.0
COMMANDS = {
    "materialize": ["--model", "tiny-random", "--prompts", DEMO, "--workers", "2"],
    "label": ["--provider", "toyworld", "--target", "depth", "--workers", "2"],
    "intervene": ["--probe-run", "depth-20261206T000000000000-000000", "--workers", "2"],
    "sweep": ["--probe-run", "depth-20261206T000000000000-000000", "--workers", "2"],
    "main": ["--workers", "2"],
}


def _devices() -> list[tuple[str, str]]:
    import torch

    bad = [("gpu", "--device 'gpu' is not understood; use cpu, cuda[:N] or auto"),
           ("cuda:x", "--device 'cuda:x' is not understood"),
           # torch refuses a leading zero ('Invalid device string'): on a machine with two
           # GPUs this passed the name check and failed in torch.device, a traceback
           ("cuda:01", "--device 'cuda:01' is not understood")]
    if torch.cuda.is_available():
        return bad
    return [*bad, ("cuda", "--device cuda")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_store) -> str:
    dst = tmp_path_factory.mktemp("devices") / "s.zarr"
    shutil.copytree(tiny_store, dst)
    return str(dst)


@pytest.mark.alone   # refused in seconds: run while no other test runs (tests/alone.py)
@pytest.mark.parametrize("device,words", _devices(), ids=lambda v: v.split(" ")[0])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_device_no_machine_or_not_this_one_has_is_refused_at_once(tmp_path, reference,
                                                                   command, device, words):
    where = ["--out", str(tmp_path / "main")] if command == "main" else \
        ["--store", reference]
    before = tree_digest(reference)
    start = time.monotonic()
    proc = run(command, "--quiet", *where, *COMMANDS[command], "--device", device, timeout=300)
    took = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert words in line, line
    assert took < AT_ONCE_S, f"refused after {took:.1f} s: {line}"
    assert tree_digest(reference) == before
    assert list(tmp_path.iterdir()) == []


def test_on_a_cluster_the_workers_not_this_machine_have_the_gpu(tmp_path, user_cluster,
                                                                 api):  # noqa: F811
    """``--cluster ADDRESS --device cuda`` from a machine without CUDA (a login node, a
    laptop) sends the work to the cluster's GPUs: this machine's CUDA is not asked. Until
    2026-12-06 (the early check) it was, and the command was refused here, though its
    workers, not this process, load the model. The name is still checked here at once."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: its refusal cannot be told from the workers'")
    user_cluster.worker()
    user_cluster.wait_for(1)
    store = tmp_path / "s.zarr"
    for device, words in (("cuda", "--device cuda: CUDA is not available on this machine; "
                                   "use --device cpu or auto (on Dask worker"),
                          ("gpu", "--device 'gpu' is not understood")):
        proc = run("--quiet", "materialize", "--model", "tiny-random", "--prompts", DEMO,
                   "--store", str(store), "--steps", "2", "--images", "0:4", "--cluster",
                   user_cluster.address, "--device", device, api=api, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = one_line(proc.stderr)
        assert words in line, line
        assert not store.exists()


@pytest.fixture(scope="module")
def probed_reference(tmp_path_factory, reference) -> tuple[str, str]:
    """The reference store labelled by a label model workers load by name (toyworld) and a
    probe run on it, for intervene and sweep: (store, probe run)."""
    from actstore.label.labels import write_labels
    from actstore.probe.runs import run_probes

    uri = str(tmp_path_factory.mktemp("probed") / "s.zarr")
    shutil.copytree(reference, uri)
    write_labels(uri, "toyworld", "salient", on_x0=False, progress=False)
    run_id = run_probes(uri, "salient", layers=IV_LAYERS, steps=IV_STEPS,
                        scheduler="threads", progress=False)
    return uri, run_id


def _fanned_out_runs(uri: str) -> list:
    """The Prefect API's intervene-blocks flow runs on store ``uri``: an experiment's
    blocks sent to the cluster's workers."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["intervene-blocks"])))
    return [r for r in runs if r.parameters.get("store") == uri]


@pytest.mark.parametrize("command", ["label", "intervene", "sweep"])
def test_a_cluster_command_asks_its_workers_for_the_gpu(tmp_path, reference, probed_reference,
                                                        user_cluster, api,  # noqa: F811
                                                        command):
    """``label``/``intervene``/``sweep --cluster ADDRESS --device cuda`` from a machine
    without CUDA: the workers load the models, so this machine is asked only the name. A
    worker without CUDA (this machine's, started as a user would) refuses in one line
    naming itself, before the run begins in the store, which stays as it was, and before
    any task goes to a worker. Until 2026-12-06 the label command refused it here ('CUDA
    is not available on this machine', of the machine with no GPU to use), as it described
    the label model on its own device; and intervene and sweep asked only the worker that
    planned the experiment (a first task sent to the cluster): on a cluster where it had
    the device and another worker had not, that worker's block group failed after the
    experiment existed in the store."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: its refusal cannot be told from the workers'")
    store = str(tmp_path / "s.zarr")
    if command == "label":
        shutil.copytree(reference, store)
        args = ["--provider", "toyworld", "--target", "depth", "--no-x0"]
    else:
        shutil.copytree(probed_reference[0], store)
        args = ["--probe-run", probed_reference[1], "--n-targets", "2"]
        args += ["--layers", *IV_LAYERS, "--steps", *map(str, IV_STEPS), "--images", "0:16"] \
            if command == "intervene" else \
            ["--kinds", "attn1", "--step-counts", "1", "--strength", "1", "--validation", "3",
             "--evaluation", "3", "--max-edit-size", "1e6"]
    before = snapshot(store)
    user_cluster.worker()
    user_cluster.wait_for(1)
    proc = run("--quiet", command, "--store", store, *args, "--cluster",
               user_cluster.address, "--device", "cuda", api=api, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line(proc.stderr)
    assert line.startswith(f"actstore {command}: error: --device cuda: CUDA is not "
                           "available on this machine; use --device cpu or auto (on Dask "
                           "worker tcp://"), line
    assert snapshot(store) == before
    assert _fanned_out_runs(store) == []
