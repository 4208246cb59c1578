"""An option that takes a value, given twice: argparse kept the last one without a word, so
`--store a --store b` wrote to b and `probe --target depth --target salient` probed
salient. Each is refused in one line naming the option and both values, exit 2, before
anything is read or written."""

from __future__ import annotations

import shutil

import pytest

from conftest import DEMO, EXPLORE_LAYERS, cli, tree_digest


@pytest.fixture()
def store(tmp_path, explore_store) -> str:
    return str(shutil.copytree(explore_store, tmp_path / "store.zarr"))


@pytest.mark.parametrize("argv, words", [
    (["show", "--store", "{other}", "--store", "{store}"], ["--store given twice"]),
    (["probe", "--store", "{store}", "--target", "depth", "--target", "salient"],
     ["--target given twice", "'depth'", "'salient'"]),
    (["probe", "--store", "{store}", "--target", "depth", "--steps", "0", "1", "--steps",
      "2", "--layers", EXPLORE_LAYERS[0]], ["--steps given twice", "0 1", "name every"]),
    (["label", "--store", "{store}", "--provider", "toyworld", "--provider",
      "array:x.npz", "--target", "mask"], ["--provider given twice"]),
    (["show", "--store", "{store}", "--threads", "1", "--threads", "2"],
     ["--threads given twice"]),
    # a value named twice in one option: labelled once, or captured once, without a word
    (["label", "--store", "{store}", "--provider", "toyworld", "--target", "depth", "depth",
      "--overwrite"], ["--target depth depth: target depth is named twice; name each once"]),
    (["materialize", "--store", "{store}", "--model", "tiny-random", "--prompts", DEMO,
      "--capture", "attn1,attn1"],
     ["--capture attn1,attn1: kind attn1 is named twice; name each once"]),
])
def test_an_option_given_twice_is_refused(store, tmp_path, argv, words):
    before = tree_digest(store)
    argv = [a.format(store=store, other=tmp_path / "other.zarr") for a in argv]
    result = cli(*argv)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr
    assert tree_digest(store) == before
    assert not (tmp_path / "other.zarr").exists()


def test_flags_and_options_given_once_still_parse():
    """Flags may repeat (harmless); the same option in two subcommands' namespaces is not
    a repeat."""
    from flows.cli import build_parser

    args = build_parser().parse_args(["--quiet", "probe", "--store", "s", "--target", "d",
                                      "--quiet", "--steps", "0", "1"])
    assert (args.store, args.target, args.steps, args.quiet) == ("s", "d", [0, 1], True)


def test_one_parser_parses_many_times():
    """A parser used again (a caller's loop) must not take an option of a later parse for a
    repeat of an earlier one."""
    from flows.cli import build_parser

    parser = build_parser()
    for n in range(50):
        args = parser.parse_args(["probe", "--store", f"s{n}", "--target", "d"])
        assert args.store == f"s{n}"


def test_main_refuses_a_target_named_twice(tmp_path, capsys):
    """`actstore main --targets depth depth` labelled and probed depth twice; refused
    before the job's folder is made."""
    from flows.cli import main

    out = tmp_path / "run"
    assert main(["--quiet", "main", "--out", str(out), "--targets", "depth", "depth"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--targets depth depth: target depth is named twice" \
        in lines[0], lines
    assert not out.exists()
