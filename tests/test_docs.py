"""The guides stay true to the tree: their relative links resolve, the README's two
opening commands exist, and the README stays short."""

from __future__ import annotations

import json
import re

import pytest

from conftest import REPO

GUIDES = ["README.md", "benchmarks/README.md", "docs/results.md", "docs/scale.md",
          "models/toy-ldm/README.md"]
README_LINES = 200  # a guide: detail goes to docs/ and benchmarks/README.md
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("guide", GUIDES)
def test_relative_links_resolve(guide):
    path = REPO / guide
    links = [m for m in LINK.findall(path.read_text(encoding="utf-8")) if "://" not in m]
    missing = [m for m in links if not (path.parent / m).exists()]
    assert not missing, f"{guide} links to missing files: {missing}"


def test_readme_opens_with_the_two_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["bash scripts/main.sh", "bash scripts/test.sh"]
    assert all((REPO / c.split()[1]).is_file() for c in commands)


def test_readme_stays_a_guide():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_LINES, f"README.md has {lines} lines; move detail to docs/"


def _layout_block() -> str:
    text = (REPO / "docs" / "store-format.md").read_text(encoding="utf-8")
    return text.split("## Layout", 1)[1].split("```", 2)[1]


def _leaf(name: str) -> str:
    """An array's documented name: a token grid ``r16`` / ``r16x8`` is ``r<h>``."""
    return "r<h>" if re.fullmatch(r"r\d+(x\d+)?", name) else name


def _documented_dims(layout: str) -> dict[str, set[tuple[str, ...]]]:
    """``name (dim, dim[, optional])`` and ``{a, b} (dims)`` pairs of the layout block."""
    out: dict[str, set[tuple[str, ...]]] = {}
    names = r"(?:[\w/<>]*\{[^}]*\}|[\w/<>]+)(?:, \w+)*"
    for m in re.finditer(rf"({names})\s+\(([^)]*)\)", layout):
        text = m.group(2).replace(" ", "")
        required, _, optional = text.partition("[,")
        dims = [d for d in required.split(",") if d]
        if not dims or not all(re.fullmatch(r"\w+", d) for d in dims):
            continue                     # prose in parentheses, not dimensions
        shapes = {tuple(dims)}
        if optional:
            shapes.add((*dims, *optional.rstrip("]").split(",")))
        token = m.group(1)
        inside = re.search(r"\{([^}]*)\}", token)
        for name in (inside.group(1) if inside else token).split(","):
            out.setdefault(name.strip().rsplit("/", 1)[-1], set()).update(shapes)
    return out


def test_store_format_layout_is_what_a_store_holds(explore_store, tmp_path):
    """docs/store-format.md's layout against a store with every kind of node (labels, probe
    runs, an experiment, a sweep): every array it holds is named there, with the dimensions
    written there, and every attribute key the layout names is in the store's attributes."""
    import shutil

    import zarr

    from actstore.intervene.settings import InterventionSettings, SweepSettings
    from actstore.intervene.sweep import run_sweep
    from actstore.probe.runs import latest_run

    store = str(tmp_path / "store.zarr")
    shutil.copytree(explore_store, store)
    run_sweep(store, latest_run(store, "salient"),
              SweepSettings(kinds=("attn1",), step_counts=(1,), strengths=(1.0,),
                            validation=1, evaluation=1,
                            base=InterventionSettings(n_targets=2)), progress=False)
    layout = _layout_block()
    words = set(re.findall(r"[\w<>]+", layout))
    dims = _documented_dims(layout)
    assert {"activation", "final_image", "full", "x0", "timestep"} <= set(dims), dims
    nodes = [("", zarr.open_group(store, mode="r"))]
    nodes += list(zarr.open_group(store, mode="r").members(max_depth=None))
    arrays = {path: node for path, node in nodes if isinstance(node, zarr.Array)}
    undocumented = sorted({_leaf(p.rsplit("/", 1)[-1]) for p in arrays} - words)
    assert not undocumented, f"arrays the layout does not name: {undocumented}"
    wrong = {p: a.metadata.dimension_names for p, a in arrays.items()
             if _leaf(p.rsplit("/", 1)[-1]) in dims
             and tuple(a.metadata.dimension_names) not in dims[_leaf(p.rsplit("/", 1)[-1])]}
    assert not wrong, f"dimensions other than the layout's: {wrong}"
    named = {m.group(1): {k.strip() for k in m.group(2).split(",")
                          if re.fullmatch(r"\w+", k.strip())}
             for m in re.finditer(r"attrs\.(\w+) = \{([^}]*)\}", layout)}
    found = set()
    for path, node in nodes:
        for key, keys in named.items():
            value = node.attrs.get(key)
            if isinstance(value, dict):
                found.add(key)
                assert keys <= set(value), f"{path or '<root>'} attrs.{key} lacks " \
                                           f"{sorted(keys - set(value))}"
    assert {"actstore", "actstore_model", "block", "labels", "sweep"} <= found, found
    # docs/interventions.md: the sweep record's keys, and its experiments with their control
    from actstore import open_intervention
    from actstore.intervene.sweep import list_sweeps

    (record,) = list_sweeps(store).values()
    assert {"cells", "chosen", "validation_images", "evaluation_images", "experiments",
            "evaluation", "result"} <= set(record)
    for experiment in [*record["experiments"], *filter(None, [record["evaluation"]])]:
        assert open_intervention(store, experiment).sel(arm="random").score_post.size


