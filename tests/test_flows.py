"""The Prefect flows run end to end against a temporary Prefect API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from actstore.generation.materialize import MaterializeSettings
from actstore.generation.sampling import GenerationConfig
from actstore.store.view import open_store
from conftest import DEMO


def test_materialize_flow_writes_store_and_grid(prefect_harness, tmp_path):
    from flows.materialize import materialize_flow

    uri, png = str(tmp_path / "flow.zarr"), str(tmp_path / "grid.png")
    settings = MaterializeSettings(gen=GenerationConfig(steps=2), device="cpu")
    summary = materialize_flow(model="tiny-random", prompts=DEMO, store=uri, images="0:4",
                               settings=settings, grid_png=png)
    assert summary["images"] == 4 and summary["blocks_written"] == 1
    view = open_store(uri)
    assert len(view.image_index) == 4
    assert np.isfinite(view["down_blocks.1.attentions.0"].values.astype(np.float32)).all()
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert summary["complete"] == {"trained": {"complete": 4, "images": 16}}
    assert summary["status"].startswith(f"store {uri}: INCOMPLETE (trained 4/16 images")
    again = materialize_flow(model="tiny-random", prompts=DEMO, store=uri, images="0:4",
                             settings=settings)
    assert again["blocks_written"] == 0 and again["blocks_skipped"] == 1


def test_main_job_end_to_end(prefect_harness, tmp_path):
    """materialize (trained + randomized) → labels → probes → summary → sweep, as the
    README's job; the stored causal test says what was chosen, on which images, and keeps
    both controls."""
    from actstore.intervene.results import group_path, open_intervention
    from actstore.intervene.settings import InterventionSettings, SweepSettings
    from actstore.intervene.sweep import list_sweeps
    from flows.main import MAIN_MATERIALIZE, main_flow

    out = tmp_path / "main"
    settings = MAIN_MATERIALIZE.with_options(steps=2, device="auto")   # as --device auto
    # tiny-random's probe weights are tiny, so a projection edit (gap / |w|) blows its UNet
    # up; a few Adam steps are bounded
    sweep = SweepSettings(kinds=("attn1",), step_counts=(1,), strengths=(1.0, 2.0),
                          validation=2, evaluation=4, max_edit_size=1e9,
                          base=InterventionSettings(n_targets=2, batch_size=8,
                                                    method="gradient", iterations=4))
    result = main_flow(model="tiny-random", prompts=DEMO, out=str(out), settings=settings,
                       workers=2, targets=("salient",), sweeps={"salient": sweep})
    assert {"trained", "randomized"} <= set(result)
    rows = result["summary"]          # one row per capture kind of the main job
    assert [r["kind"] for r in rows] == ["attn1", "block", "vae"]
    for row in rows:
        assert row["target"] == "salient" and row["metric"] == "dice_label"
        assert 0 <= row["trained"] <= 1 and 0 <= row["randomized"] <= 1
    for name in ("samples-trained.png", "samples-randomized.png", "salient-curves.png",
                 "salient-heatmap.png", "salient-figure4.png", "summary.txt",
                 "intervention-salient.png", "capture-kinds.png", "salient-kinds.png",
                 "dose-response.png"):
        assert (out / name).stat().st_size > 0, name
    store = str(out / "store.zarr")
    (rec,) = list_sweeps(store).values()
    chosen = rec["chosen"]
    assert rec["settings"]["base"]["device"] == "auto"    # the sweeps ran where the store was made
    assert chosen["kind"] == "attn1" and chosen["steps"] == [0]
    assert chosen["strength"] in (1.0, 2.0) and chosen["layers"]
    val, ev = rec["validation_images"], rec["evaluation_images"]
    assert len(val) == 2 and len(ev) == 4 and not set(val) & set(ev)
    ds = open_intervention(store, rec["evaluation"])
    assert sorted(ds["image"].values) == sorted(ev)
    assert ds.attrs["settings"]["provenance"]["validation_images"] == val
    assert list(ds["arm"].values) == ["probe", "random"] and ds.sizes["k"] == 2
    r = rec["result"]
    assert r["interventions"] == 4 * 2 and r["strength"] == chosen["strength"]
    assert result["interventions"]["salient"]["sweep_id"] == rec["sweep_id"]
    grp = zarr.open_group(store, path=group_path(rec["evaluation"]), mode="r")
    assert np.isfinite(grp["edit_stats"][...]).all() and r["non_finite"] == 0
    assert np.isfinite(grp["score_post"][...]).all()
    table = result["table"].split("causal test")[-1]
    assert "validation" in table and "salient" in table
    page = (out / "report.html").read_text(encoding="utf-8")   # every figure on one page
    assert result["report"] == str(out / "report.html")
    assert all(f'alt="{Path(f).name}"' in page for f in result["figures"])
    assert len(result["trained"]["regions_by_worker"]) == 2  # fanned out over both processes
    again = main_flow(model="tiny-random", prompts=DEMO, out=str(out), settings=settings,
                      workers=1, targets=("salient",), sweeps={"salient": sweep})
    assert again["trained"]["blocks_written"] == 0  # resumed: nothing recomputed
    assert again["interventions"]["salient"]["sweep_id"] == rec["sweep_id"]
