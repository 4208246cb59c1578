"""A toy label model folder that fails to load says why, in one line, store unchanged: only a
folder of another model is 'holds no toy label model'. Before, every error while loading
read as that (a CUDA out-of-memory alike), and a truncated weights file or one this user
may not read (which safetensors reports as missing) was an unexpected error, exit 1."""

from __future__ import annotations

import json
import os
import shutil
import struct
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


def _with_header(folder: Path, header: bytes) -> None:
    """The weights file with ``header`` for its own, the tensor bytes kept after it."""
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    weights.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n:])


def _header(folder: Path) -> dict:
    data = (folder / "model.safetensors").read_bytes()
    return json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])


def _nested_header(folder: Path) -> None:
    _with_header(folder, b"[" * 100_000 + b"]" * 100_000)


def _infinite_offset(folder: Path) -> None:
    header = _header(folder)
    header["head.bias"]["data_offsets"][1] = 1e999   # JSON's 1e999 is a float infinity
    _with_header(folder, json.dumps(header).replace("Infinity", "1e999").encode())


def _negative_offsets(folder: Path) -> None:
    header = _header(folder)
    header["head.bias"]["data_offsets"] = [-5, -1]
    _with_header(folder, json.dumps(header).encode())


def _unknown_dtype(folder: Path) -> None:
    header = _header(folder)
    header["head.bias"]["dtype"] = "C64"
    _with_header(folder, json.dumps(header).encode())


def _huge_config(folder: Path) -> None:
    # a config of megabytes is read no further than a label network's config can be long
    (folder / "config.json").write_text('{"widths": [16, 32], "pad": "' + "x" * 3_000_000 + '"}')


def _negative_width(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "widths": [-1, 32]}))


NOT_WHOLE = "{weights} is not a whole safetensors file"
NOT_TOY = "{folder} holds no toy label model (its "
CASES = {
    "unreadable": (_unreadable, "cannot read {weights} (Permission denied)"),
    "truncated": (_truncated, NOT_WHOLE),
    "garbled config": (_garbled_config, NOT_TOY + "config.json describes none"),
    "another model": (_another_model, NOT_TOY + "weights are not the label network's: missing"),
    # a hostile or corrupt header: one line, no traceback, nothing read past the file
    "nested header": (_nested_header, NOT_WHOLE),
    "infinite offset": (_infinite_offset, NOT_WHOLE),
    "negative offsets": (_negative_offsets, NOT_WHOLE + " (head.bias: bytes [-5, -1]"),
    "unknown dtype": (_unknown_dtype, NOT_WHOLE + " (head.bias: dtype 'C64', which no label"),
    "huge config": (_huge_config, NOT_TOY + "config.json describes none"),
    "negative width": (_negative_width, NOT_TOY + "config.json describes none: widths"),
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
