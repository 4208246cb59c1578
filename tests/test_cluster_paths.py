"""Relative paths on a user's cluster whose workers run in another folder: ``--store`` and
``--figure``/``--figures`` given relative to the command's folder name the same folder on
the workers (every stage that fans out: materialize, label, the probe grid, an intervention
experiment); nothing lands in, or is read from, the workers' own folder."""

from __future__ import annotations

import os

import pytest

from actstore.generation.materialize import completion
from actstore.probe.runs import latest_run
from conftest import DEMO
from flows.cli import main

LAYER = "up_blocks.3.attentions.0"


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """A 2-process cluster whose workers' current folder is an empty one of their own."""
    from distributed import Client, LocalCluster

    folder = tmp_path_factory.mktemp("workers-cwd")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, env={"ACTSTORE_THREADS": "1"}) as lc, \
            Client(lc) as client:
        client.run(os.chdir, str(folder))
        assert set(client.run(os.getcwd).values()) == {str(folder)}
        yield client, folder


def _ok(capsys, *argv: str) -> None:
    code = main(["--quiet", *argv])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()


def test_relative_paths_mean_the_commands_folder_on_the_workers(tmp_path, monkeypatch, capsys,
                                                                 elsewhere, prefect_harness):
    client, folder = elsewhere
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    address = ["--cluster", client.scheduler.address]
    _ok(capsys, "materialize", "--model", "tiny-random", "--prompts", DEMO, "--store", "s.zarr",
        "--steps", "2", "--batch-size", "4", "--block-size", "4", "--no-x0", *address)
    assert completion(str(here / "s.zarr")) == {"trained": {"complete": 16, "images": 16}}
    _ok(capsys, "label", "--store", "s.zarr", "--provider", "toyworld", "--target", "salient",
        "--no-x0", *address)
    _ok(capsys, "probe", "--store", "s.zarr", "--target", "salient", "--layers", LAYER,
        "--figures", "figs", *address)
    run = latest_run(str(here / "s.zarr"), "salient")
    assert run and any((here / "figs").iterdir())
    _ok(capsys, "intervene", "--store", "s.zarr", "--probe-run", run, "--layers", LAYER,
        "--steps", "0", "--images", "demo-012", "demo-013", "--strength", "1", "--n-targets", "1",
        "--figure", "grid.png", *address)
    assert (here / "grid.png").is_file()
    assert list(folder.iterdir()) == [], "written in the workers' folder"
