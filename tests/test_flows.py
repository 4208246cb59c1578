"""The Prefect flows run end to end against a temporary Prefect API."""

from __future__ import annotations

import numpy as np

from actstore.access import open_store
from conftest import DEMO


def test_materialize_flow_writes_store_and_grid(prefect_harness, tmp_path):
    from flows.materialize import materialize_flow

    uri, png = str(tmp_path / "flow.zarr"), str(tmp_path / "grid.png")
    summary = materialize_flow(model="tiny-random", prompts=DEMO, store=uri, images="0:4",
                               steps=2, device="cpu", grid_png=png)
    assert summary["images"] == 4 and summary["blocks_written"] == 1
    view = open_store(uri)
    assert len(view.image_index) == 4
    assert np.isfinite(view["down_blocks.1.attentions.0"].values.astype(np.float32)).all()
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    again = materialize_flow(model="tiny-random", prompts=DEMO, store=uri, images="0:4",
                             steps=2, device="cpu")
    assert again["blocks_written"] == 0 and again["blocks_skipped"] == 1
