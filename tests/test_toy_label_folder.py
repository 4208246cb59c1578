"""A toy label model folder that fails to load says why, in one line, store unchanged: only a
folder of another model is 'holds no toy label model'. Before, every error while loading
read as that (a CUDA out-of-memory alike), and a truncated weights file or one this user
may not read (which safetensors reports as missing) was an unexpected error, exit 1."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import REPO, tree_digest
from flows.cli import main

LABELER = REPO / "models" / "toy-labeler"
# A file root may not read either (a write-only kernel setting): where chmod 000 does not
# bite, the weights are this file, so the refusal is the system's, as for a chmod'ed file.
WRITE_ONLY = Path("/proc/sys/vm/compact_memory")


def _readable(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
        return True
    except OSError:
        return False


def _unreadable(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.chmod(0)
    if not _readable(weights):
        return
    weights.chmod(0o644)
    if not WRITE_ONLY.is_file() or _readable(WRITE_ONLY):
        pytest.skip("no file this user cannot read (running as root, chmod does not bite)")
    weights.unlink()
    weights.symlink_to(WRITE_ONLY)


def _truncated(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])


def _garbled_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"widths": [16, 32')


def _another_model(folder: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(REPO / "models" / "toy-reader" / name, folder / name)


CASES = {
    "unreadable": (_unreadable, "cannot read {weights} (Permission denied)"),
    "truncated": (_truncated, "{weights} is not a whole safetensors file"),
    "garbled config": (_garbled_config, "{folder} holds no toy label model (its config.json "
                                        "describes none"),
    "another model": (_another_model, "{folder} holds no toy label model (its weights are not "
                                      "the label network's: missing"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_folder_that_does_not_load_says_why(tmp_path, tiny_store, capsys, case):
    make, words = CASES[case]
    folder = tmp_path / "labeler"
    shutil.copytree(LABELER, folder)
    make(folder)
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    before = tree_digest(store)
    try:
        code = main(["--no-prefect", "--quiet", "label", "--store", str(store), "--provider",
                     f"toyworld:{folder}", "--target", "depth", "--device", "cpu"])
    finally:
        for p in folder.iterdir():
            if not p.is_symlink():
                p.chmod(0o644)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("actstore")]
    assert code == 2 and len(err) == 1, err
    want = words.format(weights=folder / "model.safetensors", folder=folder)
    assert want in err[0], err
    assert tree_digest(store) == before
    assert os.access(LABELER / "model.safetensors", os.R_OK)
