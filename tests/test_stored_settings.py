"""Settings a stored model variant was not made with are refused by the command, before a
cluster, a Prefect server or a model starts: one line (the one the run that loads the model
says), exit code 2, the store byte-for-byte unchanged. Kinds added to a variant are no
difference: they pass (docs/capture-points.md)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO, REPO, TINY, tree_digest
from flows.cli import main

BASE = ["--steps", str(TINY["steps"]), "--batch-size", "4"]
PREFIX = "actstore materialize: error: "


def _refusal(uri: str, differences: str) -> str:
    """The line, written out here rather than taken from the code that says it."""
    return (f"{PREFIX}store {uri}: model 'trained' was made with another model or config "
            f"({differences}); use a new --store")


def _run(capsys, *argv: str, prefect: bool = False) -> tuple[int, list[str]]:
    code = main([*([] if prefect else ["--no-prefect"]), "--quiet", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


def _materialize(model, uri: str, steps: int = 2, images: str = "0:4", **cap) -> None:
    from actstore.generation.materialize import MaterializeSettings, materialize

    materialize(model, DEMO, uri, MaterializeSettings(block_size=4, batch_size=4)
                .with_options(steps=steps, **cap), images=images, progress=False)


@pytest.fixture()
def store_copy(tmp_path, tiny_store) -> str:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, dst)
    return str(dst)


REFUSED = {   # option(s) → the difference the line names (the tiny store: 4 steps, 64 px)
    "steps": (["--steps", "5"], "generation.steps: store has 4, this run has 5"),
    "guidance": (["--guidance", "3"], "generation.guidance: store has 7.5, this run has 3.0"),
    "height": (["--height", "128"], "generation.height: store has 64, this run has 128"),
    "dtype": (["--dtype", "float16"], 'dtype: store has "float32", this run has "float16"'),
    "store-dtype": (["--store-dtype", "float32"],
                    'capture.store_dtype: store has "float16", this run has "float32"'),
    "codec": (["--codec", "lz4"], 'capture.codec: store has "zstd", this run has "lz4"'),
    "keep-uncond": (["--keep-uncond"],
                    "capture.keep_uncond: store has false, this run has true"),
    "no-x0": (["--no-x0"], "capture.x0: store has true, this run has false"),
    "two": (["--guidance", "3", "--codec", "lz4"],
            'generation.guidance: store has 7.5, this run has 3.0; capture.codec: store has '
            '"zstd", this run has "lz4"'),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_other_settings_refused_in_one_line(capsys, store_copy, case):
    change, differences = REFUSED[case]
    before = tree_digest(store_copy)
    base = [a for i, a in enumerate(BASE) if change[0] not in BASE[max(i - 1, 0):i + 1]]
    code, err = _run(capsys, "materialize", "--model", "tiny-random", "--prompts", DEMO,
                     "--store", store_copy, *base, *change)
    assert (code, err) == (2, [_refusal(store_copy, differences)])
    assert tree_digest(store_copy) == before


def test_the_line_is_the_one_the_loaded_model_says(capsys, store_copy, tiny_model):
    """The run handed a loaded model compares the whole fingerprint (weights included)
    after the command's check would have: both say the same line."""
    from actstore.errors import ActstoreError

    with pytest.raises(ActstoreError) as late:
        _materialize(tiny_model, store_copy, steps=5, images=None)
    code, err = _run(capsys, "materialize", "--model", "tiny-random", "--prompts", DEMO,
                     "--store", store_copy, "--steps", "5")
    assert code == 2 and err == [PREFIX + str(late.value)]


def test_refused_in_prefect_mode_before_a_server(capsys, store_copy):
    before = tree_digest(store_copy)
    code, err = _run(capsys, "materialize", "--model", "tiny-random", "--prompts", DEMO,
                     "--store", store_copy, *BASE, "--guidance", "3", prefect=True)
    assert (code, err) == (2, [_refusal(store_copy, REFUSED["guidance"][1])])
    assert tree_digest(store_copy) == before


