"""Which points a sweep cell edits: ``--sites decoder`` (default, the up_blocks points),
``all`` (every point of the kind, as the paper edits for depth) or site prefixes. The
cells are checked against a filter written here on the point names; a prefix with no
probes fails in one line before anything is written."""

from __future__ import annotations

import re
import shutil

import pytest

from actstore.intervene.settings import SweepSettings
from actstore.intervene.sweep import grid_cells
from conftest import tree_digest
from flows.cli import build_parser, main
from flows.cli_intervene import sweep_settings

SITES = ["down_blocks.0.attentions.0", "down_blocks.1.attentions.1", "mid_block.attentions.0",
         "up_blocks.1.attentions.0", "up_blocks.3.attentions.2"]
RUN = {"layers": [f"block/{s}" for s in SITES] + SITES,      # bare names are attn1
       "steps": list(range(15))}


def _settings(*extra: str) -> SweepSettings:
    args = build_parser().parse_args(["sweep", "--store", "s.zarr", "--probe-run", "r",
                                      "--kinds", "block", "--step-counts", "3", *extra])
    return sweep_settings(args)


def _want(pattern: str) -> list[str]:
    return [name for name in RUN["layers"] if re.fullmatch(pattern, name)]


def test_sites_choose_the_edited_points():
    cases = {(): r"block/up_blocks\..*", ("--sites", "decoder"): r"block/up_blocks\..*",
             ("--sites", "all"): r"block/.*",
             ("--sites", "down_blocks."): r"block/down_blocks\..*",
             ("--sites", "mid"): r"block/mid_block\..*",
             ("--sites", "up_blocks.3.", "down_blocks.1"):
                 r"block/(up_blocks\.3|down_blocks\.1)\..*",
             ("--sites", "all", "mid"): r"block/.*"}
    for extra, pattern in cases.items():
        (cell,) = grid_cells(RUN, _settings(*extra))
        assert cell["layers"] == _want(pattern), extra
        assert cell["kind"] == "block" and cell["steps"] == [0, 1, 2]
    assert len(_want(r"block/.*")) == len(SITES)


def test_sites_are_part_of_the_recorded_settings():
    assert _settings().layer_prefix == SweepSettings().layer_prefix == "up_blocks."
    assert _settings("--sites", "all").layer_prefix == ""
    assert _settings("--sites", "up_blocks.2.", "up_blocks.3.").layer_prefix == \
        ("up_blocks.2.", "up_blocks.3.")


def test_sites_without_probes_fail_in_one_line_before_anything_is_written(ivstore, tmp_path,
                                                                         capsys):
    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(ivstore["uri"], uri)
    before = tree_digest(uri)
    code = main(["--no-prefect", "sweep", "--store", uri, "--probe-run",
                 ivstore["runs"]["salient"], "--kinds", "attn1", "--sites", "down_blocks.",
                 "--validation", "2", "--evaluation", "3"])
    assert code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "at sites down_blocks.*" in lines[0], lines
    assert tree_digest(uri) == before


def test_every_run_is_checked_before_the_first_is_swept(ivstore, tmp_path, capsys):
    """Two runs of one target (only the last was reported), one run named twice, and a
    second run without probes at the sites (the first run's sweep was stored, then the
    command failed): each one line, exit 2, the store unchanged."""
    from actstore.probe.runs import run_probes

    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(ivstore["uri"], uri)
    encoder_depth = run_probes(uri, "depth", layers=["down_blocks.1.attentions.0"],
                               steps=[0], scheduler="threads", progress=False)
    sal, dep = ivstore["runs"]["salient"], ivstore["runs"]["depth"]
    before = tree_digest(uri)
    cases = {(dep, encoder_depth): f"{encoder_depth} and {dep} both probe 'depth'",
             (sal, sal): f"{sal} is given twice",
             (sal, encoder_depth): f"{encoder_depth}: has no probes of kind(s) attn1"}
    for runs, words in cases.items():
        code = main(["--no-prefect", "--quiet", "sweep", "--store", uri, "--probe-run", *runs,
                     "--kinds", "attn1", "--validation", "1", "--evaluation", "1",
                     "--step-counts", "1", "--strength", "1", "--provider", "toyworld"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and words in lines[0], (runs, lines)
        assert tree_digest(uri) == before, runs


@pytest.mark.parametrize("mode", [["--no-prefect"], []])
def test_a_step_count_beyond_the_run_is_refused(ivstore, tmp_path, capsys, mode):
    """`sweep --step-counts 9` on a run of steps 0-1 ran its cell on steps 0-1 and recorded
    that, as `--step-counts 2` does, with no word that the 9 asked for could not be; with
    `--step-counts 2 9` the second cell was dropped as a repeat. It is refused in one line,
    exit 2, the store unchanged (in Prefect mode by the command's plan, before a server)."""
    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(ivstore["uri"], uri)
    run = ivstore["runs"]["salient"]
    from actstore.probe.runs import get_run
    last = max(get_run(uri, run)["steps"])
    before = tree_digest(uri)
    code = main([*mode, "--quiet", "sweep", "--store", uri, "--probe-run", run,
                 "--kinds", "attn1", "--validation", "1", "--evaluation", "1",
                 "--step-counts", "1", str(last + 5), "--strength", "1",
                 "--provider", "toyworld"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert f"--step-counts {last + 5}" in lines[0] and f"at most {last + 1}" in lines[0]
    assert tree_digest(uri) == before


@pytest.mark.parametrize("mode", [["--no-prefect"], []])
def test_a_run_its_edit_cannot_serve_is_refused_before_the_first_is_swept(
        ivstore, tmp_path, capsys, mode, prefect_harness):
    """`sweep --targets insert` over a depth run and a salient (mask) run: the depth run's
    cells ran and were stored, then the salient run's first cell was refused (insert needs
    a continuous target), so the refused command had altered the store. Every run's
    request is checked with the plan: one line, exit 2, the store unchanged."""
    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(ivstore["uri"], uri)
    before = tree_digest(uri)
    code = main([*mode, "--quiet", "sweep", "--store", uri, "--probe-run",
                 ivstore["runs"]["depth"], ivstore["runs"]["salient"], "--targets", "insert",
                 "--kinds", "attn1", "--validation", "1", "--evaluation", "1",
                 "--step-counts", "1", "--strength", "1", "--provider", "toyworld"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "--targets insert" in lines[0] and "continuous target" in lines[0], lines
    assert tree_digest(uri) == before
