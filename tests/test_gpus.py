"""``--workers N --device cuda``: each local worker process gets a GPU of its own, through
``CUDA_VISIBLE_DEVICES`` set in it at birth (:mod:`actstore.gpus`). This machine has no
GPU, so the GPUs are named the way a user names them, by the parent's
``CUDA_VISIBLE_DEVICES`` (torch is never asked about them then): the real path, with real
worker processes, up to the point where a worker would put its model on its GPU.

Refusals (a ``cuda:N`` index with workers, more workers than GPUs, no GPU) are one line,
exit 2, before anything is written, from the real command line."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from actstore.errors import ActstoreError
from conftest import DEMO, tree_digest
from test_cli import one_line, run


def _worker_env(workers: int, device: str) -> list[tuple[str | None, str | None]]:
    """Each worker's (CUDA_VISIBLE_DEVICES, ACTSTORE_THREADS), from inside the worker
    processes of the local cluster the commands start."""
    from distributed import Client

    from actstore.cluster import local_workers

    with local_workers(workers, device) as address, Client(address) as client:
        seen = client.run(lambda: (os.environ.get("CUDA_VISIBLE_DEVICES"),
                                   os.environ.get("ACTSTORE_THREADS")))
    assert len(seen) == workers
    return sorted(seen.values(), key=str)


def test_each_worker_gets_its_own_gpu(monkeypatch):
    """Three GPUs named by the parent, two workers: the first two, one each, and the rest
    of the workers' environment (their torch threads) as on the CPU. Before, each worker
    inherited all three and put its model on cuda:0, the same GPU."""
    from actstore.cluster import worker_threads

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    threads = str(worker_threads(2))
    assert _worker_env(2, "cuda") == [("3", threads), ("5", threads)]


def test_as_many_workers_as_gpus_uuids_and_cuda0(monkeypatch):
    """GPUs named by UUID (as nvidia-smi -L prints them) are handed out as given, every one
    used; cuda:0 is each worker's own GPU, as cuda is."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa, GPU-bb")
    assert [gpu for gpu, _ in _worker_env(2, "cuda:0")] == ["GPU-aa", "GPU-bb"]


