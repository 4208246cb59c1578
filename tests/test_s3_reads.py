"""What a notebook's reads cost on S3, counted by a real server (moto's, in its own process,
logging every request it answers: ``counted_s3.py``): opening a view costs the same number
of requests whatever the number of image blocks, and a selection fetches only the inner
chunks that hold it, not whole shards (benchmarks/bench_open.py measures both at SD scale)."""

from __future__ import annotations

import sys

import fsspec
import numpy as np
import pytest
import zarr

from actstore.generation.materialize import MaterializeSettings, materialize
from actstore.probe.runs import latest_run, list_runs, load_probe, open_emergence
from actstore.generation.sampling import GenerationConfig
from actstore.store import io, locations
from actstore.store.core import completed_blocks, layer_path
from actstore.store.view import open_store
from conftest import DEMO, REPO
from counted_s3 import CountedS3

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_open import BIG, MID, SD_ATTN1, build_sd_store  # noqa: E402

BUCKET = "reads"
STEPS = 3


@pytest.fixture(scope="module")
def counted():
    """A counted S3 server with one bucket; its options given to every store under it."""
    pytest.importorskip("s3fs")
    server = CountedS3()
    env = server.env()
    options = {"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"],
               "client_kwargs": {"endpoint_url": server.endpoint}}
    fsspec.filesystem("s3", skip_instance_cache=True, **options).mkdir(BUCKET)
    io.set_storage_options(f"s3://{BUCKET}/", options)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sd_store(counted) -> str:
    """Two of SD v1.4's layers (64×64×320: inner chunks of 2 images × 1 step in shards of 4
    images × every step; 32×32×640: 4 images × 1 step), 12 images in 3 blocks."""
    uri = f"s3://{BUCKET}/sd.zarr"
    build_sd_store(uri, 12, steps=STEPS, variants=("trained",),
                   layers={name: SD_ATTN1[name] for name in (BIG, MID)})
    return uri


def _notebook_opening(uri: str):
    """What the notebook's first cells do: open, print, list layers, image table, a layer."""
    s = open_store(uri)
    repr(s)
    s.images.to_dataframe()
    return s[s.layers[0]]


def test_emergence_and_a_probe_read_each_run_marker_once(counted, explore_store):
    """The notebook's emergence table and probe: before, the runs were listed again for each
    target's latest run and for its scores (every run's marker read 1 + 2 × targets times,
    one after another), and loading one probe read every run's marker."""
    uri = f"s3://{BUCKET}/explore.zarr"
    fsspec.filesystem("s3", **locations._options_for(uri)).put(explore_store, f"{BUCKET}/explore.zarr",
                                                       recursive=True)
    runs = list_runs(uri)
    assert len(runs) == 2
    markers = {f"{BUCKET}/explore.zarr/probes/{r}/zarr.json" for r in runs}
    with counted.counting() as reqs:
        em = open_emergence(uri)
    assert set(em.target.values) == {"salient", "depth"}
    read = [k for k in reqs.keys() if k in markers]
    assert sorted(read) == sorted(markers), read
    run = latest_run(uri, "depth")
    with counted.counting() as reqs:
        probe = load_probe(uri, run, "up_blocks.3.attentions.0")
    assert probe["target"] == "depth"
    assert [k for k in reqs.keys() if k in markers] == [
        f"{BUCKET}/explore.zarr/probes/{run}/zarr.json"]
    # the root beside the marker (its schema checked): one small GET more, same round
    assert reqs.keys().count(f"{BUCKET}/explore.zarr/zarr.json") == 1, reqs.summary()


def test_opening_a_view_costs_the_same_requests_for_4_or_16_blocks(counted):
    """Before, each block's record was asked for on its own, twice per view (its images,
    then its capture kinds): 16 blocks cost 24 requests more than 4. And each document
    was fetched with a HEAD before its GET (s3fs's concurrent whole-object read)."""
    counts = {}
    for block in (4, 1):
        uri = f"s3://{BUCKET}/tiny-b{block}.zarr"
        materialize("tiny-random", DEMO, uri, MaterializeSettings(
            gen=GenerationConfig(steps=2), batch_size=4, block_size=block), progress=False)
        assert len(completed_blocks(uri, "trained")) == 16 // block
        locations._LOCATIONS.clear()   # a new process's first open: its bucket check included
        with counted.counting() as reqs:
            layer = _notebook_opening(uri)
        assert layer.sizes["image"] == 16
        records = [k for k in reqs.keys() if "/_blocks/" in k and k.endswith("zarr.json")]
        assert not records, f"block records asked for one by one: {records}"
        sized = set(reqs.keys("HEAD")) & set(reqs.keys("GET"))
        assert not sized, f"objects asked for their size before being read: {sized}"
        counts[block] = reqs
    assert len(counts[1]) == len(counts[4]), (counts[4].summary(), counts[1].summary())


