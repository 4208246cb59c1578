"""Sample grids of the toy LDM: sampler specs, per-image seeding, the grid's layout and
the quality measures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actstore.errors import ActstoreError
from actstore.toyworld.model import load_pipeline
from actstore.toyworld.samples import Sampling, generate, quality, sample_grid

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "models" / "toy-ldm"
PROMPTS = ["a red sphere , light from the left", "a blue cube , light from above",
           "a green cylinder to the left of a yellow cube , light from the right"]
SEEDS = [3, 11, 42]


def test_default_sampling_uses_the_catalog_guidance_of_toy_ldm():
    """The samples tool's default must not drift from what runs of toy-ldm use."""
    from actstore.catalog import load_catalog, resolve_guidance, resolve_model

    catalog = load_catalog(Path(__file__).resolve().parent.parent / "catalog.yaml")
    assert Sampling().guidance == resolve_guidance(None, {}, resolve_model(catalog, "toy-ldm"))
    assert str(Sampling()) == "lms:15:3"


def test_sampling_spec_parses_and_rejects_bad_text():
    assert Sampling.parse("ddpm:100:3") == Sampling("ddpm", 100, 3.0)
    assert str(Sampling.parse("lms:15:7.5")) == "lms:15:7.5"
    for bad, word in [("lms:15", "SAMPLER:STEPS:GUIDANCE"), ("heun:15:7.5", "not known"),
                      ("lms:x:7.5", "SAMPLER:STEPS:GUIDANCE"), ("lms:0:7.5", ">= 1")]:
        with pytest.raises(ActstoreError, match=word):
            Sampling.parse(bad)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(TOY)


@pytest.mark.parametrize("spec", ["lms:3:7.5", "ddpm:3:3"])
def test_an_image_does_not_depend_on_its_batch(pipe, spec):
    """Per-image generators, also for the ancestral sampler's per-step noise: the third
    image generated alone equals the third generated in a batch of three (up to float
    rounding), and differs from the other images."""
    sp = Sampling.parse(spec)
    together = generate(TOY, PROMPTS, SEEDS, sampling=sp, batch=3, pipe=pipe)
    alone = generate(TOY, PROMPTS[2:], SEEDS[2:], sampling=sp, batch=1, pipe=pipe)
    diff = np.abs(together[2].astype(int) - alone[0].astype(int))
    assert diff.max() <= 2
    assert np.abs(together[2].astype(int) - together[1].astype(int)).mean() > 5


def test_sampler_rows_really_differ(pipe):
    lms = generate(TOY, PROMPTS[:1], SEEDS[:1], sampling=Sampling("lms", 4, 3.0), pipe=pipe)
    ddpm = generate(TOY, PROMPTS[:1], SEEDS[:1], sampling=Sampling("ddpm", 4, 3.0), pipe=pipe)
    assert np.abs(lms.astype(int) - ddpm.astype(int)).mean() > 1


def test_grid_layout(pipe, tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("image_id,prompt,seed\n" + "".join(
        f"t{i},\"{p}\",{s}\n" for i, (p, s) in enumerate(zip(PROMPTS, SEEDS))))
    out = tmp_path / "g.png"
    specs = [Sampling("lms", 2, 7.5), Sampling("ddpm", 2, 3.0)]
    sample_grid(TOY, csv, out, n=3, samplings=specs, rows=1, pipe=pipe)
    w, h = Image.open(out).size
    cell = 64 * 3 + 2  # scale 3, pad 2
    assert (w, h) == (3 * cell + 2, 3 * cell + 2)  # render row + one row per sampling
    assert '"ddpm:2:3"' in out.with_suffix(".json").read_text()


def test_quality_counts_against_hand_made_labels():
    """Half the images have an object of 10 pixels and depth growing down the rows, the
    other half 3 pixels and depth growing upwards: both fractions are exactly one half."""
    n, h, w = 4, 16, 16
    rows = np.broadcast_to(np.arange(h, dtype=float)[:, None], (h, w))
    depth = np.stack([rows if i % 2 == 0 else -rows for i in range(n)])
    sal = np.zeros((n, h, w), bool)
    for i in range(n):
        sal[i].flat[: 10 if i % 2 == 0 else 3] = True
    q = quality(np.zeros((n, h, w, 3), np.uint8), lambda imgs: {"depth": depth, "salient": sal})
    assert q == {"n": 4, "frac_salient": 0.5, "frac_depth_row_spearman_ge_0.5": 0.5,
                 "median_depth_row_spearman": 0.0}