@pytest.mark.parametrize("device", ["cpu", "auto"])   # auto is the CPU here
def test_cpu_workers_keep_the_environment(monkeypatch, device):
    """A CPU run changes nothing in its workers' environment: the parent's
    CUDA_VISIBLE_DEVICES, set or not, is what each worker has."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    assert [gpu for gpu, _ in _worker_env(2, device)] == ["3,5,7", "3,5,7"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [gpu for gpu, _ in _worker_env(1, device)] == [None]


def test_gpu_list_as_cuda_reads_it(monkeypatch):
    """CUDA stops at the list's first invalid entry (-1 hides every GPU); with no list,
    torch counts the devices (none on this machine)."""
    from actstore.gpus import visible_gpus, worker_gpus

    for listed, gpus in [("0,1", ["0", "1"]), ("2,-1,3", ["2"]), ("-1", []), ("", []),
                         (" 4 , 6 ,", ["4", "6"])]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
        assert visible_gpus() == gpus, listed
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() == []
    with pytest.raises(ActstoreError, match="no GPU visible"):
        worker_gpus("cuda", 1)
    assert worker_gpus("cpu", 8) is None and worker_gpus("auto", 8) is None


@pytest.fixture()
def small_store(tmp_path, tiny_store) -> str:
    dst = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, dst)
    return str(dst)


def _refused(argv: list[str], gpus: str | None, store: str | None = None) -> str:
    """The command's one line (exit 2); ``store`` (if given) is unchanged."""
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    before = tree_digest(store) if store else None
    proc = run(*argv, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    if store:
        assert tree_digest(store) == before
    return one_line(proc.stderr)


@pytest.mark.parametrize("command", ["label", "intervene"])
def test_more_workers_than_gpus_refused(small_store, command):
    args = {"label": ["--provider", "toyworld", "--target", "depth"],
            "intervene": ["--probe-run", "any"]}[command]
    line = _refused([command, "--quiet", "--store", small_store, *args, "--workers", "4",
                     "--device", "cuda"], "3,5,7", small_store)
    assert "--workers 4 --device cuda: 3 GPU(s) visible" in line and "3,5,7" in line, line
    # --device is auto unless given (label and intervene since 2026-12-06): a run that
    # fanned out on the CPU before is refused on a GPU machine, so the line names the CPU
    assert "use --workers 3 or fewer, or --device cpu" in line, line


def test_cuda_index_with_workers_refused(small_store):
    line = _refused(["label", "--quiet", "--store", small_store, "--provider", "toyworld",
                     "--target", "depth", "--workers", "2", "--device", "cuda:1"],
                    "3,5,7", small_store)
    assert "--device cuda:1 with --workers 2" in line and "use --device cuda" in line, line


def test_materialize_without_gpus_refused_before_the_store(tmp_path):
    """No GPU visible: refused before the store is made (nothing on disk)."""
    store = tmp_path / "new.zarr"
    line = _refused(["materialize", "--quiet", "--model", "tiny-random", "--prompts", DEMO,
                     "--store", str(store), "--steps", "2", "--workers", "2",
                     "--device", "cuda"], "")
    assert "no GPU visible" in line and "--device cpu" in line, line
    assert not store.exists() and list(Path(tmp_path).iterdir()) == []


def test_device_defaults_agree():
    """label and intervene default to auto, as materialize and verify (before: cpu, so a
    GPU user's labels and interventions ran on the CPU), and their help says so."""
    from actstore.generation.materialize import MaterializeSettings
    from actstore.intervene.settings import InterventionSettings, SweepSettings
    from actstore.label.settings import LabelSettings
    from flows.cli import build_parser

    assert (LabelSettings().device == InterventionSettings().device
            == SweepSettings().base.device == MaterializeSettings().device == "auto")
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("label", "intervene", "sweep", "main"):
        device = next(a for a in sub[command]._actions if a.dest == "device")
        assert "default auto" in device.help, (command, device.help)


def test_where_they_run_changes_no_id(tmp_path, ivstore):
    """An experiment planned on cpu and on auto (a GPU where there is one) has one id, and
    a label run begun on one device resumes its version on the other."""
    from conftest import IV_LAYERS, IV_STEPS, PixelLabels

    from actstore.intervene.plan import plan_interventions
    from actstore.intervene.settings import InterventionSettings
    from actstore.label.labels import prepare_labels
    from actstore.label.settings import LabelSettings
    from actstore.store import labelsets

    plans = [plan_interventions(ivstore["uri"], ivstore["runs"]["depth"],
                                InterventionSettings(device=device, n_targets=1,
                                                     provider=PixelLabels(),
                                                     layers=IV_LAYERS, steps=IV_STEPS))
             for device in ("cpu", "auto")]
    assert plans[0].experiment_id == plans[1].experiment_id
    store = str(tmp_path / "s.zarr")
    shutil.copytree(ivstore["uri"], store)
    paths = []
    for device in ("cpu", "auto"):
        job = prepare_labels(store, PixelLabels(), "depth",
                             LabelSettings(device=device, overwrite=True))
        labelsets.release(job.paths)
        paths.append(job.paths)
    assert paths[0] == paths[1]


def test_main_job_defaults_to_one_worker_per_visible_gpu(monkeypatch):
    """`actstore main` fans out over default_workers(device): one worker per visible GPU
    now that each gets its own (before: one worker on any number of GPUs, the others
    idle); the CPU's count is unchanged by GPUs it does not use."""
    from actstore.cluster import default_workers

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    assert default_workers("cuda") == 3
    assert default_workers("cuda:0") == 3
    assert default_workers("cpu") == max(1, (os.cpu_count() or 1) // 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert default_workers("cuda") == 1     # none visible: the device check says so
    from flows.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    workers = next(a for a in sub["main"]._actions if a.dest == "workers")
    assert "one per visible GPU" in workers.help, workers.help    # said 'one on a GPU'


def test_main_job_on_one_named_gpu_needs_no_workers(tmp_path):
    """`actstore main --device cuda:1` (no --workers) on a machine of three GPUs fanned out
    over default_workers' three local workers, which refused the device in the line for
    '--device cuda:1 with --workers 3', an option nobody gave; it now runs in this process
    on cuda:1 (here, with no GPU, the device check's own line)."""
    line = _refused(["main", "--quiet", "--device", "cuda:1", "--out", str(tmp_path / "m")],
                    "3,5,7")
    assert "--workers" not in line and "--device cuda:1: CUDA is not available" in line, line


def test_garbled_thread_count_is_one_line_from_the_python_api(monkeypatch):
    """local_workers from Python (a notebook's fan-out) read $ACTSTORE_THREADS with a
    bare int(): 'invalid literal for int()' before any worker started. Now the commands'
    own one-line refusal."""
    from actstore.cluster import local_workers, worker_threads

    monkeypatch.setenv("ACTSTORE_THREADS", "abc")
    for call in (lambda: worker_threads(2), lambda: local_workers(2).__enter__()):
        with pytest.raises(ActstoreError) as err:
            call()
        assert "\n" not in str(err.value) and "ACTSTORE_THREADS='abc'" in str(err.value)
    monkeypatch.setenv("ACTSTORE_THREADS", "3")
    assert worker_threads(2) == 3
