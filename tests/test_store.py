"""The store core: contents checked against diffusers' own pipeline, layout, reader."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from actstore.store.view import open_store
from actstore.generation.capture import self_attention_layers
from actstore.store.core import completed_blocks
from conftest import DEMO, TINY

SD_LAYERS = ([f"down_blocks.{b}.attentions.{j}" for b in range(3) for j in range(2)]
             + ["mid_block.attentions.0"]
             + [f"up_blocks.{b}.attentions.{j}" for b in (1, 2, 3) for j in range(3)])


def test_tiny_random_has_sd_topology(tiny_model):
    assert self_attention_layers(tiny_model.unet) == SD_LAYERS


def test_store_matches_diffusers_pipeline(tiny_model, tiny_store):
    """Independent oracle: diffusers' StableDiffusionPipeline with a hook of our own."""
    import pandas as pd

    from actstore.generation.models import diffusers_pipeline

    rows = pd.read_csv(DEMO).iloc[4:6]
    pipe = diffusers_pipeline(tiny_model)
    layer = "up_blocks.2.attentions.1"
    seen = []
    module = tiny_model.unet.get_submodule(layer + ".transformer_blocks.0.attn1")
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out[2:].clone()))
    try:
        out = pipe(rows["prompt"].tolist(), num_inference_steps=TINY["steps"],
                   guidance_scale=7.5, output_type="np",
                   generator=[torch.Generator().manual_seed(int(s)) for s in rows["seed"]])
    finally:
        handle.remove()
    view = open_store(tiny_store)
    stored = view[layer].sel(image=rows["image_id"].tolist()).values.astype(np.float32)
    expected = torch.stack(seen, dim=1).numpy()  # (image, step, tokens, C)
    expected = expected.reshape(stored.shape)
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3)
    final = view.final_images.sel(image=rows["image_id"].tolist()).values
    assert np.abs(final.astype(int) - (out.images * 255).round().astype(int)).max() <= 1


def test_layout_coordinates_and_provenance(tiny_store):
    view = open_store(tiny_store)
    assert view.layers == SD_LAYERS
    da = view["up_blocks.3.attentions.0"]
    assert da.dims == ("image", "step", "y", "x", "channel")
    assert da.dtype == np.float32     # stored float16, widened as read (exact)
    assert da.shape == (16, TINY["steps"], 8, 8, 32)
    # dask chunks are whole shards: one block of images × all steps
    assert da.data.chunks[0] == (4, 4, 4, 4) and da.data.chunks[1] == (TINY["steps"],)
    assert list(da.image.values[:2]) == ["demo-000", "demo-001"]
    assert set(np.unique(da.split.values)) == {"train", "test"}
    assert da.sigma.values[0] > da.sigma.values[-1] > 0
    assert da.attrs["block"] == "up_blocks.3" and da.attrs["channels"] == 32
    prov = view.attrs
    for key in ("weights_sha256", "scheduler_config", "generation", "dtype", "capture"):
        assert key in prov["fingerprint"]
    assert prov["fingerprint"]["scheduler_config"]["beta_schedule"] == "scaled_linear"
    assert {"torch", "diffusers", "zarr"} <= set(prov["library_versions"])
    assert view.x0_images.shape == (16, TINY["steps"], 64, 64, 3)
    # notebook one-liner from the README
    sel = view["up_blocks.3.attentions.0"].sel(step=2, image=["demo-001", "demo-005"])
    assert sel.shape == (2, 8, 8, 32)


def test_notebook_reductions_of_float16_activations_are_right(tiny_store):
    """dask reduces an array in its own dtype, so over a stored float16 layer a count past
    float16's 65504 became inf: ``mean()`` of 16 images x 4 steps of an 8x8x32 layer read
    0.0 or NaN, ``sum()`` inf, ``std()`` NaN, silently (2026-12-06). The view reads them as
    float32 (exact), and reductions agree with numpy's in float64."""
    import warnings

    da = open_store(tiny_store)["up_blocks.3.attentions.0"]
    assert da.size > 65504
    want = da.values.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)      # no overflow on the way
        got = {"mean": float(da.mean()), "sum": float(da.sum()), "std": float(da.std()),
               "mean_xy": da.sel(step=2).mean(["y", "x"]).values}
    np.testing.assert_allclose(got["mean"], want.mean(), rtol=1e-4)
    np.testing.assert_allclose(got["sum"], want.sum(), rtol=1e-4)
    np.testing.assert_allclose(got["std"], want.std(), rtol=1e-4)
    np.testing.assert_allclose(got["mean_xy"], want[:, 2].mean(axis=(1, 2)), rtol=1e-4,
                               atol=1e-6)
    stored = zarr.open_array(tiny_store, path="models/trained/layers/"
                             "up_blocks.3.attentions.0/activation", mode="r")
    assert stored.dtype == np.float16                     # the store keeps its bytes
    np.testing.assert_array_equal(da.isel(image=0).values, stored[0])


