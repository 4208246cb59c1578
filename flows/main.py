"""The main job: everything actstore does, end to end, on one model and prompt set.

materialize (trained) → sample grid. Later stages (randomized control, labels, probes,
emergence, interventions) are added here as they land; each is a task calling a library
function, and only store URIs and small summaries pass between them.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.materialize import materialize_region, sample_grid_task


@flow(name="main-job")
def main_flow(model: str, prompts: str, out: str = "runs/main", images: str | None = None,
              steps: int = 15, guidance: float = 7.5, batch_size: int = 8,
              device: str = "auto") -> dict:
    """Materialize ``model`` on ``prompts`` into ``<out>/store.zarr`` and draw its figures."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = str(out_dir / "store.zarr")
    gen = {"steps": steps, "guidance": guidance, "height": None, "width": None}
    cap = {"codec": "zstd", "store_dtype": "float16", "keep_uncond": False, "x0": True}
    trained = materialize_region(model, prompts, store, images, batch_size, gen, cap,
                                 "float32", device, None, 8)
    grid = sample_grid_task(store, "trained", str(out_dir / "samples.png"))
    return {"store": store, "trained": trained, "figures": [grid]}
