"""Bad input: one specific line on stderr, exit code 2, and the store byte-for-byte unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.cli import main
from conftest import DEMO, TINY, tree_digest

BASE = ["--steps", str(TINY["steps"]), "--batch-size", "4", "--block-size", "4"]


@pytest.fixture()
def store_copy(tmp_path, tiny_store) -> str:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, dst)
    return str(dst)


def _run(capsys, *argv: str) -> str:
    code = main(["--no-prefect", "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("actstore")]
    assert len(lines) == 1, err
    return lines[0]


def _table(tmp_path: Path, text: str, name: str = "bad.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD_TABLES = {
    "missing column": ("image_id,prompt\na,hello\n", "seed"),
    "duplicate id": ("image_id,prompt,seed\na,x,1\na,y,2\n", "duplicate"),
    "empty prompt": ("image_id,prompt,seed\na,,1\n", "empty"),
    "non-integer seed": ("image_id,prompt,seed\na,x,1.5\n", "seed"),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_bad_prompt_tables(capsys, tmp_path, store_copy, case):
    text, word = BAD_TABLES[case]
    before = tree_digest(store_copy)
    line = _run(capsys, "materialize", "--model", "tiny-random",
                "--prompts", _table(tmp_path, text), "--store", store_copy, *BASE)
    assert word in line.lower()
    assert tree_digest(store_copy) == before


def test_unreadable_prompt_file(capsys, tmp_path, store_copy):
    before = tree_digest(store_copy)
    line = _run(capsys, "materialize", "--model", "tiny-random", "--prompts",
                str(tmp_path / "nope.csv"), "--store", store_copy, *BASE)
    assert "nope.csv" in line
    assert tree_digest(store_copy) == before


def test_existing_non_actstore_location(capsys, tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    before = tree_digest(folder)
    line = _run(capsys, "materialize", "--model", "tiny-random", "--prompts", DEMO,
                "--store", str(folder), *BASE)
    assert "not an actstore store" in line
    assert tree_digest(folder) == before


def test_foreign_zarr_group(capsys, tmp_path):
    import zarr
    uri = str(tmp_path / "other.zarr")
    zarr.open_group(uri, mode="w").create_array("x", shape=(2,), dtype="int8")
    before = tree_digest(uri)
    line = _run(capsys, "materialize", "--model", "tiny-random", "--prompts", DEMO,
                "--store", uri, *BASE)
    assert "not an actstore store" in line
    assert tree_digest(uri) == before


@pytest.mark.parametrize("change", [["--guidance", "3.0"], ["--steps", "3"],
                                    ["--codec", "lz4"]])
def test_store_from_other_config_refuses(capsys, store_copy, change):
    before = tree_digest(store_copy)
    base = [a for i, a in enumerate(BASE)     # an option given twice is refused
            if change[0] not in BASE[max(i - 1, 0):i + 1]]
    argv = ["materialize", "--model", "tiny-random", "--prompts", DEMO, "--store", store_copy,
            *base, *change]
    line = _run(capsys, *argv)
    assert "another model or config" in line and change[0].lstrip("-") in line
    assert tree_digest(store_copy) == before


def test_store_from_other_model_refuses(capsys, tmp_path, store_copy):
    from actstore.generation.models import save_pipeline_folder, tiny_random_components
    other = save_pipeline_folder(tmp_path / "other-model", tiny_random_components(seed=1))
    before = tree_digest(store_copy)
    line = _run(capsys, "materialize", "--model", str(other), "--prompts", DEMO,
                "--store", store_copy, *BASE)
    assert "weights_sha256" in line
    assert tree_digest(store_copy) == before


def test_other_weights_and_settings_name_the_weights_first(capsys, tmp_path, store_copy):
    """Another model with other settings too: the line named three differences in
    alphabetical order (capture.codec, capture.keep_uncond, generation.guidance) and never
    that the weights differ, the one a user asks about; the fingerprint's own order puts
    them first, and the count left out is said."""
    from actstore.generation.models import save_pipeline_folder, tiny_random_components
    other = save_pipeline_folder(tmp_path / "other-model", tiny_random_components(seed=1))
    before = tree_digest(store_copy)
    line = _run(capsys, "materialize", "--model", str(other), "--prompts", DEMO,
                "--store", store_copy, *BASE, "--guidance", "3", "--codec", "lz4",
                "--keep-uncond")
    assert "weights_sha256" in line and "and 1 more" in line
    assert line.index("weights_sha256") < line.index("generation.guidance")
    assert tree_digest(store_copy) == before


@pytest.mark.parametrize("region,word", [("0:99", "out of range"), ("2:6", "not aligned"),
                                         ("x", "START:STOP")])
def test_images_region_errors(capsys, store_copy, region, word):
    before = tree_digest(store_copy)
    line = _run(capsys, "materialize", "--model", "tiny-random", "--prompts", DEMO,
                "--store", store_copy, "--images", region, *BASE)
    assert word in line
    assert tree_digest(store_copy) == before


def test_region_outside_the_table_is_refused_before_any_worker_or_scheduler(capsys, tmp_path):
    """Checked against the prompt table before the command contacts its cluster (here one
    that does not exist) or starts workers: no ~30 s of start-up to learn of a typo."""
    code = main(["--quiet", "materialize", "--model", "tiny-random", "--prompts", DEMO,
                 "--store", str(tmp_path / "s.zarr"), "--images", "5:2", "--cluster",
                 "tcp://127.0.0.1:1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--images 5:2: out of range" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.zarr").exists()


def test_model_folder_not_sd(capsys, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "Foo", "unet": ["x", "y"]}')
    line = _run(capsys, "materialize", "--model", str(folder), "--prompts", DEMO,
                "--store", str(tmp_path / "s.zarr"), *BASE)
    assert "not an SD v1.x pipeline" in line and "vae" in line
    assert not (tmp_path / "s.zarr").exists()


def test_catalog_unknown_key(capsys, tmp_path):
    bad = tmp_path / "catalog.yaml"
    bad.write_text("version: 1\nmodels:\n  m:\n    pth: x\n")
    line = _run(capsys, "--catalog", str(bad), "materialize", "--model", "m",
                "--prompts", DEMO, "--store", str(tmp_path / "s.zarr"))
    assert "models.m" in line and "pth" in line
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("options,word", [
    ('{"secret": "hunter2-never-echoed",', "not valid JSON"),
    ('["hunter2-never-echoed"]', "JSON object"),
    ('{"secret": "hunter2-never-echoed"}', "uses none"),      # a local store
    ("@/nonexistent/s3.json", "can't read it")])
def test_storage_options_refused(capsys, store_copy, options, word):
    before = tree_digest(store_copy)
    line = _run(capsys, "--storage-options", options, "label", "--store", store_copy,
                "--provider", "toyworld", "--target", "depth")
    assert word in line and "hunter2" not in line
    assert tree_digest(store_copy) == before


FIGURE_CASES = {   # command line after the store; the figure option; words of the error
    "probe folder is a file": (["probe", "--target", "salient", "--layers", "{layer}",
                                "--steps", "0", "--figures", "{file}"], "is a file"),
    "probe folder unwritable": (["probe", "--target", "salient", "--layers", "{layer}",
                                 "--steps", "0", "--figures", "/proc/actstore-figs"],
                                "can't write in /proc"),
    "intervene figure is a folder": (["intervene", "--probe-run", "{run}", "--layers",
                                      "{layer}", "--steps", "0", "--images", "demo-015",
                                      "--provider", "toyworld", "--figure", "{dir}"],
                                     "is a folder"),
    "intervene figure not png": (["intervene", "--probe-run", "{run}", "--layers", "{layer}",
                                  "--steps", "0", "--images", "demo-015", "--provider",
                                  "toyworld", "--figure", "{dir}/grid.jpg"], ".png"),
    "intervene figure under a file": (["intervene", "--probe-run", "{run}", "--layers",
                                       "{layer}", "--steps", "0", "--images", "demo-015",
                                       "--provider", "toyworld", "--figure",
                                       "{file}/grid.png"], "is a file, not a folder"),
    "sweep out unwritable": (["sweep", "--probe-run", "{run}", "--validation", "1",
                              "--evaluation", "1", "--step-counts", "1", "--strength", "1",
                              "--provider", "toyworld", "--out", "/proc/actstore-sweep"],
                             "can't write in /proc"),
}


@pytest.mark.parametrize("case", sorted(FIGURE_CASES))
def test_unwritable_figure_path_refused_before_any_work(capsys, tmp_path, ivstore, case):
    """Figures are drawn last: a path they can't be written to is refused first, so the
    store is unchanged (before, the experiment, sweep or probe run was stored, then the
    command failed; a folder given as --figure got '<folder>.png' beside it, exit 0)."""
    from conftest import IV_LAYERS

    uri = str(tmp_path / "s.zarr")
    shutil.copytree(ivstore["uri"], uri)
    (tmp_path / "notes.txt").write_text("x")
    argv, words = FIGURE_CASES[case]
    fill = {"{layer}": IV_LAYERS[0], "{run}": ivstore["runs"]["salient"],
            "{file}": str(tmp_path / "notes.txt"), "{dir}": str(tmp_path)}
    for key, value in fill.items():
        argv = [a.replace(key, value) for a in argv]
    before = tree_digest(uri)
    line = _run(capsys, argv[0], "--store", uri, *argv[1:])
    assert words in line and argv[-2] in line, line
    assert tree_digest(uri) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "s.zarr"]


def test_label_device_is_resolved_as_for_generation(capsys, store_copy):
    """--device auto (documented) labels; a device torch does not know is one line, exit 2
    (both were torch's RuntimeError, exit 1)."""
    before = tree_digest(store_copy)
    line = _run(capsys, "label", "--store", store_copy, "--provider", "toyworld",
                "--target", "depth", "--no-x0", "--device", "gpu0")
    assert "--device 'gpu0'" in line and "cpu, cuda[:N] or auto" in line
    assert tree_digest(store_copy) == before
    assert main(["--no-prefect", "--quiet", "label", "--store", store_copy, "--provider",
                 "toyworld", "--target", "depth", "--no-x0", "--device", "auto"]) == 0
    from actstore.label.labels import list_targets
    assert list_targets(store_copy)["depth"]["provider"].startswith("toyworld")


@pytest.mark.parametrize("mode", ["no-prefect", "prefect"])
@pytest.mark.parametrize("where,words", [
    ("missing", "does not exist"),
    ("out folder", "exists but is not an actstore store"),   # `main --out`'s, not its store
    ("no model yet", "holds no complete model yet")])
def test_probe_on_what_is_not_a_store(capfd, request, tmp_path, explore_store, mode, where,
                                      words):
    """`actstore probe --store runs/main --target depth`, the main job's --out folder for its
    store, or a mistyped path, said 'unexpected IndexError: list index out of range', exit 1:
    probe looked for model variants without opening the store first."""
    folder = tmp_path / "out"
    shutil.copytree(explore_store, folder / "store.zarr")
    store = {"missing": tmp_path / "nope.zarr", "out folder": folder,
             "no model yet": folder / "store.zarr"}[where]
    if where == "no model yet":        # the root's marker written, the variant's not yet
        (folder / "store.zarr" / "models" / "trained" / "zarr.json").unlink()
    if mode == "prefect":
        request.getfixturevalue("prefect_harness")
    before = tree_digest(tmp_path)
    flags = ["--no-prefect"] if mode == "no-prefect" else []
    assert main([*flags, "--quiet", "probe", "--store", str(store), "--target", "depth"]) == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("actstore")]
    assert len(err) == 1 and words in err[0] and str(store) in err[0], err
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("mode", ["no-prefect", "prefect"])
@pytest.mark.parametrize("where", ["no model yet", "region not stored"])
def test_verify_with_nothing_to_verify(capfd, request, tmp_path, tiny_store, mode, where):
    """`actstore verify` where no block is stored (its model still being created, or an
    --images region not materialized yet) said '0/0 images reproduced (bitwise)', exit 0:
    a pass for a check that compared nothing."""
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    region = ["--images", "0:8"]
    if where == "no model yet":
        (store / "models" / "trained" / "zarr.json").unlink()
    else:                               # blocks 4:8 and on never recorded
        for block in (store / "models" / "trained" / "_blocks").iterdir():
            if block.is_dir() and not block.name.startswith("00000000-"):
                shutil.rmtree(block)
        region = ["--images", "4:8"]
    if mode == "prefect":
        request.getfixturevalue("prefect_harness")
    before = tree_digest(store)
    flags = ["--no-prefect"] if mode == "no-prefect" else []
    assert main([*flags, "--quiet", "verify", "--store", str(store), *region]) == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("actstore")]
    assert len(err) == 1 and "no stored image blocks" in err[0], err
    assert tree_digest(store) == before


def test_verify_of_a_misaligned_region_gives_its_own_reason(capfd, tmp_path, tiny_store):
    """`actstore verify --images 0:3` said '... so workers never share a block', the reason
    of materialize's worker processes, for a read-only command run in one process."""
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    before = tree_digest(store)
    assert main(["--no-prefect", "--quiet", "verify", "--store", str(store),
                 "--images", "0:3"]) == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("actstore")]
    assert err == ["actstore verify: error: --images 0:3: not aligned to the store's 4-image "
                   "blocks; use multiples of 4 (or STOP=16) as verify regenerates whole "
                   "stored blocks"], err
    assert tree_digest(store) == before


def test_open_emergence_of_no_store_says_so(tmp_path):
    """`actstore.open_emergence(path)` of a mistyped path said 'no probe runs yet; run
    actstore probe', sending the user to probe a store that is not there."""
    from actstore import ActstoreError, open_emergence

    with pytest.raises(ActstoreError, match="does not exist"):
        open_emergence(str(tmp_path / "nope.zarr"))
    assert not (tmp_path / "nope.zarr").exists()
