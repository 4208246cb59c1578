"""What `actstore probe --models/--layers/--steps` selects: a selection the store can't serve
is one line, exit 2, before anything is written, and never a run later commands choke on."""

from __future__ import annotations

import shutil

import pytest
import xarray as xr

from conftest import EXPLORE_LAYERS, cli, tree_digest


@pytest.fixture()
def store(tmp_path, explore_store) -> str:
    return str(shutil.copytree(explore_store, tmp_path / "store.zarr"))


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


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, explore_store) -> dict:
    """The explore store with the randomized control, and resnet points added to the trained
    model only."""
    from conftest import DEMO, TINY

    store = tmp_path_factory.mktemp("two") / "store.zarr"
    shutil.copytree(explore_store, store)
    made = ["--model", "tiny-random", "--prompts", DEMO, "--store", str(store),
            "--steps", str(TINY["steps"]), "--batch-size", "4"]
    assert cli("materialize", *made, "--control", "randomized").returncode == 0
    assert cli("materialize", *made, "--capture", "attn1,resnet").returncode == 0
    return {"store": store, "made": made}


@pytest.fixture()
def copied(tmp_path, two_models) -> tuple[str, list[str]]:
    store = shutil.copytree(two_models["store"], tmp_path / "store.zarr")
    made = [str(store) if a == str(two_models["store"]) else a for a in two_models["made"]]
    return str(store), made


def test_a_point_one_model_lacks_is_named_with_the_way_on(copied):
    """A capture kind added to the trained model only: `probe --layers resnet/...` said 'no
    layer ...; available: <the attn1 points>', its name missing from a list `actstore show`
    contradicts; now the line names the model that lacks it and what to do, and each way on
    works."""
    store, made = copied
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


def test_a_run_of_the_trained_model_alone_has_no_control_column(copied):
    """`probe --models trained` on a store whose other runs have both models printed the
    control's column as 'nan' and wrote NaN into --json, which strict JSON readers (JSON.parse,
    Go, jq before 1.7) refuse; the column is '-' and the key left out, as for a store without
    a control."""
    import json

    store, _ = copied
    probe = ["probe", "--store", store, "--steps", "1", "--scheduler", "sync", "--layers",
             EXPLORE_LAYERS[0], "--target"]
    both = cli(*probe, "salient")                # the table's model axis gets the control
    assert both.returncode == 0, both.stderr
    assert json.loads(both.stdout)["summary"][0]["randomized"] >= 0
    alone = cli(*probe, "depth", "--models", "trained")
    assert alone.returncode == 0, alone.stderr
    json.loads(alone.stdout, parse_constant=lambda c: pytest.fail(f"{c} in --json"))
    (row,) = json.loads(alone.stdout)["summary"]
    assert "randomized" not in row and row["trained"] >= 0
    assert "nan" not in json.loads(alone.stdout)["table"]


def test_a_store_holding_a_run_with_a_repeated_step_reads_again(store):
    """A store given such a run by actstore before the refusal above kept failing every
    `actstore probe` and `open_emergence`; the table now reads that run's steps once. The
    run is written as the earlier code wrote it: the grid on steps (1, 1)."""
    import actstore
    from actstore.probe.runs import _run_probes
    from actstore.probe.settings import ProbeSettings

    settings = ProbeSettings(layers=(EXPLORE_LAYERS[0],))
    object.__setattr__(settings, "steps", (1, 1))    # what ProbeSettings once let through
    run = _run_probes(store, "depth", settings, "sync", False)
    from actstore.store import io
    from actstore.store import layout as lay

    assert list(io.open_dataset(store, lay.run_scores_path(run)).step.values) == [1, 1]
    assert list(actstore.probe.runs.open_scores(store, run).step.values) == [1]
    table = actstore.open_emergence(store)
    assert not table.indexes["step"].has_duplicates
    depth = table.score.sel(target="depth", layer=EXPLORE_LAYERS[0], model="trained")
    assert float(depth.sel(metric="rmse_label", step=1)) > 0
    done = cli("probe", "--store", store, "--target", "salient", "--layers",
               EXPLORE_LAYERS[0], "--steps", "1", "--scheduler", "sync")
    assert done.returncode == 0, done.stderr


def test_an_incomplete_control_names_the_models_that_can_be_probed(store):
    """The randomized control half made: `probe` (every variant by default) said only
    'model 'randomized' is incomplete ...; finish `actstore materialize` first', though the
    trained model can be probed alone; the line now says how, and that works."""
    from conftest import DEMO, TINY

    assert cli("materialize", "--model", "tiny-random", "--prompts", DEMO, "--store", store,
               "--steps", str(TINY["steps"]), "--control", "randomized", "--images", "0:4"
               ).returncode == 0
    probe = ["probe", "--store", store, "--target", "depth", "--steps", "1", "--layers",
             EXPLORE_LAYERS[0], "--scheduler", "sync"]
    before = tree_digest(store)
    _refused(cli(*probe), "model 'randomized' is incomplete", "missing image blocks 4:8",
             "or probe the others alone (--models trained)")
    assert tree_digest(store) == before
    assert cli(*probe, "--models", "trained").returncode == 0