def test_storage_layout_and_codec(tiny_store):
    from actstore.store.core import block_layout

    # SD v1.4 at 512 px: 2 images × 1 step per inner chunk (5.2 MB), shard = block × steps
    assert block_layout((617, 15, 64, 64, 320), 4, 2, lead=2) == (
        (2, 1, 64, 64, 320), (4, 15, 64, 64, 320))
    assert block_layout((617, 15, 16, 16, 1280), 4, 2, lead=2) == (
        (4, 3, 16, 16, 1280), (4, 15, 16, 16, 1280))
    # a layer whose whole block is one chunk (8×8×1280: 9.8 MB) is not sharded
    assert block_layout((617, 15, 8, 8, 1280), 4, 2, lead=2) == (
        (4, 15, 8, 8, 1280), None)
    # tiny layers: one chunk per block, no sharding needed
    arr = zarr.open_array(tiny_store, path="models/trained/layers/mid_block.attentions.0/activation")
    assert arr.chunks == (4, TINY["steps"], 1, 1, 64) and arr.shards is None
    blosc = [c for c in arr.metadata.to_dict()["codecs"] if c["name"] == "blosc"][0]
    assert blosc["configuration"]["cname"] == "zstd"
    assert blosc["configuration"]["shuffle"] == "shuffle"
    assert blosc["configuration"]["blocksize"] == 1 << 20
    # flat chunk keys: every chunk of the array is a file directly in its directory
    # (nested keys cost a mkdir per key level per block on write)
    node = Path(tiny_store) / "models/trained/layers/mid_block.attentions.0/activation"
    entries = sorted(p.name for p in node.iterdir())
    assert "zarr.json" in entries and not any((node / e).is_dir() for e in entries), entries
    assert {e for e in entries if e != "zarr.json"} == {f"c.{b}.0.0.0.0" for b in range(
        -(-arr.shape[0] // 4))}, entries


def test_x0_converges_to_final_image(tiny_store):
    view = open_store(tiny_store)
    x0_last = view.x0_images.isel(step=-1).values.astype(int)
    x0_first = view.x0_images.isel(step=0).values.astype(int)
    final = view.final_images.values.astype(int)
    assert np.abs(x0_last - final).mean() < np.abs(x0_first - final).mean()


def test_image_independent_of_batch(tmp_path, tiny_model, tiny_store):
    """An image's initial noise is its own: batch 1 vs 4 gives the same activations."""
    from actstore.generation.sampling import GenerationConfig
    from actstore.generation.materialize import MaterializeSettings, materialize

    uri = str(tmp_path / "b1.zarr")
    materialize(tiny_model, DEMO, uri,
                MaterializeSettings(gen=GenerationConfig(steps=TINY["steps"]), batch_size=1,
                                    block_size=4),
                images="0:4", progress=False)
    a = open_store(uri)["down_blocks.0.attentions.0"].values.astype(np.float32)
    b = open_store(tiny_store)["down_blocks.0.attentions.0"].isel(image=slice(0, 4))
    np.testing.assert_allclose(a, b.values.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_incomplete_blocks_are_invisible(tmp_path, tiny_model):
    from actstore.generation.sampling import GenerationConfig
    from actstore.generation.materialize import MaterializeSettings, materialize

    uri = str(tmp_path / "part.zarr")
    materialize(tiny_model, DEMO, uri,
                MaterializeSettings(gen=GenerationConfig(steps=2), block_size=4), images="4:8",
                progress=False)
    view = open_store(uri)
    assert list(view.images.position.values) == [4, 5, 6, 7]
    assert view["mid_block.attentions.0"].shape[0] == 4
    assert open_store(uri, complete_only=False)["mid_block.attentions.0"].shape[0] == 16


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_non_finite_activation_names_image_step_layer(tmp_path, tiny_model):
    from actstore.generation.capture import attn1_module
    from actstore.errors import ActstoreError
    from actstore.generation.sampling import GenerationConfig
    from actstore.generation.materialize import MaterializeSettings, materialize

    module = attn1_module(tiny_model.unet, "up_blocks.1.attentions.2")
    calls = []

    def poison(_m, _a, out):
        if out.shape[0] == 4:  # CFG calls of a 2-image batch (not the layout dry run)
            calls.append(1)
        if len(calls) == 2 and out.shape[0] == 4:  # second denoising call = step 1
            out = out.clone()
            out[3] = float("nan")  # CFG batch [u0, u1, c0, c1]: conditional image 1
            return out
        return None

    handle = module.register_forward_hook(poison)
    uri = str(tmp_path / "nan.zarr")
    try:
        with pytest.raises(ActstoreError, match=r"image 'demo-001', step 1, layer "
                                                r"up_blocks\.1\.attentions\.2"):
            materialize(tiny_model, DEMO, uri,
                        MaterializeSettings(gen=GenerationConfig(steps=2), batch_size=2,
                                            block_size=4),
                        images="0:4", progress=False)
    finally:
        handle.remove()
    assert completed_blocks(uri, "trained") == set()  # the poisoned block never became visible


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_float16_overflow_is_caught(tmp_path, tiny_model):
    """A finite float32 activation beyond float16's range would be stored as inf."""
    from actstore.generation.capture import attn1_module
    from actstore.errors import ActstoreError
    from actstore.generation.sampling import GenerationConfig
    from actstore.generation.materialize import MaterializeSettings, materialize

    def blow_up(_m, _a, out):
        return out * 1e6 if out.shape[0] == 4 else None

    handle = attn1_module(tiny_model.unet, "mid_block.attentions.0").register_forward_hook(blow_up)
    try:
        with pytest.raises(ActstoreError, match=r"image 'demo-000', step 0, layer "
                                                r"mid_block\.attentions\.0.*store dtype"):
            materialize(tiny_model, DEMO, str(tmp_path / "inf.zarr"),
                        MaterializeSettings(gen=GenerationConfig(steps=2), batch_size=2,
                                            block_size=4),
                        images="0:4", progress=False)
    finally:
        handle.remove()


def test_fsspec_url_store(tiny_model):
    """Any fsspec URL works as a store: here the in-memory filesystem."""
    from actstore.generation.sampling import GenerationConfig
    from actstore.generation.materialize import MaterializeSettings, materialize

    uri = "memory://actstore-test/s.zarr"
    first = materialize(tiny_model, DEMO, uri,
                        MaterializeSettings(gen=GenerationConfig(steps=2), block_size=4),
                        images="4:8", progress=False)
    again = materialize(tiny_model, DEMO, uri,
                        MaterializeSettings(gen=GenerationConfig(steps=2), block_size=4),
                        images="4:8", progress=False)
    assert (first["blocks_written"], again["blocks_written"]) == (1, 0)
    view = open_store(uri)
    assert list(view.images.position.values) == [4, 5, 6, 7]
    assert np.isfinite(view["mid_block.attentions.0"].values.astype(np.float32)).all()


def test_x0_images_match_direct_decoding(tmp_path, tiny_model):
    """x0 is decoded in the writer thread, in batches across steps: it must equal decoding
    each step's x0 prediction right where the denoising loop produces it."""
    from actstore.generation.sampling import GenerationConfig, decode_images, generate
    from actstore.generation.materialize import MaterializeSettings, materialize
    from actstore.generation.prompts import load_prompts

    gen = GenerationConfig(steps=3)
    uri = str(tmp_path / "x0.zarr")
    materialize(tiny_model, DEMO, uri,
                MaterializeSettings(gen=gen, batch_size=3, block_size=4), images="0:4",
                progress=False)
    stored = open_store(uri).x0_images.values          # (image, step, y, x, rgb)
    rows = load_prompts(DEMO).iloc[:4]
    direct = np.empty_like(stored)

    def on_end(i, _latents, x0):
        direct[:, i] = decode_images(tiny_model, x0)

    generate(tiny_model, rows["prompt"].tolist(), rows["seed"].tolist(), gen,
             on_step_end=on_end)
    assert stored.shape[:2] == (4, 3)
    assert np.abs(stored.astype(int) - direct.astype(int)).max() <= 1   # float rounding only


def test_listing_keys_survives_folders_removed_while_it_walks(tmp_path):
    """A local listing of block records while other records' folders come and go (a kind's
    records undone, a version collected) still finds every record that stays: zarr's
    local listing raised when a folder vanished mid-walk, and every key looked absent."""
    import threading

    from actstore.store import io

    blocks = tmp_path / "s.zarr" / "g" / "_blocks"
    kept = [f"{i:03d}-{i + 1:03d}/zarr.json" for i in range(60)]
    for name in kept:
        (blocks / name).parent.mkdir(parents=True)
        (blocks / name).write_text("{}")
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            folder = blocks / f"zz-{n % 40}" / "deep"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "zarr.json").write_text("{}")
            shutil.rmtree(folder.parent)
            n += 1
    thread = threading.Thread(target=churn)
    thread.start()
    try:
        missing = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            keys = set(io.list_keys(str(tmp_path / "s.zarr"), "g/_blocks"))
            missing.append(len(set(kept) - keys))
    finally:
        stop.set()
        thread.join()
    assert max(missing) == 0, f"{sum(m > 0 for m in missing)} of {len(missing)} listings " \
                              "lost committed records"
