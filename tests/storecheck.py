"""Whole-store comparison: every key of two stores, arrays by content, metadata and
attributes by value, with only wall-clock stamps and fresh ids left out."""

from __future__ import annotations

import hashlib
import json
import re

import fsspec

# Attribute values that differ between two correct runs by construction.
VOLATILE = {"created", "written", "started", "seconds"}
# Fresh ids (probe runs, label versions, commits): replaced by their order of appearance.
FRESH_ID = re.compile(r"(v|c|[A-Za-z0-9_.]+)-\d{8}T\d{12}-[0-9a-f]{6}")


def _clean(value):
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def snapshot(uri: str, *, skip: tuple[str, ...] = (),
             alias: dict[str, str] | None = None) -> dict[str, object]:
    """{key: parsed zarr.json without volatile stamps | sha256 of the object's bytes}.

    Fresh ids in keys and values are renamed ``<id0>``, ``<id1>``... in sorted key order,
    so two runs that made the same things under different ids compare equal; ``alias``
    renames ids derived from fresh ones (an experiment id hashes its probe run's)."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    keys = sorted(p[len(root) + 1:] for p in fs.find(root) if not p.endswith(".partial"))
    ids: dict[str, str] = {}

    def rename(text: str) -> str:
        def sub(m):
            return ids.setdefault(m.group(0), f"<id{len(ids)}>")
        for old, new in (alias or {}).items():
            text = text.replace(old, new)
        return FRESH_ID.sub(sub, text)

    out = {}
    for key in keys:
        if any(key.startswith(s) for s in skip):
            continue
        data = fs.cat_file(f"{root}/{key}")
        if key.endswith("zarr.json"):
            out[rename(key)] = json.loads(rename(json.dumps(_clean(json.loads(data)))))
        else:
            out[rename(key)] = hashlib.sha256(data).hexdigest()
    return out


def assert_same_store(got: str, want: str, *, alias: dict[str, str] | None = None,
                      **kwargs) -> None:
    """``alias`` renames ids of ``got`` to those of ``want``."""
    a, b = snapshot(got, alias=alias, **kwargs), snapshot(want, **kwargs)
    assert sorted(a) == sorted(b), (f"keys differ: only in got {sorted(set(a) - set(b))[:5]}, "
                                    f"only in want {sorted(set(b) - set(a))[:5]}")
    bad = [k for k in a if a[k] != b[k]]
    assert not bad, f"{len(bad)} objects differ, e.g. {bad[:3]}: {a[bad[0]]} != {b[bad[0]]}"


def object_digest(uri: str, **options) -> dict[str, str]:
    """sha256 of every object under ``uri`` by key, nothing left out: 'byte-identical' for a
    store or a whole bucket (``options``: the filesystem's, e.g. credentials)."""
    fs, root = fsspec.core.url_to_fs(uri, skip_instance_cache=True, **options)
    root = root.rstrip("/")
    return {p[len(root) + 1:]: hashlib.sha256(fs.cat_file(p)).hexdigest()
            for p in sorted(fs.find(root))}
