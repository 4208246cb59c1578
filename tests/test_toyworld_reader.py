"""The prompt reader: prompt parsing against the scene specs, agreement arithmetic against
hand-made answers, and the committed reader's accuracy on fixed held-out renders
(tolerances are loose bounds under models/toy-reader/metrics.json)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from actstore.errors import ActstoreError
from actstore.toyworld.reader import (EVAL_SEED_OFFSET, OBJECTS, ToyReader, agreement,
                                      attributes)
from actstore.toyworld.render import render_batch, sample_spec
from actstore.toyworld.samples import quality
from actstore.toyworld.vocab import LIGHTS

READER = Path(__file__).resolve().parents[1] / "models" / "toy-reader"
MIN_LIGHT = 0.85
MIN_OBJECT_SET = 0.7


def test_prompt_answers_match_the_scene_specs():
    """The oracle is the scene spec the prompt was written from."""
    specs = [sample_spec(s) for s in range(300)]
    got = attributes([s.prompt for s in specs])
    for i, spec in enumerate(specs):
        assert LIGHTS[got["light"][i]] == spec.light
        assert got["count"][i] + 1 == len(spec.objects)
        named = {OBJECTS[j] for j in np.flatnonzero(got["objects"][i])}
        assert named == {(o.colour, o.shape) for o in spec.objects}


@pytest.mark.parametrize("prompt", ["a purple cube , light from above",
                                    "a red cube , light from below", "a red cube", ""])
def test_prompts_outside_the_world_are_refused(prompt):
    with pytest.raises(ActstoreError, match="reader knows"):
        attributes([prompt])


def test_agreement_against_hand_counted_answers():
    truth = attributes(["a red sphere , light from the left",
                        "a red sphere in front of a blue cube , light from the right"])
    pred = {k: v.copy() for k, v in truth.items()}
    pred["light"][1] = 0                          # image 2: wrong light
    pred["objects"][1, OBJECTS.index(("blue", "cube"))] = 0
    pred["objects"][1, OBJECTS.index(("blue", "sphere"))] = 1   # right colour, wrong shape
    a = agreement(pred, truth)
    assert a == pytest.approx({"n": 2, "light": 0.5, "count": 1.0, "object_set": 0.5,
                               "all": 0.5, "named_objects_found": 2 / 3,
                               "named_colours_found": 1.0})


@pytest.fixture(scope="module")
def reader():
    return ToyReader.from_pretrained(READER)


def test_committed_reader_reads_held_out_renders(reader):
    data = render_batch(range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + 64))
    a = agreement(reader(data["rgb"]), attributes(data["prompt"]))
    assert a["light"] >= MIN_LIGHT and a["object_set"] >= MIN_OBJECT_SET


def test_quality_reports_prompt_agreement(reader):
    data = render_batch(range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + 8))
    rows = np.broadcast_to(np.arange(64.0)[:, None], (8, 64, 64))
    q = quality(data["rgb"], lambda imgs: {"depth": rows, "salient": np.ones((8, 64, 64))},
                reader=reader, prompts=data["prompt"])
    assert q["prompt_agreement"] == agreement(reader(data["rgb"]), attributes(data["prompt"]))


def test_a_reader_trained_for_other_questions_is_refused(tmp_path):
    """Heads are indexed by the code's OBJECTS / LIGHTS / COUNTS; a folder saved with other
    lists would be read silently wrong, so loading it fails instead."""
    import json
    import shutil

    folder = tmp_path / "reader"
    shutil.copytree(READER, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["lights"] = list(reversed(cfg["lights"]))
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ActstoreError, match="other questions"):
        ToyReader.from_pretrained(folder)
