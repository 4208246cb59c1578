"""Property tests: random prompt tables round-trip through the image table exactly, and
region strings are parsed as a brute-force oracle says (hypothesis, few examples)."""

from __future__ import annotations

import tempfile
import threading

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actstore.errors import ActstoreError
from actstore.generation.materialize import parse_region
from actstore.generation.prompts import prompts_fingerprint
from actstore.store import core, io

FAST = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

ids = st.text(st.characters(codec="utf-8", categories=("L", "N"), include_characters="-_."),
              min_size=1, max_size=12)
prompts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)


@st.composite
def tables(draw) -> pd.DataFrame:
    n = draw(st.integers(1, 9))
    image_ids = draw(st.lists(ids, min_size=n, max_size=n, unique=True))
    return pd.DataFrame({
        "image_id": image_ids,
        "prompt": draw(st.lists(prompts, min_size=n, max_size=n)),
        "seed": draw(st.lists(st.integers(0, 2**63 - 1), min_size=n, max_size=n)),
        "split": draw(st.lists(st.sampled_from(["train", "test"]), min_size=n, max_size=n))})


@FAST
@given(table=tables(), block=st.integers(1, 5), workers=st.integers(1, 3))
def test_image_table_round_trips_exactly(table, block, workers):
    """Whatever the text, the stored table reads back identical, from 1-3 simultaneous
    creators, and a second table is refused with the store unchanged."""
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"{tmp}/s.zarr"
        sha = prompts_fingerprint(table)
        errors = []

        def create():
            try:
                core.create_or_check_root(uri, table, sha, block)
            except Exception as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)
        threads = [threading.Thread(target=create) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        attrs = core.read_root_attrs(uri)
        assert (attrs["n_images"], attrs["block_size"], attrs["prompts_sha256"]) == \
            (len(table), block, sha)
        got = io.open_dataset(uri, "images").load()
        for col in ("image_id", "prompt", "split"):
            assert [str(v) for v in got[col].values.tolist()] == table[col].tolist()
        np.testing.assert_array_equal(got["seed"].values, table["seed"].to_numpy(np.int64))
        other = table.assign(seed=table["seed"] ^ 1)
        with pytest.raises(ActstoreError, match="different prompt table"):
            core.create_or_check_root(uri, other, prompts_fingerprint(other), None)


def _oracle(text: str, n: int, block: int):
    """Brute force: every (a, b) the region may mean, checked one by one."""
    if not text:
        return 0, n
    if text.count(":") != 1:
        return None
    left, right = text.split(":")
    try:
        a = int(left) if left else 0
        b = int(right) if right else n
    except ValueError:
        return None
    ok = [(x, y) for x in range(n) for y in range(x + 1, n + 1)
          if (x, y) == (a, b) and x % block == 0 and (y % block == 0 or y == n)]
    return ok[0] if ok else None


regions = st.one_of(
    st.builds(lambda a, b: f"{a}:{b}", st.integers(-3, 40), st.integers(-3, 40)),
    st.builds(lambda a: f"{a}:", st.integers(0, 40)),
    st.builds(lambda b: f":{b}", st.integers(0, 40)),
    st.text(alphabet="0123456789:- x", max_size=6))


@settings(max_examples=300, deadline=None)
@given(text=regions, n=st.integers(1, 33), block=st.integers(1, 8))
def test_region_strings_match_brute_force(text, n, block):
    want = _oracle(text, n, block)
    if want is None:
        with pytest.raises(ActstoreError) as info:
            parse_region(text, n, block)
        assert "--images" in str(info.value) and "\n" not in str(info.value)
    else:
        assert parse_region(text, n, block) == want
