"""Fanned-out commands (``--workers 2``: a real local cluster) as a user meets them, in the
default (Prefect) mode: a refusal found on a worker is one line on stderr, is not retried
(the Prefect API's task runs say how often each ran), and leaves the store as it was;
``--quiet`` prints nothing on stderr on success."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone

import numpy as np
import pytest

from actstore.store.view import open_store
from conftest import DEMO, tree_digest
from test_cli import one_line, run

SMALL = ["--steps", "2", "--batch-size", "4", "--block-size", "4"]


@pytest.fixture(scope="module")
def api(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def refusal(err: str) -> str:
    """The one line a refusal prints, after any progress bar lines that ran before it."""
    return one_line("\n".join(ln for ln in err.splitlines() if "%|" not in ln))


def run_counts(task_name: str, since: datetime) -> list[int]:
    """How many times each task run named ``task_name-*`` started since ``since`` ran."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (TaskRunFilter, TaskRunFilterName,
                                                TaskRunFilterStartTime)

    flt = TaskRunFilter(name=TaskRunFilterName(like_=task_name),
                        start_time=TaskRunFilterStartTime(after_=since))
    with get_client(sync_client=True) as client:
        return [r.run_count for r in client.read_task_runs(task_run_filter=flt)]


def test_materialize_quiet_then_a_refusal_on_a_worker(api, tmp_path):
    """A 2-step store rerun with other weights: refused by the planning task on a worker
    (only the loaded model tells), which ran once. Rerun with --steps 3: refused by the
    command, no planning task at all (before 2026-12-06 the worker found that too)."""
    from actstore.generation.models import save_pipeline_folder, tiny_random_components

    uri = str(tmp_path / "s.zarr")
    argv = ["materialize", "--prompts", DEMO, "--store", uri, "--images", "0:8",
            "--workers", "2"]
    ok = run("--quiet", *argv, "--model", "tiny-random", *SMALL, api=api)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == "" and "8 images generated in 2 blocks" in ok.stdout
    other = save_pipeline_folder(tmp_path / "other", tiny_random_components(seed=1))
    before, since = tree_digest(uri), datetime.now(timezone.utc)
    res = run(*argv, "--model", str(other), *SMALL, api=api)
    assert res.returncode == 2
    assert "weights_sha256" in refusal(res.stderr), res.stderr
    assert run_counts("plan-regions", since) == [1]
    since = datetime.now(timezone.utc)
    res = run(*argv, "--model", "tiny-random", *SMALL[2:], "--steps", "3", api=api)
    assert res.returncode == 2
    assert "generation.steps" in refusal(res.stderr), res.stderr
    assert run_counts("plan-regions", since) == []
    assert tree_digest(uri) == before


def refuse_long_prompt(api, tmp_path, *placement: str) -> None:
    """An over-long prompt, refused by the planning task on a worker: one line, the task
    run once (not retried), no store created."""
    table = tmp_path / "long.csv"
    table.write_text("image_id,prompt,seed,split\na,a cat,1,train\nb,"
                     + " ".join(["word"] * 300) + ",2,test\n")
    uri = tmp_path / "new.zarr"
    since = datetime.now(timezone.utc)
    res = run("materialize", "--model", "tiny-random", "--prompts", str(table), "--store",
              str(uri), *SMALL, *placement, api=api)
    assert res.returncode == 2
    line = refusal(res.stderr)
    # the table the user gave, the same on every worker: no worker to look at
    assert "prompt is 1200 tokens" in line and "Dask worker" not in line, res.stderr
    assert run_counts("plan-regions", since) == [1]
    assert not uri.exists()


def test_long_prompt_refused_on_a_worker_creates_nothing(api, tmp_path):
    refuse_long_prompt(api, tmp_path, "--workers", "2")


@pytest.fixture()
def copy(tmp_path, tiny_store) -> str:
    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(tiny_store, uri)
    return uri


def test_label_quiet_then_nan_labels_refused_on_a_worker(api, tmp_path, copy):
    ids = list(open_store(copy).images["image"].values)
    depth = np.random.default_rng(0).normal(size=(len(ids), 64, 64))
    np.savez(tmp_path / "good.npz", image_id=np.array(ids), depth=depth)
    depth[5, 3, 3] = np.nan
    np.savez(tmp_path / "nan.npz", image_id=np.array(ids), shade=depth)
    argv = ["label", "--store", copy, "--no-x0", "--workers", "2", "--provider"]
    ok = run("--quiet", *argv, f"array:{tmp_path / 'good.npz'}", "--target", "depth", api=api)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == "" and "labels 'depth'" in ok.stdout
    before, since = tree_digest(copy), datetime.now(timezone.utc)
    res = run(*argv, f"array:{tmp_path / 'nan.npz'}", "--target", "shade", api=api)
    assert res.returncode == 2
    assert "labels contain NaN/inf" in refusal(res.stderr), res.stderr
    counts = run_counts("label-blocks", since)
    assert counts and set(counts) == {1}, counts
    assert tree_digest(copy) == before


