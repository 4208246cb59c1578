"""What `actstore intervene` makes of inputs a new user gets wrong: each is one line, exit 2,
before anything is written (the store is compared file by file)."""

from __future__ import annotations

import pytest

from conftest import EXPLORE_LAYERS, cli, tree_digest
from test_probe_selection import _refused, store  # noqa: F401  (store: a fixture)


def _intervene(store: str, run: str, *extra: str):
    """An option in ``extra`` replaces its default here: given twice it is refused. With
    ``--targets`` (a file holds its own number of targets) no ``--n-targets``."""
    defaults = {"--layers": EXPLORE_LAYERS[0], "--steps": "0", "--images": "demo-012",
                **({} if "--targets" in extra else {"--n-targets": "1"})}
    kept = [a for k, v in defaults.items() if k not in extra for a in (k, v)]
    return cli("intervene", "--store", store, "--probe-run", run, *kept, *extra)


def test_a_probe_run_fitted_on_labels_relabelled_since_is_refused(store):
    """After `actstore label --overwrite`, an experiment with the run fitted before ran
    silently: its probes answer in the old labels' units while targets, scores and the
    reader of the edited images came from the new version. Now one line names both
    versions and the way on, which then runs."""
    from actstore.probe.runs import get_run, latest_run
    from actstore.store import labelsets

    run = latest_run(store, "depth")
    fitted = get_run(store, run)["labels"]["version"]
    relabelled = cli("label", "--store", store, "--provider", "toyworld", "--target", "depth",
                     "--overwrite")
    assert relabelled.returncode == 0, relabelled.stderr
    now = labelsets.version_of(labelsets.current(store)["depth"]["path"])
    assert now != fitted
    before = tree_digest(store)
    _refused(_intervene(store, run), f"probe run {run}", f"version {fitted}",
             f"now version {now}", "actstore probe --target depth")
    assert tree_digest(store) == before
    probed = cli("probe", "--store", store, "--target", "depth", "--layers",
                 EXPLORE_LAYERS[0], "--steps", "0", "--scheduler", "sync")
    assert probed.returncode == 0, probed.stderr
    fresh = latest_run(store, "depth")
    assert get_run(store, fresh)["labels"]["version"] == now
    ran = _intervene(store, fresh, "--no-random-control")
    assert ran.returncode == 0, ran.stderr


@pytest.mark.parametrize("option,values,word", [
    ("--steps", ["0", "0"], "--steps 0 0: step 0 is named twice; name each once"),
    ("--layers", [EXPLORE_LAYERS[0]] * 2, f"layer {EXPLORE_LAYERS[0]} is named twice"),
    ("--images", ["demo-012", "demo-013", "demo-012"], "image demo-012 is named twice"),
    ("--images", ["demo-012,demo-012"], "image demo-012 is named twice"),
    ("--strength", ["1", "2", "1"], "--strength 1 2 1: strength 1 is named twice"),
])
def test_a_value_named_twice_is_refused_as_probe_refuses_it(store, option, values, word):
    """Repeated --steps, --layers, --images were dropped silently (the experiment ran on
    each once) while a repeated --strength was refused in other words; each is now the
    line `actstore probe` gives for a repeated value."""
    from actstore.probe.runs import latest_run

    before = tree_digest(store)
    _refused(_intervene(store, latest_run(store, "depth"), option, *values), word)
    assert tree_digest(store) == before


def test_user_targets_are_named_as_given(store, tmp_path):
    """`--targets nofile.npz` said 'not a .npz file or a folder', and a (32, 32) map was
    reported as shape (1, 32, 32), a shape the user never gave; a (32, 32) PNG too."""
    import numpy as np
    from PIL import Image

    from actstore.probe.runs import latest_run

    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / "demo-012.png")
    np.savez(tmp_path / "small.npz", **{"demo-012": np.zeros((32, 32))})
    run, before = latest_run(store, "depth"), tree_digest(store)
    for given, words in ((tmp_path / "nofile.npz", "nofile.npz: does not exist"),
                         (tmp_path / "small.npz", "image 'demo-012' has shape (32, 32),"),
                         (folder, "image 'demo-012' has shape (32, 32),")):
        _refused(_intervene(store, run, "--targets", str(given)), words)
    assert tree_digest(store) == before


def test_a_sweep_of_a_run_with_a_repeated_step_runs(store):
    """A probe run stored with a step named twice (as actstore probe did before
    ProbeSettings refused it, 2026-12-06) is read again; a sweep of it built its cells from
    the run's steps as stored, so the repeated-value refusal said '--steps 0 0: step 0 is
    named twice' of an option nobody gave, and the sweep stopped. Each cell now names each
    step once and the sweep runs."""
    from actstore.probe.runs import _run_probes
    from actstore.probe.settings import ProbeSettings

    settings = ProbeSettings(layers=(EXPLORE_LAYERS[0],))
    object.__setattr__(settings, "steps", (0, 0))    # what ProbeSettings once let through
    run = _run_probes(store, "depth", settings, "sync", False)
    swept = cli("sweep", "--store", store, "--probe-run", run, "--kinds",
                "attn1", "--step-counts", "1", "--strength", "1", "--validation", "1",
                "--evaluation", "1", "--n-targets", "2")
    assert swept.returncode == 0, swept.stderr
    assert "named twice" not in swept.stderr


@pytest.fixture()
def one_map(tmp_path) -> str:
    """A user targets file of one (32, 32) map for demo-012: one target per image."""
    import numpy as np

    path = tmp_path / "one_map.npz"
    np.savez(path, **{"demo-012": np.ones((64, 64), np.float32)})
    return str(path)