def test_a_run_of_the_control_alone_leaves_every_later_probe_working(copied, tmp_path):
    """`probe --models randomized` (the control alone) on a store whose other runs have the
    trained model stored its run, then failed 'unexpected KeyError: not all values found in
    index 'layer'', exit 1; from then on every `actstore probe` of any target, the main job's
    summary and a notebook's summary_table failed with it (and --figures: 'has no probe for
    model 'trained''). The control's row now names its best layer and score under
    'randomized', with no 'trained' column to fill, and Figure 4 draws the control."""
    import json

    import actstore
    from actstore.probe.emergence import summary_table

    store, _ = copied
    probe = ["probe", "--store", store, "--steps", "0", "1", "--scheduler", "sync",
             "--layers", *EXPLORE_LAYERS, "--target"]
    alone = cli(*probe, "salient", "--models", "randomized", "--figures", str(tmp_path))
    assert alone.returncode == 0, alone.stderr
    assert (tmp_path / "salient-figure4.png").stat().st_size > 0
    (row,) = json.loads(alone.stdout)["summary"]
    assert "trained" not in row and row["randomized"] >= 0
    assert row["best_layer"] in EXPLORE_LAYERS
    assert "nan" not in json.loads(alone.stdout)["table"]
    later = cli(*probe, "depth")
    assert later.returncode == 0, later.stderr
    (depth,) = json.loads(later.stdout)["summary"]
    assert depth["trained"] >= 0 and depth["randomized"] >= 0
    rows = {r["target"]: r for r in summary_table(actstore.open_emergence(store))}
    assert "trained" not in rows["salient"] and rows["depth"]["trained"] == depth["trained"]


def test_steps_given_out_of_order_give_the_emergence_of_steps_in_order(store):
    """`probe --steps 3 1 0` stored the run in that order and the emergence step was read
    against the last step given (0), not the last step: every step 'reached' it, so the
    table said the first step given (3) and its bootstrap interval likewise, while the
    curves showed the score still falling. A run's steps are now in order, and a run stored
    out of order by the earlier code reads as if in order."""
    import json

    import actstore
    from actstore.probe.runs import _run_probes, latest_run
    from actstore.probe.settings import ProbeSettings

    probe = ["probe", "--store", store, "--target", "depth", "--scheduler", "sync",
             "--layers", *EXPLORE_LAYERS, "--steps"]
    keys = ("best_layer", "trained", "emergence_step", "emergence_low", "emergence_high")

    def row() -> dict:
        em = actstore.open_emergence(store)
        assert list(em.step.values) == sorted(em.step.values)
        from actstore.probe.emergence import summary_table
        return {k: r[k] for r in summary_table(em) if r["target"] == "depth" for k in keys}

    in_order = cli(*probe, "0", "1", "3")
    assert in_order.returncode == 0, in_order.stderr
    in_order_run = latest_run(store, "depth")
    want = {k: json.loads(in_order.stdout)["summary"][0][k] for k in keys}
    shuffled = cli(*probe, "3", "1", "0")
    assert shuffled.returncode == 0, shuffled.stderr
    assert {k: json.loads(shuffled.stdout)["summary"][0][k] for k in keys} == want
    assert actstore.probe.runs.get_run(store, latest_run(store, "depth"))["steps"] == [0, 1, 3]
    settings = ProbeSettings(layers=tuple(EXPLORE_LAYERS))
    object.__setattr__(settings, "steps", (3, 1, 0))    # as ProbeSettings once let through
    _run_probes(store, "depth", settings, "sync", False)
    assert row() == want
    # the run's own scores read in step order too, with intervals against the last step
    stored = actstore.probe.runs.open_scores(store, latest_run(store, "depth"))
    assert list(stored.step.values) == [0, 1, 3]
    xr.testing.assert_allclose(stored, actstore.probe.runs.open_scores(store, in_order_run))


def test_a_run_stored_with_a_step_named_twice_reads_each_step_once(store):
    """`probe --steps 1 1 3`, let through before 2026-12-06, stored the same fit twice:
    open_emergence read each step once, but open_scores returned step 1 twice, so a
    notebook's `.sel(step=1)` gave two rows and `.mean("step")` weighed step 1 double."""
    import actstore
    from actstore.probe.runs import _run_probes, latest_run
    from actstore.probe.settings import ProbeSettings

    settings = ProbeSettings(layers=tuple(EXPLORE_LAYERS))
    object.__setattr__(settings, "steps", (1, 3))
    _run_probes(store, "depth", settings, "sync", False)
    once = actstore.probe.runs.open_scores(store, latest_run(store, "depth"))
    object.__setattr__(settings, "steps", (1, 1, 3))    # as ProbeSettings once let through
    _run_probes(store, "depth", settings, "sync", False)
    twice = actstore.probe.runs.open_scores(store, latest_run(store, "depth"))
    assert list(twice.step.values) == [1, 3]
    xr.testing.assert_allclose(twice, once)


def test_the_default_does_not_drop_points_the_control_lacks(copied):
    """The trained model with resnet points the control lacks (made without --capture, the
    control gets attn1 only): `probe` with no --layers/--models, whose help says every
    point of every model, fitted the attn1 points alone and said nothing of the 22 resnet
    points it left out. It is now refused in one line naming them and the ways on, nothing
    written."""
    store, _ = copied
    before = tree_digest(store)
    line = _refused(cli("probe", "--store", store, "--target", "depth", "--steps", "1",
                        "--scheduler", "sync"),
                    "model randomized has no point 'resnet/", "model trained has it",
                    "by default probe takes every point of every model", "--layers",
                    "--models trained",
                    "--control randomized --capture attn1,resnet")
    assert "22 points" in line
    assert tree_digest(store) == before


def test_a_mistyped_local_scheduler_name_says_which_was_meant(store):
    """`probe --scheduler thread` was taken for a host named 'thread': 'no Dask scheduler
    reachable at thread:8786 (Name or service not known); start one (`dask scheduler`)',
    pointing at a cluster the user never meant to start."""
    before = tree_digest(store)
    _refused(cli("probe", "--store", store, "--target", "depth", "--scheduler", "thread"),
             "--scheduler thread", "did you mean 'threads'")
    assert tree_digest(store) == before