def test_every_command_help_says_what_it_does_and_what_each_option_takes():
    """`actstore X --help` is where a user looks first: it opens with what X does (not the
    module docstring of the command line's code) and no option is left unexplained."""
    import argparse

    from flows.cli import build_parser

    parser = build_parser()
    assert "README" in parser.description      # points on to the guides
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for listed in sub._choices_actions:
        command = sub.choices[listed.dest]
        assert command.description == listed.help, listed.dest
        bare = [a.option_strings[0] for a in command._actions if a.option_strings and not a.help]
        assert not bare, f"actstore {listed.dest}: options without help: {bare}"


def test_open_store_docstring_names_what_a_view_has(explore_store):
    """Every ``view.<member>`` the docstring of ``actstore.open_store`` names is one, and
    ``view[name]`` has the dimensions it states."""
    import actstore

    doc = actstore.open_store.__doc__
    members = set(re.findall(r"``view\.(\w+)", doc))
    assert {"layers", "images", "final_images", "x0_images", "refresh"} <= members
    view = actstore.open_store(explore_store)
    assert all(hasattr(view, m) for m in members), members - set(dir(view))
    flat = doc.replace("\n    ", " ")
    stated = re.search(r"``view\[name\]`` the activations ``\(([^)]*)\)", flat)
    assert view[view.layers[0]].dims == tuple(stated.group(1).replace(" ", "").split(","))


def test_capture_help_says_what_a_new_control_takes(tmp_path, tiny_store):
    """`materialize --help` said the kinds default to 'the store's, else attn1': a control
    added without --capture to a store whose trained model has block points got attn1
    alone (the variant's default, not the store's), which probe's default then could not
    serve. The help now says what a new variant takes, and that is what it gets."""
    import shutil

    from flows.cli import build_parser
    from conftest import DEMO, TINY, cli

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    capture = next(a for a in sub.choices["materialize"]._actions if a.dest == "capture")
    assert "the store's" not in capture.help
    assert "a new model variant (the first, or --control randomized) takes attn1" in \
        " ".join(capture.help.split())
    store = str(shutil.copytree(tiny_store, tmp_path / "s.zarr"))
    made = ["materialize", "--model", "tiny-random", "--prompts", DEMO, "--store", store,
            "--steps", str(TINY["steps"]), "--batch-size", "4"]
    assert cli(*made, "--capture", "attn1,block").returncode == 0
    assert cli(*made, "--control", "randomized").returncode == 0
    shown = json.loads(cli("show", "--store", store).stdout)["models"]
    assert shown["trained"]["kinds"] == ["attn1", "block"]
    assert shown["randomized"]["kinds"] == ["attn1"]
