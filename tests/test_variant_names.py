"""A model variant a notebook names is one the store has, by the rule `--models` follows:
`open_store(u, model=...)` never turns another name into a path of the store."""

from __future__ import annotations

import shutil

import pytest

import actstore
from actstore.errors import ActstoreError
from conftest import DEMO, TINY, tree_digest


@pytest.fixture(scope="module")
def two_variants(tmp_path_factory, tiny_store) -> str:
    """The reference store with the randomized control's first block."""
    from actstore.generation.materialize import MaterializeSettings, materialize
    from actstore.generation.models import load_model
    from actstore.generation.sampling import GenerationConfig

    uri = str(tmp_path_factory.mktemp("variants") / "store.zarr")
    shutil.copytree(tiny_store, uri)
    model = load_model("tiny-random", device="cpu")     # the control permutes it in place
    materialize(model, DEMO, uri,
                MaterializeSettings(gen=GenerationConfig(steps=TINY["steps"]),
                                    batch_size=TINY["batch_size"],
                                    block_size=TINY["block_size"], control="randomized"),
                images=f"0:{TINY['block_size']}", progress=False)
    return uri


@pytest.mark.parametrize("name", ["", "../labels", "../images", "trained/../randomized", "trained/",
                                  "models/trained", "Trained"])
def test_a_name_that_is_no_variant_is_refused_naming_the_variants(two_variants, name):
    """`model=""` and `"../labels"` were said to be 'being created, or its creation was
    interrupted; rerun ... materialize', and `"trained/../randomized"` opened the control
    under that name."""
    before = tree_digest(two_variants)
    with pytest.raises(ActstoreError) as exc:
        actstore.open_store(two_variants, model=name)
    assert str(exc.value) == (f"store {two_variants}: has no model {name!r} (has: randomized, "
                              "trained); materialize it first")
    assert tree_digest(two_variants) == before


def test_the_variants_open_under_their_names(two_variants):
    assert actstore.open_store(two_variants, model="randomized").attrs["fingerprint"][
        "variant"] == "randomized"
    assert actstore.open_store(two_variants).attrs["fingerprint"]["variant"] == "trained"


def test_a_variant_without_its_marker_is_still_being_created(two_variants, tmp_path):
    """The marker-less entry of models/ keeps its own line: a writer may be at work."""
    import json
    from pathlib import Path

    uri = str(tmp_path / "store.zarr")
    shutil.copytree(two_variants, uri)
    meta = Path(uri, "models", "randomized", "zarr.json")
    doc = json.loads(meta.read_text())
    del doc["attributes"]["actstore_model"]
    meta.write_text(json.dumps(doc))
    with pytest.raises(ActstoreError, match=r"model 'randomized' is being created, or its "
                                            "creation was interrupted"):
        actstore.open_store(uri, model="randomized")
    with pytest.raises(ActstoreError, match=r"has no model '' \(has: trained\)"):
        actstore.open_store(uri, model="")
