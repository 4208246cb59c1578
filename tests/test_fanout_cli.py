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
    """A 2-step store rerun with --steps 3: refused by the planning task on a worker."""
    uri = str(tmp_path / "s.zarr")
    argv = ["materialize", "--model", "tiny-random", "--prompts", DEMO, "--store", uri,
            "--images", "0:8", "--workers", "2"]
    ok = run("--quiet", *argv, *SMALL, api=api)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == "" and "8 images generated in 2 blocks" in ok.stdout
    before, since = tree_digest(uri), datetime.now(timezone.utc)
    res = run(*argv, *SMALL[2:], "--steps", "3", api=api)
    assert res.returncode == 2
    assert "steps" in refusal(res.stderr), res.stderr
    assert run_counts("plan-regions", since) == [1]
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
    assert "prompt is 1200 tokens" in refusal(res.stderr), res.stderr
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


def test_intervene_refusal_on_a_worker(api, copy):
    before, since = tree_digest(copy), datetime.now(timezone.utc)
    res = run("intervene", "--store", copy, "--probe-run", "nosuch", "--workers", "2",
              api=api)
    assert res.returncode == 2
    assert "no probe run 'nosuch'" in refusal(res.stderr), res.stderr
    assert run_counts("intervene-plan", since) == [1]
    assert tree_digest(copy) == before


def test_refusal_on_a_running_cluster_is_one_line_and_not_retried(api, tmp_path):
    """--cluster ADDRESS: workers started elsewhere (their logs stay on their consoles)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        refuse_long_prompt(api, tmp_path, "--cluster", cluster.scheduler_address)
