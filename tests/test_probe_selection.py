"""What `actstore probe --models/--layers/--steps` selects: a selection the store can't serve
is one line, exit 2, before anything is written, and never a run later commands choke on."""

from __future__ import annotations

import shutil

import pytest

from conftest import EXPLORE_LAYERS, cli, tree_digest


@pytest.fixture()
def store(tmp_path, explore_store) -> str:
    dst = tmp_path / "store.zarr"
    shutil.copytree(explore_store, dst)
    return str(dst)


def _refused(result, *words: str) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("actstore")]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr
    return lines[0]


@pytest.mark.parametrize("option,values,word", [
    ("--steps", ["0", "0"], "step 0 is named twice"),
    ("--layers", [EXPLORE_LAYERS[0], EXPLORE_LAYERS[0]], f"layer {EXPLORE_LAYERS[0]} is named"),
    ("--models", ["trained", "trained"], "model trained is named twice"),
])
def test_a_selection_naming_something_twice_is_refused(store, option, values, word):
    """`probe --steps 0 0` stored a run whose step axis repeats 0, then failed 'unexpected
    ValueError: cannot reindex or align along dimension 'step'', exit 1; from then on every
    `actstore probe` of any target (each run stored, then its summary failing the same way)
    and every notebook's `open_emergence` of the store failed with it."""
    import actstore

    before = tree_digest(store)
    selection = {"--layers": [EXPLORE_LAYERS[0]], "--steps": ["1"], option: values}
    argv = [a for opt, vals in selection.items() for a in (opt, *vals)]
    _refused(cli("probe", "--store", store, "--target", "depth", "--scheduler", "sync",
                 *argv), word)
    assert tree_digest(store) == before
    assert set(actstore.open_emergence(store).target.values) == {"depth", "salient"}


def test_a_point_one_model_lacks_is_named_with_the_way_on(store):
    """A capture kind added to the trained model only: `probe --layers resnet/...` said 'no
    layer ...; available: <the attn1 points>', its name missing from a list `actstore show`
    contradicts; now the line names the model that lacks it and what to do, and each way on
    works."""
    from conftest import DEMO, TINY

    made = ["--model", "tiny-random", "--prompts", DEMO, "--store", store,
            "--steps", str(TINY["steps"]), "--batch-size", "4"]
    assert cli("materialize", *made, "--control", "randomized").returncode == 0
    assert cli("materialize", *made, "--capture", "attn1,resnet").returncode == 0
    point = "resnet/up_blocks.3.resnets.0"
    probe = ["probe", "--store", store, "--target", "depth", "--steps", "1",
             "--scheduler", "sync", "--layers", point]
    before = tree_digest(store)
    line = _refused(cli(*probe), "model randomized has no point", point, "model trained has "
                    "it", "--models trained", "--control randomized --capture attn1,resnet")
    assert "available" not in line
    assert tree_digest(store) == before
    assert cli(*probe, "--models", "trained").returncode == 0
    assert cli("materialize", *made, "--control", "randomized",
               "--capture", "attn1,resnet").returncode == 0
    assert cli(*probe).returncode == 0
