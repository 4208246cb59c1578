"""Commands of the guides in docs/ run as written, in both modes, on the small reference
store (the README's own commands are tests/test_readme.py's): what they print is what the
guides say they do."""

from __future__ import annotations

import shutil

import pytest

from conftest import DEMO, TINY
from flows.cli import main

MODES = {"no-prefect": ["--no-prefect"], "prefect": [], "prefect, 1 worker": []}


@pytest.mark.parametrize("mode", list(MODES))
def test_capture_adds_kinds_and_says_so(mode, tiny_store, tmp_path, request, capfd):
    """docs/capture-points.md: `actstore materialize --capture attn1,block,...` on a stored
    model regenerates its blocks and adds the kinds. The summary said '16 images generated
    in 0 blocks (0 blocks already stored)': every block was added to, none generated."""
    store = str(tmp_path / "s.zarr")
    shutil.copytree(tiny_store, store)
    if mode != "no-prefect":
        request.getfixturevalue("prefect_harness")
    workers = ["--workers", "1"] if "worker" in mode else []
    argv = ["materialize", "--store", store, "--model", "tiny-random", "--prompts", DEMO,
            "--steps", str(TINY["steps"]), "--capture", "attn1,block", *workers]
    assert main([*MODES[mode], "--quiet", *argv]) == 0
    out = capfd.readouterr().out
    assert ": trained: 0 images generated in 0 blocks, 16 regenerated and checked to add " \
           "capture kinds to 4 stored blocks (0 blocks already stored)" in out, out
    assert main([*MODES[mode], "--quiet", *argv]) == 0      # a rerun: everything is stored
    out = capfd.readouterr().out
    assert "0 images generated in 0 blocks (4 blocks already stored)" in out, out