def test_workers_refused_before_any_worker_starts(store_copy, tmp_path):
    """A local cluster's workers make their scratch space in the temporary folder as they
    start (dask-scratch-space/): none is made, and the line names no worker."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    before = tree_digest(store_copy)
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--quiet", "materialize", "--model", "tiny-random",
         "--prompts", DEMO, "--store", store_copy, "--steps", "5", "--workers", "2"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(scratch),
             "PREFECT_HOME": str(tmp_path / "prefect")})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [_refusal(store_copy, REFUSED["steps"][1])]
    assert not (scratch / "dask-scratch-space").exists()
    assert tree_digest(store_copy) == before


@pytest.fixture(scope="module")
def vae_stores(tmp_path_factory, tiny_model) -> dict[str, str]:
    """Two 4-image stores with the vae kind: made with it, and given it afterwards."""
    root = tmp_path_factory.mktemp("vae")
    made, added = str(root / "made.zarr"), str(root / "added.zarr")
    _materialize(tiny_model, made, kinds=("attn1", "vae"))
    _materialize(tiny_model, added)
    _materialize(tiny_model, added, kinds=("attn1", "vae"))
    return {"made": made, "added": added}


def test_vae_source_of_a_creation_kind(capsys, tmp_path, vae_stores):
    uri = str(shutil.copytree(vae_stores["made"], tmp_path / "s.zarr"))
    before = tree_digest(uri)
    code, err = _run(capsys, "materialize", "--model", "tiny-random", "--prompts", DEMO,
                     "--store", uri, "--steps", "2", "--vae-source", "x0")
    assert (code, err) == (2, [_refusal(uri, 'capture.vae_source: store has "latent", this '
                                             'run has "x0"')])
    assert tree_digest(uri) == before


def test_vae_source_of_an_added_kind(capsys, tmp_path, vae_stores, tiny_model):
    from actstore.errors import ActstoreError

    uri = str(shutil.copytree(vae_stores["added"], tmp_path / "s.zarr"))
    before = tree_digest(uri)
    code, err = _run(capsys, "materialize", "--model", "tiny-random", "--prompts", DEMO,
                     "--store", uri, "--steps", "2", "--vae-source", "x0")
    line = (f"{PREFIX}store {uri}: capture kind 'vae' of model 'trained' was added with "
            'other settings (vae_source: store has "latent", this run has "x0"); use the same '
            "or a new --store")
    assert (code, err) == (2, [line])
    assert tree_digest(uri) == before
    with pytest.raises(ActstoreError) as late:   # the loaded model's run says the same
        _materialize(tiny_model, uri, images=None, vae_source="x0")
    assert PREFIX + str(late.value) == line


def test_scheduler_config_of_the_folder(capsys, tmp_path):
    """A folder whose scheduler was re-saved with another noise schedule."""
    from actstore.generation.models import build_tiny_random

    folder = shutil.copytree(build_tiny_random(), tmp_path / "model")
    uri = str(tmp_path / "s.zarr")
    _materialize(str(folder), uri)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "beta_end": 0.02}))
    before = tree_digest(uri)
    code, err = _run(capsys, "materialize", "--model", str(folder), "--prompts", DEMO,
                     "--store", uri, "--steps", "2")
    assert (code, err) == (2, [_refusal(uri, "scheduler_config.beta_end: store has 0.012, "
                                             "this run has 0.02")])
    assert tree_digest(uri) == before


def test_added_and_unnamed_kinds_are_no_difference(capsys, tmp_path, vae_stores):
    """A kind the variant lacks is added after the regeneration check; one left out of
    --capture is kept, not dropped: neither is refused."""
    uri = str(shutil.copytree(vae_stores["made"], tmp_path / "s.zarr"))
    for kinds in ("attn1,vae,attn2", "attn1"):
        code, err = _run(capsys, "materialize", "--model", "tiny-random", "--prompts", DEMO,
                         "--store", uri, "--steps", "2", "--images", "0:4",
                         "--capture", kinds)
        assert code == 0, err
    from actstore.store.captures import added_captures
    assert list(added_captures(uri, "trained")) == ["attn2"]


def test_main_rerun_with_other_settings(capsys, tmp_path, tiny_model):
    """A rerun into an --out whose store was made with other settings: refused before its
    cluster, in the words of --out."""
    from flows.main import MAIN_MATERIALIZE, main_store

    out = tmp_path / "out"
    uri = main_store(str(out))
    from actstore.generation.materialize import materialize
    materialize(tiny_model, DEMO, uri, MAIN_MATERIALIZE.with_options(steps=2), images="0:8",
                progress=False)
    before = tree_digest(uri)
    code, err = _run(capsys, "main", "--model", "tiny-random", "--out", str(out),
                     "--steps", "3", "--workers", "2", prefect=True)
    assert code == 2 and err == [
        f"actstore main: error: store {uri}: model 'trained' was made with another model or "
        f"config (generation.steps: store has 2, this run has 3); use a new --out (or remove "
        f"{out} to start again)"]
    assert tree_digest(uri) == before
    assert sorted(p.name for p in Path(out).iterdir()) == ["store.zarr"]


def test_weights_replaced_in_the_folder_are_refused_by_the_run_that_loads(capsys, tmp_path):
    """The same folder with other weights under the same file names (retrained in place):
    the command's check cannot tell (the fingerprint's weights_sha256 hashes the tensors as
    loaded; fingerprint.check_stored_settings says why it is not computed there), so the
    run that loads the model refuses, in one line naming the weights, before it writes."""
    from actstore.generation.fingerprint import check_stored_settings
    from actstore.generation.materialize import MaterializeSettings
    from actstore.generation.models import save_pipeline_folder, tiny_random_components

    folder = str(save_pipeline_folder(tmp_path / "model", tiny_random_components(seed=0)))
    uri = str(tmp_path / "s.zarr")
    _materialize(folder, uri)
    unet = Path(folder, "unet", "diffusion_pytorch_model.safetensors")
    made = unet.read_bytes()
    save_pipeline_folder(folder, tiny_random_components(seed=1))
    assert unet.read_bytes() != made and len(unet.read_bytes()) == len(made)
    check_stored_settings(uri, folder, MaterializeSettings(block_size=4, batch_size=4)
                          .with_options(steps=2))     # passes: nothing it reads changed
    before = tree_digest(uri)
    capsys.readouterr()        # the bars of saving the folder
    code, err = _run(capsys, "materialize", "--model", folder, "--prompts", DEMO, "--store",
                     uri, "--steps", "2", "--batch-size", "4", "--images", "0:4")
    err = [ln for ln in err if ln.startswith("actstore")]   # not the loading bar
    assert code == 2 and len(err) == 1, err
    stored = json.loads(Path(uri, "models", "trained", "zarr.json").read_text())[
        "attributes"]["actstore_model"]["fingerprint"]["weights_sha256"]
    # each hash cut to 20 digits inside its quotes (the cut took the closing one: 2026-12-07)
    assert err[0].startswith(f"{PREFIX}store {uri}: model 'trained' was made with another "
                             f'model or config (weights_sha256: store has "{stored[:20]}…", '
                             'this run has "'), err[0]
    assert re.search(r'this run has "[0-9a-f]{20}…"[;)]', err[0]), err[0]
    assert tree_digest(uri) == before


def test_long_differences_are_cut_inside_their_quotes():
    from actstore.store.claims import diff

    stored, wanted = {"sha": "a" * 64, "steps": [1.0] * 9, "n": 1}, {"sha": "b" * 64,
                                                                        "steps": [2.0] * 9}
    assert diff(stored, wanted) == [f'sha: store has "{"a" * 20}…", this run has "{"b" * 20}…"',
                                    "steps: store has [1.0, 1.0, 1.0, 1.0, 1…, this run has "
                                    "[2.0, 2.0, 2.0, 2.0, 2…",
                                    "n: store has 1, this run has null"]
