"""The prompt table: which images a store holds, in which order, from which seed.

A store's ``image`` axis *is* the prompt table's row order: image ``i`` is row ``i``. So the
table is validated strictly up front (before any model is loaded), because a bad row found
after an hour of generation, or a duplicate id silently overwriting another image, costs far
more than a refused start.

Conventions, chosen so the same table reads the same way from CSV and Parquet:

* Required columns ``image_id`` (text, unique), ``prompt`` (text, not blank) and ``seed``
  (whole number, ``0 <= seed < 2**63``, so it fits ``torch.Generator.manual_seed`` and int64).
* ``image_id``: 1-128 characters from letters, digits, ``.``, ``_`` and ``-``, starting with
  a letter or digit. Ids become zarr keys and file names (``<image_id>.npy`` targets, figure
  rows), so ``img/003`` or ``../../etc`` would name other paths; refusing them is simpler
  and safer than escaping them everywhere they are used.
* Optional ``split``: ``train`` or ``test`` (:data:`SPLITS`). Probes fit on train and score
  on test, and nothing reads any other value, so ``validation`` would silently be in
  neither; keep other subsets in an extra column. If the column is absent every row gets
  ``"train"``: a hidden pseudo-random split would be a decision made for the user, and an
  all-train table fingerprints the same as the identical table with an explicit all-train
  column.
* Prompts longer than the model's text encoder reads (CLIP: 77 tokens with start and end)
  are refused once the model's tokenizer is known (:func:`check_prompt_lengths`, before
  anything is written): SD would silently truncate them, and the store's ``prompt`` must be
  the text that conditioned the image.
* Surrounding whitespace is removed from ``image_id``, ``prompt`` and ``split`` (CLIP's
  tokenizer ignores it anyway, so it must not change ids or fingerprints).
* Any other column is kept as is, after the four above, for labels and analysis.
* Rows in messages are counted from 1, header excluded ("row 1" is the first image).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import re
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pandas as pd

from actstore.errors import ActstoreError, InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REQUIRED_COLUMNS = ("image_id", "prompt", "seed")
TEXT_COLUMNS = ("image_id", "prompt", "split")
DEFAULT_SPLIT = "train"
SPLITS = ("train", "test")
MAX_SEED = 2**63  # exclusive
IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".zip"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
# pandas' default missing-value markers, applied to the extra columns only: in id and prompt
# columns "NA" or "None" is text, and blank cells must be reported, not turned into NaN.
_NA_MARKERS = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
               "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
               "nan", "null"]
_SEED_TEXT = re.compile(r"[+-]?\d+")
_FINGERPRINT_VERSION = "actstore-prompts-v1"


def load_prompts(path_or_url: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """Read and validate a prompt table; the returned row order is the store's image order.

    ``path_or_url`` is a local path or an fsspec URL (``s3://...``, ``memory://...``); the
    format comes from the suffix (``.csv`` optionally compressed, ``.parquet``/``.pq``).
    Returns a frame with a fresh 0..n-1 index and columns ``image_id, prompt, seed, split``
    (str, str, int64, str) followed by any extra columns.
    """
    src = str(path_or_url)
    fmt = _format_of(src)
    try:
        if fmt == "csv":
            raw = _read_csv(src, storage_options)
        else:
            raw = pd.read_parquet(src, storage_options=storage_options)
    except Exception as exc:  # any reader failure is the same user problem: bad file
        reason = _one_line(f"{type(exc).__name__}: {exc}")
        raise ActstoreError(
            f"{src}: cannot read prompt table ({reason}); check the path and that it is a "
            f"valid {fmt.upper()} file") from exc
    return _validate(raw, src)


def prompts_fingerprint(df: pd.DataFrame) -> str:
    """Hash what decides the generated images, so a store refuses a different table.

    Covers ``image_id, prompt, seed, split`` *in row order*: the row order is the image
    index, so a reordered table is a different store even with the same rows. Extra columns
    are left out: they do not change any activation. Returns 64 hex digits of SHA-256.
    To accept a table that only appends rows, compare the fingerprint of its first ``n``
    rows (``df.iloc[:n]``) with the store's.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ActstoreError(
            f"prompts_fingerprint: table lacks column(s) {', '.join(missing)}; "
            "pass the frame returned by load_prompts")
    splits = df["split"] if "split" in df.columns else [DEFAULT_SPLIT] * len(df)
    digest = hashlib.sha256(_FINGERPRINT_VERSION.encode() + b"\n")
    for image_id, prompt, seed, split in zip(df["image_id"], df["prompt"], df["seed"], splits):
        row = [str(image_id), str(prompt), int(seed), str(split)]
        digest.update(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _format_of(src: str) -> str:
    """Pick the reader from the suffix; content sniffing would hide a misnamed file."""
    suffixes = [s.lower() for s in PurePosixPath(urlparse(src).path or src).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last == ".csv":
        return "csv"
    if last in _PARQUET_SUFFIXES:
        return "parquet"
    shown = f"'{last}'" if last else "no suffix"
    raise ActstoreError(
        f"{src}: unknown prompt table format ({shown}); use a .csv (optionally .gz/.zst "
        "compressed) or .parquet file")


def _read_csv(src: str, storage_options: dict[str, Any] | None) -> pd.DataFrame:
    """Read required columns as raw text so blanks and 'NA' reach validation verbatim."""
    header = pd.read_csv(src, nrows=0, storage_options=storage_options).columns
    known = [c for c in header if str(c).strip() in (*REQUIRED_COLUMNS, "split")]
    extras = [c for c in header if c not in known]
    return pd.read_csv(
        src, storage_options=storage_options, keep_default_na=False,
        dtype={c: str for c in known}, na_values={c: _NA_MARKERS for c in extras})


def _validate(raw: pd.DataFrame, src: str) -> pd.DataFrame:
    """Check every rule and build the canonical frame; the first violation wins."""
    raw = raw.rename(columns=lambda c: str(c).strip())  # "id, prompt" headers are common
    found = [str(c) for c in raw.columns]
    for col in REQUIRED_COLUMNS:
        if col not in raw.columns:
            raise ActstoreError(
                f"{src}: missing required column '{col}' (found: {', '.join(found) or 'none'}); "
                f"add it or rename the matching column")
    if len(raw) == 0:
        raise ActstoreError(f"{src}: prompt table has no rows; add at least one image")
    raw = raw.reset_index(drop=True)
    ids = _text_column(raw, "image_id", src, ids=None)
    _check_ids(ids, src)
    _check_unique(ids, src)
    out = pd.DataFrame({"image_id": ids})
    out["prompt"] = _text_column(raw, "prompt", src, ids)
    out["seed"] = _seed_column(raw["seed"], src, ids)
    if "split" in raw.columns:
        out["split"] = _split_column(raw, src, ids)
    else:
        out["split"] = DEFAULT_SPLIT
    for col in raw.columns:
        if col not in out.columns:
            out[col] = raw[col]
    out["seed"] = out["seed"].astype("int64")
    for col in TEXT_COLUMNS:
        out[col] = out[col].astype(str)
    out.attrs["source"] = src
    return out


def _where(i: int, ids: list[str] | None) -> str:
    """Name a row by number and, once ids are known, by id: both help find it."""
    return f"row {i + 1}" + (f" (image_id '{ids[i]}')" if ids is not None else "")


def _text_column(raw: pd.DataFrame, col: str, src: str, ids: list[str] | None) -> list[str]:
    """Return stripped strings, refusing missing, non-text and blank cells."""
    values = []
    for i, v in enumerate(raw[col].tolist()):
        if v is None or (isinstance(v, float) and v != v) or v is pd.NA:
            raise ActstoreError(f"{src}: {_where(i, ids)}: {col} is missing (NaN/null); "
                                f"fill it in or delete the row")
        if not isinstance(v, str):
            raise ActstoreError(f"{src}: {_where(i, ids)}: {col} must be text, got {v!r} "
                                f"({type(v).__name__}); store the column as strings")
        v = v.strip()
        if not v:
            what = "empty prompt" if col == "prompt" else f"{col} is empty"
            raise ActstoreError(f"{src}: {_where(i, ids)}: {what}; "
                                f"write a non-blank {col} or delete the row")
        values.append(v)
    return values


def _check_ids(ids: list[str], src: str) -> None:
    for i, image_id in enumerate(ids):
        if not IMAGE_ID.fullmatch(image_id):
            raise ActstoreError(
                f"{src}: row {i + 1}: image_id {image_id!r} is not 1-128 letters, digits, "
                "'.', '_' or '-' starting with a letter or digit; ids become keys and file "
                "names, so rename it (e.g. img-003)")


def _split_column(raw: pd.DataFrame, src: str, ids: list[str]) -> list[str]:
    splits = _text_column(raw, "split", src, ids)
    for i, split in enumerate(splits):
        if split not in SPLITS:
            hint = f"write {split.lower()!r}" if split.lower() in SPLITS else \
                "probes fit on train and score on test; keep other subsets in an extra column"
            raise ActstoreError(f"{src}: {_where(i, ids)}: split {split!r} is not "
                                f"{' or '.join(SPLITS)}; {hint}")
    return splits


def check_prompt_lengths(table: pd.DataFrame, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a prompt the text encoder would truncate (it reads ``model_max_length``
    tokens, start and end markers included), naming its row and both lengths."""
    limit = int(tokenizer.model_max_length)
    lengths = [len(ids) for ids in tokenizer(list(table["prompt"]), truncation=False,
                                             add_special_tokens=True)["input_ids"]]
    ids = list(table["image_id"])
    for i, n in enumerate(lengths):
        if n > limit:
            src = table.attrs.get("source", "prompt table")
            raise InputError(
                f"{src}: {_where(i, ids)}: prompt is {n - 2} tokens for this model, its text "
                f"encoder reads {limit - 2}; shorten it (SD would cut it silently, and the "
                "store's prompt must be the text the image was made from)")


def _seed_column(seeds: pd.Series, src: str, ids: list[str]) -> list[int]:
    """Accept only exact whole numbers: a float seed may already have lost digits."""
    out = []
    for i, v in enumerate(seeds.tolist()):
        seed = _as_int(v)
        if seed is None:
            missing = v is None or v is pd.NA or (isinstance(v, float) and v != v)
            shown = "missing (NaN/null)" if missing else f"{v!r} is not an integer"
            raise ActstoreError(f"{src}: {_where(i, ids)}: seed {shown}; "
                                f"write a whole number 0 <= seed < 2**63")
        if not 0 <= seed < MAX_SEED:
            raise ActstoreError(f"{src}: {_where(i, ids)}: seed {seed} is out of range; "
                                f"use 0 <= seed < 2**63")
        out.append(seed)
    return out


def _as_int(v: Any) -> int | None:
    """Parse one seed cell; None means 'not an integer' (bools and floats included)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, numbers.Integral):  # also numpy integers from object columns
        return int(v)
    if isinstance(v, str) and _SEED_TEXT.fullmatch(v.strip()):
        return int(v.strip())
    return None


def _check_unique(ids: list[str], src: str) -> None:
    """Report the first duplicate with both rows, so the user can pick which to keep."""
    first: dict[str, int] = {}
    for i, image_id in enumerate(ids):
        if image_id in first:
            raise ActstoreError(
                f"{src}: duplicate image_id '{image_id}' in rows {first[image_id] + 1} and "
                f"{i + 1}; image ids must be unique, rename or delete one")
        first[image_id] = i


def _one_line(text: str) -> str:
    """Collapse a library message so the CLI's one-line contract holds."""
    return " ".join(text.split())[:300]
