"""Prompt tables: good tables load the same from any format, bad ones fail in one line
that names the file, the row and the fix."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pandas as pd
import pytest

from actstore.errors import ActstoreError
from actstore.generation.prompts import load_prompts, prompts_fingerprint

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "prompts" / "demo.csv"
HEADER = "image_id,prompt,seed,split\n"


def write(tmp_path: Path, body: str, name: str = "p.csv") -> str:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return str(path)


def error_of(src: str) -> str:
    with pytest.raises(ActstoreError) as info:
        load_prompts(src)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --- good tables ------------------------------------------------------------------------

def test_demo_table_loads_with_canonical_columns_and_types() -> None:
    df = load_prompts(str(DEMO))
    assert list(df.columns[:4]) == ["image_id", "prompt", "seed", "split"]
    assert 12 <= len(df) <= 20
    assert df["image_id"].is_unique
    assert df["seed"].dtype == "int64"
    assert set(df["split"]) == {"train", "test"}
    assert list(df.index) == list(range(len(df)))
    assert all(isinstance(p, str) and p.strip() == p and p for p in df["prompt"])


def test_missing_split_means_all_train_and_extra_columns_are_kept(tmp_path: Path) -> None:
    src = write(tmp_path, "image_id,prompt,seed,note,score\na,a cat,1,hello,\nb,a dog,2,,0.5\n")
    df = load_prompts(src)
    assert list(df.columns) == ["image_id", "prompt", "seed", "split", "note", "score"]
    assert list(df["split"]) == ["train", "train"]
    assert pd.isna(df.loc[0, "score"]) and df.loc[1, "score"] == 0.5  # extras: normal NA rules


def test_text_is_taken_verbatim_except_surrounding_whitespace(tmp_path: Path) -> None:
    src = write(tmp_path, HEADER + " 007 ,  NA ,+5, test \nNone,None,0,train\n")
    df = load_prompts(src)
    assert list(df["image_id"]) == ["007", "None"]  # no int parsing, no NA guessing
    assert list(df["prompt"]) == ["NA", "None"]
    assert list(df["seed"]) == [5, 0]
    assert list(df["split"]) == ["test", "train"]


def test_header_whitespace_and_excel_bom_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffimage_id, prompt ,seed\na,x,1\n".encode("utf-8"))
    assert list(load_prompts(str(path)).columns) == ["image_id", "prompt", "seed", "split"]


def test_seed_range_edges(tmp_path: Path) -> None:
    df = load_prompts(write(tmp_path, HEADER + f"a,x,{2**63 - 1},train\n"))
    assert int(df.loc[0, "seed"]) == 2**63 - 1
    for seed in (2**63, -1):
        message = error_of(write(tmp_path, HEADER + f"a,x,{seed},train\n"))
        assert f"seed {seed} is out of range" in message and "row 1" in message


def test_parquet_and_fsspec_url_read_like_csv(tmp_path: Path) -> None:
    csv = load_prompts(str(DEMO))
    parquet = tmp_path / "demo.parquet"
    csv.to_parquet(parquet)
    from_parquet = load_prompts(str(parquet))
    pd.testing.assert_frame_equal(from_parquet.reset_index(drop=True), csv, check_dtype=False)
    with fsspec.open("memory://actstore-test/demo.csv", "w") as f:
        f.write(DEMO.read_text())
    from_url = load_prompts("memory://actstore-test/demo.csv")
    assert prompts_fingerprint(from_url) == prompts_fingerprint(csv)
    assert from_url.attrs["source"] == "memory://actstore-test/demo.csv"


def test_compressed_csv(tmp_path: Path) -> None:
    path = tmp_path / "demo.csv.gz"
    load_prompts(str(DEMO)).to_csv(path, index=False)
    assert len(load_prompts(str(path))) == len(load_prompts(str(DEMO)))


# --- fingerprint ------------------------------------------------------------------------

def test_fingerprint_is_stable_and_covers_exactly_what_shapes_images(tmp_path: Path) -> None:
    df = load_prompts(str(DEMO))
    fp = prompts_fingerprint(df)
    assert len(fp) == 64 and fp == prompts_fingerprint(load_prompts(str(DEMO)))
    # Extra columns do not change activations, so they do not change the fingerprint.
    assert prompts_fingerprint(df.assign(note="x")) == fp
    # Row order is the image index: reordering is a different store.
    assert prompts_fingerprint(df.iloc[::-1].reset_index(drop=True)) != fp
    for col, value in (("prompt", "a blue car"), ("seed", 7), ("split", "test"),
                       ("image_id", "other")):
        changed = df.copy()
        changed.loc[0, col] = value if col != "split" else "val"
        assert prompts_fingerprint(changed) != fp, col
    # An absent split column means all-train, identical to writing it out.
    no_split = load_prompts(write(tmp_path, "image_id,prompt,seed\na,x,1\n"))
    all_train = load_prompts(write(tmp_path, HEADER + "a,x,1,train\n", "q.csv"))
    assert prompts_fingerprint(no_split) == prompts_fingerprint(all_train)


def test_fingerprint_refuses_a_frame_without_the_columns() -> None:
    with pytest.raises(ActstoreError, match="seed"):
        prompts_fingerprint(pd.DataFrame({"image_id": ["a"], "prompt": ["x"]}))


# --- bad tables -------------------------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    message = error_of(str(tmp_path / "nope.csv"))
    assert "nope.csv" in message and "cannot read" in message


def test_directory_and_garbage_parquet_are_unreadable(tmp_path: Path) -> None:
    (tmp_path / "dir.csv").mkdir()
    assert "cannot read" in error_of(str(tmp_path / "dir.csv"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    assert "cannot read" in error_of(str(tmp_path / "bad.parquet"))


def test_unknown_format(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "whatever", "prompts.txt"))
    assert "unknown prompt table format ('.txt')" in message and ".csv" in message
    assert "no suffix" in error_of(write(tmp_path, "whatever", "prompts"))


def test_missing_column_is_named_with_the_columns_found(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "image_id,Prompt,seed\na,x,1\n"))
    assert "missing required column 'prompt'" in message
    assert "found: image_id, Prompt, seed" in message


def test_empty_table(tmp_path: Path) -> None:
    assert "no rows" in error_of(write(tmp_path, HEADER))


def test_duplicate_image_id_names_id_and_both_rows(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, HEADER + "a,x,1,train\nb,y,2,train\na,z,3,test\n"))
    assert "duplicate image_id 'a' in rows 1 and 3" in message


@pytest.mark.parametrize("prompt", ['""', "   "])
def test_empty_prompt_names_the_row(tmp_path: Path, prompt: str) -> None:
    message = error_of(write(tmp_path, HEADER + f"a,x,1,train\nb,{prompt},2,train\n"))
    assert "row 2 (image_id 'b'): empty prompt" in message


@pytest.mark.parametrize("seed", ["abc", "1.5", "42.0", "1e3", ""])
def test_non_integer_seed_names_row_and_value(tmp_path: Path, seed: str) -> None:
    message = error_of(write(tmp_path, HEADER + f"a,x,1,train\nb,y,{seed},train\n"))
    assert "row 2 (image_id 'b'): seed" in message
    assert f"'{seed}' is not an integer" in message


def test_missing_values_in_required_columns(tmp_path: Path) -> None:
    assert "row 2: image_id is empty" in error_of(
        write(tmp_path, HEADER + "a,x,1,train\n,y,2,train\n"))
    assert "row 1 (image_id 'a'): split is empty" in error_of(
        write(tmp_path, HEADER + "a,x,1,\n"))
    frame = pd.DataFrame({"image_id": ["a", "b"], "prompt": ["x", None], "seed": [1.0, None]})
    frame.to_parquet(tmp_path / "nan.parquet")
    assert "row 2 (image_id 'b'): prompt is missing (NaN/null)" in error_of(
        str(tmp_path / "nan.parquet"))
    frame["prompt"] = ["x", "y"]
    frame.to_parquet(tmp_path / "nan.parquet")
    assert "row 1 (image_id 'a'): seed 1.0 is not an integer" in error_of(
        str(tmp_path / "nan.parquet"))


def test_parquet_types_are_checked(tmp_path: Path) -> None:
    pd.DataFrame({"image_id": [1, 2], "prompt": ["x", "y"], "seed": [1, 2]}).to_parquet(
        tmp_path / "ids.parquet")
    assert "row 1: image_id must be text, got 1 (int)" in error_of(str(tmp_path / "ids.parquet"))
    pd.DataFrame({"image_id": ["a"], "prompt": ["x"], "seed": [True]}).to_parquet(
        tmp_path / "bool.parquet")
    assert "seed True is not an integer" in error_of(str(tmp_path / "bool.parquet"))


def test_a_rerun_hashes_its_table_once(tmp_path: Path, monkeypatch, tiny_store,
                                       tiny_model) -> None:
    """A run into an existing store hashed its prompt table twice, once for the store's
    identity and once more to compare it with the store's (~0.8 s a pass for 100,000
    prompts): the second comparison now takes the first pass's fingerprint."""
    import shutil

    from actstore.generation import materialize as mat
    from conftest import TINY

    uri = str(shutil.copytree(tiny_store, tmp_path / "copy.zarr"))
    passes = []

    def counted(df):
        passes.append(len(df))
        return prompts_fingerprint(df)

    monkeypatch.setattr(mat, "prompts_fingerprint", counted)
    summary = mat.materialize(tiny_model, str(DEMO), uri, mat.MaterializeSettings(
        batch_size=TINY["batch_size"], block_size=TINY["block_size"]).with_options(
        steps=TINY["steps"]), progress=False)
    assert passes == [16]
    assert (summary["blocks_skipped"], summary["blocks_written"]) == (4, 0)   # a rerun