def _chunk_reads(reqs, array: str) -> list[tuple]:
    return [line for line in reqs.lines if line[1].startswith(f"{array}/c.")]


def test_one_image_one_step_fetches_its_chunk_not_the_shard(sd_store, counted):
    s = open_store(sd_store)
    arr = zarr.open_array(store=io.location(sd_store).store, path=layer_path("trained", BIG))
    key = f"{BUCKET}/sd.zarr/{layer_path('trained', BIG)}"
    shard = fsspec.filesystem("s3", **locations._options_for(sd_store)).size(f"{key}/c.0.0.0.0.0")
    view = s[BIG]
    with counted.counting() as reqs:
        got = view.sel(image="img0001", step=1).values   # block 0: random values, 31 MB
    np.testing.assert_array_equal(got, arr[1, 1])
    reads = _chunk_reads(reqs, key)
    assert {line[1] for line in reads} == {f"{key}/c.0.0.0.0.0"}   # the image's shard only
    assert all(line[3] == 206 for line in reads), reads            # ranges: index and chunk
    # one inner chunk (2 images × 1 step of the 4 × 3 in the shard) and the shard's index
    assert sum(line[4] for line in reads) < shard / 4, (reqs.sent, shard)


def test_one_step_of_every_image_fetches_that_step_only(sd_store, counted):
    s = open_store(sd_store)
    arr = zarr.open_array(store=io.location(sd_store).store, path=layer_path("trained", MID))
    key = f"{BUCKET}/sd.zarr/{layer_path('trained', MID)}"
    view = s[MID]
    with counted.counting() as reqs:
        got = view.sel(step=2).astype("float32").mean(["y", "x", "channel"]).values
    np.testing.assert_allclose(got, arr[:, 2].astype(np.float32).mean(axis=(1, 2, 3)),
                               rtol=1e-5)
    reads = _chunk_reads(reqs, key)
    # per shard (4 images × 3 steps, chunks of 4 images × 1 step): its index and one chunk
    assert sorted(line[1] for line in reads) == sorted(
        f"{key}/c.{b}.0.0.0.0" for b in range(3) for _ in range(2)), reads
    assert all(line[3] == 206 for line in reads), reads


def test_a_view_with_an_unrecorded_block_reads_only_recorded_chunks(sd_store, counted):
    """Images of a block without its record stay out, and the selection still reaches only
    the chunks it needs (the view restricts before dask chunks the array)."""
    record = io.key("models/trained/_blocks/00000004-00000008")
    saved = io.get_bytes(sd_store, record)
    io.delete(sd_store, record)
    try:
        s = open_store(sd_store)
        assert list(s.images.position.values) == [0, 1, 2, 3, 8, 9, 10, 11]
        arr = zarr.open_array(store=io.location(sd_store).store, path=layer_path("trained", BIG))
        key = f"{BUCKET}/sd.zarr/{layer_path('trained', BIG)}"
        view = s[BIG]
        assert view.chunks[0] == (4, 4)   # one dask chunk per recorded shard
        with counted.counting() as reqs:
            got = view.sel(image="img0009", step=2).values
        np.testing.assert_array_equal(got, arr[9, 2])
        reads = _chunk_reads(reqs, key)
        assert {line[1] for line in reads} == {f"{key}/c.2.0.0.0.0"}
        assert all(line[3] == 206 for line in reads), reads
        whole = view.isel(step=0).astype("float32").sum(["y", "x", "channel"]).values
        rows = np.r_[0:4, 8:12]
        np.testing.assert_allclose(whole, arr[rows, 0].astype(np.float32).sum(axis=(1, 2, 3)),
                                   rtol=1e-5)
    finally:
        io.put_bytes(sd_store, record, saved)