@pytest.mark.parametrize("target,extra,words", [
    # a file of one map per image ran one target, whatever --n-targets said
    ("depth", ["--targets", "{one_map}", "--n-targets", "3"],
     ["--n-targets 3: counts the targets made per image", "drop --n-targets"]),
    # accepted, recorded as lr: null / iterations: null, and not used
    ("depth", ["--lr", "0.1"], ["--lr 0.1: only --method gradient runs Adam, --method "
                                "projection never reads it"]),
    ("depth", ["--method", "projection", "--iterations", "5"], ["--iterations 5:"]),
    # units of user arrays: of a mask, or of targets made from the labels, they mean nothing
    ("salient", ["--targets", "{one_map}", "--target-units", "raw"],
     ["--target-units raw: 'salient' is a binary target", "drop --target-units"]),
    ("depth", ["--target-units", "raw"], ["--target-units raw:", "--targets shift makes them"]),
    # the logit asked of a mask's logistic probes
    ("depth", ["--margin", "2"], ["--margin 2:", "'depth' is a continuous target"]),
    # targets from a file and no random arm: nothing reads the seed (recorded as null)
    ("depth", ["--targets", "{one_map}", "--no-random-control", "--seed", "3"],
     ["--seed 3: nothing here is random", "drop --seed or --no-random-control"]),
])
def test_an_option_the_edit_never_reads_is_refused(store, one_map, target, extra, words):
    """Each was accepted and silently ignored (exit 0, no note); now one line naming the
    option and why, exit 2, nothing written."""
    from actstore.probe.runs import latest_run

    before = tree_digest(store)
    _refused(_intervene(store, latest_run(store, target),
                        *[a.format(one_map=one_map, one_map_each=one_map_each) for a in extra]),
             *words)
    assert tree_digest(store) == before


@pytest.fixture()
def one_map_each(store, tmp_path) -> str:
    """A user targets file of one (64, 64) map for every image of the store."""
    import numpy as np

    from actstore.store.view import open_store

    path = tmp_path / "one_map_each.npz"
    ids = [str(i) for i in open_store(store, complete_only=False).images["image"].values]
    np.savez(path, **{i: np.ones((64, 64), np.float32) for i in ids})
    return str(path)


@pytest.mark.parametrize("extra,words", [
    # the chosen setting had no other-target control ('other n/a'), though 'specific' is
    # the least of gain, margin over random and margin over the other targets
    (["--n-targets", "1"], ["--n-targets 1: a sweep picks the largest specific effect",
                            "give --n-targets 2 or more"]),
    (["--targets", "{one_map}", "--n-targets", "2"], ["--n-targets 2: counts the targets"]),
    # a file of one map per image: no other target either (it ran, 'other n/a')
    (["--targets", "{one_map_each}"], ["--targets ", ": one map per image", "two or more maps"]),
])
def test_a_sweep_without_other_targets_is_refused(store, one_map, one_map_each, extra, words):
    from actstore.probe.runs import latest_run

    before = tree_digest(store)
    _refused(cli("sweep", "--store", store, "--probe-run", latest_run(store, "depth"),
                 "--kinds", "attn1", "--step-counts", "1", "--strength", "1",
                 "--validation", "1", "--evaluation", "1",
                 *[a.format(one_map=one_map, one_map_each=one_map_each) for a in extra]),
             *words)
    assert tree_digest(store) == before


def test_the_seed_is_refused_only_where_nothing_reads_it():
    """The seed makes the shifted or inserted targets and the random directions: only a
    targets file without the random arm leaves it unread; its default always passes."""
    from actstore.errors import ActstoreError
    from actstore.intervene.settings import InterventionSettings as IS

    for kw in ({"targets": "t.npz", "random_control": False},            # default seed
               {"targets": "t.npz", "seed": 3},                          # random arm
               {"targets": "shift", "random_control": False, "seed": 3}):  # made targets
        IS(**kw)
    with pytest.raises(ActstoreError, match=r"^--seed 3: nothing here is random"):
        IS(targets="t.npz", random_control=False, seed=3)
    # the persistence diagnostic drops the arm of settings intervene accepts: not refused
    dropped = IS(targets="t.npz", seed=3).without_random_arm()
    assert (dropped.random_control, dropped.seed) == (False, 0)
    assert IS(seed=3).without_random_arm().seed == 3       # shift targets still read it


def test_a_sweep_without_the_random_control_is_refused(store):
    """`sweep --no-random-control` ran and chose on gain and the other-target margin only,
    though 'specific' is the least of those and the margin over the random edit. Refused in
    one line, exit 2, nothing written; SweepSettings refuses it in Python the same way."""
    from actstore.errors import ActstoreError
    from actstore.intervene.settings import InterventionSettings as IS
    from actstore.intervene.settings import SweepSettings
    from actstore.probe.runs import latest_run

    words = ["--no-random-control: a sweep chooses by the margin over an equal-size random "
             "edit", "actstore intervene --no-random-control"]
    before = tree_digest(store)
    line = _refused(cli("sweep", "--store", store, "--probe-run", latest_run(store, "depth"),
                        "--kinds", "attn1", "--step-counts", "1", "--strength", "1",
                        "--validation", "1", "--evaluation", "1", "--no-random-control"),
                    *words)
    assert tree_digest(store) == before
    with pytest.raises(ActstoreError) as refused:
        SweepSettings(base=IS(n_targets=2, random_control=False))
    assert str(refused.value) in line