def test_intervene_refusal_on_a_worker(api, tmp_path, copy):
    """A targets file the worker that plans cannot find (it reads it, and may be on
    another machine than the user's shell: the line names it); a --provider of the wrong
    kind is the user's wherever it is found (before 2026-12-06 it named the worker)."""
    from actstore.label.labels import write_labels
    from actstore.probe.runs import run_probes

    write_labels(copy, "toyworld", "salient", on_x0=False, progress=False)
    probe_run = run_probes(copy, "salient", layers=["up_blocks.3.attentions.0"], steps=[0],
                           scheduler="sync", progress=False)
    before, since = tree_digest(copy), datetime.now(timezone.utc)
    res = run("intervene", "--store", copy, "--probe-run", probe_run, "--layers",
              "up_blocks.3.attentions.0", "--steps", "0", "--targets",
              str(tmp_path / "none.npz"), "--workers", "2", api=api)
    assert res.returncode == 2
    line = refusal(res.stderr)
    assert "none.npz: does not exist" in line and "(on Dask worker tcp://" in line, line
    assert run_counts("intervene-plan", since) == [1]
    assert tree_digest(copy) == before
    # a provider that cannot read images is so by its kind, on every worker: none named
    ids = list(open_store(copy).images["image"].values)
    np.savez(tmp_path / "l.npz", image_id=np.array(ids), salient=np.zeros((len(ids), 64, 64)))
    res = run("intervene", "--store", copy, "--probe-run", probe_run, "--layers",
              "up_blocks.3.attentions.0", "--steps", "0", "--provider",
              f"array:{tmp_path / 'l.npz'}", "--workers", "2", api=api)
    assert res.returncode == 2
    line = refusal(res.stderr)
    assert "looks labels up by image id" in line and "Dask worker" not in line, line
    assert tree_digest(copy) == before


@pytest.mark.alone   # refused in seconds: run while no other test runs (tests/alone.py)
@pytest.mark.parametrize("options,words", [
    (["--images", "2:6"], "--images 2:6: not aligned to the store's 4-image blocks"),
    (["--block-size", "8"], "has block size 4, not 8; drop --block-size")],
    ids=["images", "block-size"])
def test_materialize_typos_the_store_finds_are_refused_here_at_once(copy, options, words):
    """--images or --block-size that do not fit the store's blocks are the user's typo:
    refused by the command's process in seconds (before a local cluster or a Prefect
    server starts), naming no worker, the store unchanged. Before, the worker that plans
    found them after ~30 s of start-up and the line named it ('(on Dask worker ...)')."""
    import time

    before, t0 = tree_digest(copy), time.monotonic()
    res = run("materialize", "--model", "tiny-random", "--prompts", DEMO, "--store", copy,
              *options, "--workers", "1", "--device", "cpu", timeout=300)
    took = time.monotonic() - t0
    assert res.returncode == 2, res.stderr[-3000:]
    line = refusal(res.stderr)
    assert words in line and "Dask worker" not in line, line
    assert took < 20, f"refused after {took:.1f} s: {line}"
    assert tree_digest(copy) == before


def test_a_size_the_model_cannot_make_is_the_users_on_a_worker(api, tmp_path):
    """--height the model's VAE cannot make: the option's fault on every worker, so the
    line names none; nothing created. Since 2026-12-06 the command finds it in the model
    folder's configs, before a worker starts (it was found where the model loads)."""
    uri = tmp_path / "new.zarr"
    res = run("materialize", "--model", "tiny-random", "--prompts", DEMO, "--store",
              str(uri), *SMALL, "--height", "60", "--workers", "1", api=api)
    assert res.returncode == 2, res.stderr[-3000:]
    line = refusal(res.stderr)
    assert "--height/--width 60x" in line and "Dask worker" not in line, line
    assert not uri.exists()


def test_refusal_on_a_running_cluster_is_one_line_and_not_retried(api, tmp_path):
    """--cluster ADDRESS: workers started elsewhere (their logs stay on their consoles)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        refuse_long_prompt(api, tmp_path, "--cluster", cluster.scheduler_address)
