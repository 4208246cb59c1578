"""Every command on s3:// (a real S3 API: moto's server on loopback, started by the test
session), with the local disk's guarantees: same bytes, kill -9 then rerun identical,
fresh listings for long-lived readers, credentials never stored, bad locations refused
in one line with nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import fsspec
import numpy as np
import pytest

from actstore.errors import ActstoreError
from actstore.generation.materialize import MaterializeSettings, materialize
from actstore.generation.sampling import GenerationConfig
from actstore.intervene.results import open_intervention
from actstore.intervene.run import run_interventions
from actstore.intervene.settings import InterventionSettings
from actstore.label.labels import list_targets, open_labels, write_labels
from actstore.probe.runs import load_probe, open_emergence, open_scores, run_probes
from actstore.store.core import completed_blocks
from actstore.store.view import open_store
from conftest import DEMO, REPO, S3_KEY_ID, S3_SECRET, TINY
from storecheck import assert_same_store
from conftest import PixelLabels

pytestmark = pytest.mark.usefixtures("s3_server")
STEPS = 2
LAYERS = ["up_blocks.3.attentions.0", "up_blocks.2.attentions.0"]


def _pipeline(uri: str, model) -> dict:
    """materialize → label (two targets in one set) → probe → intervene, as a user would."""
    materialize(model, DEMO, uri,
                MaterializeSettings(gen=GenerationConfig(steps=STEPS), batch_size=4,
                                    block_size=4),
                progress=False)
    write_labels(uri, PixelLabels(), ["salient", "depth"], on_x0=False, progress=False)
    run = run_probes(uri, "salient", layers=LAYERS, steps=[0, 1], scheduler="threads",
                     progress=False)
    exp = run_interventions(uri, run, InterventionSettings(
        layers=LAYERS, steps=[0], images="12:16", n_targets=1, provider=PixelLabels()),
        model=model, progress=False)
    return {"run": run, "experiment": exp["experiment_id"]}


@pytest.fixture(scope="module")
def local_pipeline(tmp_path_factory, tiny_model):
    uri = str(tmp_path_factory.mktemp("s3ref") / "ref.zarr")
    return uri, _pipeline(uri, tiny_model)


def test_pipeline_on_s3_equals_local(bucket, tiny_model, local_pipeline):
    ref, ref_ids = local_pipeline
    uri = f"s3://{bucket}/pipe.zarr"
    ids = _pipeline(uri, tiny_model)
    # Activations, images, coordinates: the very same objects, attribute by attribute.
    assert_same_store(uri, ref, skip=("labels", "probes", "interventions"))
    view = open_store(uri)
    assert len(view.image_index) == 16 and repr(view).count("16/16")
    assert set(list_targets(uri)) == {"salient", "depth"}
    for t in ("salient", "depth"):
        np.testing.assert_array_equal(open_labels(uri, t)["r8"].values,
                                      open_labels(ref, t)["r8"].values)
    for layer in LAYERS:
        np.testing.assert_allclose(load_probe(uri, ids["run"], layer)["weights"],
                                   load_probe(ref, ref_ids["run"], layer)["weights"], atol=1e-6)
    np.testing.assert_allclose(open_scores(uri, ids["run"])["mean"].values,
                               open_scores(ref, ref_ids["run"])["mean"].values, atol=1e-6)
    assert open_emergence(uri)["score"].shape == open_emergence(ref)["score"].shape
    got, want = open_intervention(uri, ids["experiment"]), open_intervention(ref, ref_ids["experiment"])
    np.testing.assert_array_equal(got["output"].values, want["output"].values)
    # Credentials are never written: not in any object, attribute or provenance.
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for path in fs.find(bucket):
        data = fs.cat_file(path)
        assert S3_SECRET.encode() not in data and S3_KEY_ID.encode() not in data, path


def test_long_lived_reader_sees_blocks_finished_later(bucket, tiny_model):
    uri = f"s3://{bucket}/grow.zarr"
    settings = MaterializeSettings(gen=GenerationConfig(steps=STEPS), batch_size=4,
                                   block_size=4)
    materialize(tiny_model, DEMO, uri, settings, images="0:4", progress=False)
    reader = open_store(uri)
    assert len(reader.image_index) == 4
    materialize(tiny_model, DEMO, uri, settings, images="4:12", progress=False)
    assert len(open_store(uri).image_index) == 12          # a new view in the same process
    assert len(reader.refresh().image_index) == 12         # the old view, refreshed
    assert completed_blocks(uri, "trained") == {(0, 4), (4, 8), (8, 12)}


ARGS = ["--model", "tiny-random", "--prompts", "demo", "--steps", str(TINY["steps"]),
        "--batch-size", str(TINY["batch_size"]), "--block-size", str(TINY["block_size"])]


def _cli(*args, env=None, **kw):
    cmd = [sys.executable, "-m", "flows.cli", "--no-prefect", "--quiet", *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            **kw)


def test_kill_minus_9_during_s3_materialize_then_rerun_equals_local(bucket, tiny_store):
    uri = f"s3://{bucket}/killed.zarr"
    proc = _cli("materialize", "--store", uri, *ARGS)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if completed_blocks(uri, "trained"):
                break
        except ActstoreError:
            pass
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = _cli("materialize", "--store", uri, *ARGS)
    out, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-2000:]
    assert S3_SECRET not in out + err
    assert_same_store(uri, tiny_store)


def test_unreachable_endpoint_is_one_line_and_writes_nothing(bucket):
    """Through the command line: one line on stderr, non-zero exit, no traceback."""
    uri = f"s3://{bucket}/s.zarr"
    proc = _cli("materialize", "--store", uri, *ARGS,
                env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})   # discard port: no listener
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert f"store {uri}: can't reach the object store" in lines[0]
    assert fsspec.filesystem("s3", skip_instance_cache=True).find(bucket) == []


def _objects(bucket: str) -> dict[str, bytes]:
    """Every object in the bucket, byte for byte."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    return {path: fs.cat_file(path) for path in fs.find(bucket)}


SCHEME = "has the scheme {s!r}, and an object store's endpoint is http:// or https://; fix it in "
OPTS = "--storage-options, FSSPEC_S3 or storage_options"


@pytest.mark.parametrize("env,options,want", [
    ("http://127.0.0.1:9", None, "can't reach the object store at http://127.0.0.1:9 "
     "(EndpointConnectionError); check the endpoint (AWS_ENDPOINT_URL) and the network"),
    (None, {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}},
     "can't reach the object store at http://127.0.0.1:9 (EndpointConnectionError); check "
     "the endpoint (" + OPTS + ") and the network"),
    ("127.0.0.1:9", None, "the endpoint '127.0.0.1:9' is not a URL; write it with its "
     "scheme, e.g. http://127.0.0.1:9, in AWS_ENDPOINT_URL"),
    (None, {"client_kwargs": {"endpoint_url": "htp://127.0.0.1:5123"}},
     "the endpoint 'htp://127.0.0.1:5123' " + SCHEME.format(s="htp://") + OPTS),
    ("ftp://127.0.0.1:5123", None,
     "the endpoint 'ftp://127.0.0.1:5123' " + SCHEME.format(s="ftp://") + "AWS_ENDPOINT_URL"),
    (None, {"endpoint_url": "s3://127.0.0.1:5123"},
     "the endpoint 's3://127.0.0.1:5123' " + SCHEME.format(s="s3://") + OPTS),
    ("https:/127.0.0.1:5123", None, "the endpoint 'https:/127.0.0.1:5123' is not a URL; write "
     "it as http://HOST:PORT or https://HOST in AWS_ENDPOINT_URL")],
    ids=["env", "options", "bare", "options-htp", "env-ftp", "s3-scheme", "one-slash"])
def test_a_wrong_endpoint_is_named_with_where_it_was_set(env, options, want, bucket,
                                                         tiny_store, monkeypatch):
    """Before, every wrong endpoint said 'check the endpoint (AWS_ENDPOINT_URL)' without the
    URL tried (a typo such as 'locahost' stayed hidden), also for one set in
    --storage-options; one without its scheme was 'can't use the object store: ValueError:
    Invalid endpoint: 127.0.0.1:9'. Until 2026-12-07 botocore's refusal of a scheme other
    than http(s) at every request (EndpointResolutionError) read 'can't reach the object
    store at htp://...; check ... the network', and ``https:/`` (one slash) was told to
    become 'http://https:/...'. The store there is left byte for byte."""
    uri = f"s3://{bucket}/p.zarr"
    fsspec.filesystem("s3", skip_instance_cache=True).put(tiny_store, f"{bucket}/p.zarr",
                                                          recursive=True)
    before = _objects(bucket)
    if env:
        monkeypatch.setenv("AWS_ENDPOINT_URL", env)
    with pytest.raises(ActstoreError) as info:
        open_store(uri, storage_options=options)
    assert str(info.value) == f"store {uri}: {want}"
    monkeypatch.undo()
    assert _objects(bucket) == before


@pytest.mark.parametrize("options,want", [
    ({"endpoint": "http://127.0.0.1:9"}, "storage option 'endpoint' is not one s3:// takes "
     "(from " + OPTS + "); an endpoint is 'endpoint_url' (or client_kwargs' 'endpoint_url')"),
    ({"client_kwargs": {"endpoint": "http://127.0.0.1:9"}}, "storage option 'endpoint' is "
     "not one s3:// takes"),
    ({"secrte": "x"}, "storage option 'secrte' is not one s3:// takes (from " + OPTS + "); "
     "see its filesystem's options"),
    ({"client_kwargs": 5}, "storage option 'client_kwargs' (a whole number) is refused by "
     "s3:// (AttributeError: 'int' object has no attribute 'copy'); fix its value (from "
     + OPTS + ")"),
    ({"config_kwargs": 5}, "storage option 'config_kwargs' (a whole number) is refused by "
     "s3://"),
    ({"config_kwargs": {"retries": 3}}, "storage option 'config_kwargs' (an object) is "
     "refused by s3:// (AttributeError: 'int' object has no attribute 'items')"),
    ({"anon": "maybe"}, "storage option 'anon' is a string, and s3:// takes true or false "
     "for it (from " + OPTS + "); fix its value"),
    ({"max_concurrency": "4"}, "storage option 'max_concurrency' is a string, and s3:// "
     "takes a whole number for it"),
    ({"max_concurrency": 0}, "storage option 'max_concurrency' (a whole number) is refused "
     "by s3:// (ValueError: max_concurrency must be >= 1)")],
    ids=["endpoint", "client-endpoint", "secrte", "client_kwargs", "config_kwargs",
         "config-retries", "anon", "concurrency-str", "concurrency-0"])
def test_a_storage_option_s3fs_does_not_take_is_named(options, want, bucket, tiny_store):
    """Before 2026-12-07: 'can't use the object store: TypeError: AioSession.__init__() got
    an unexpected keyword argument 'endpoint''; client_kwargs 5 'can't use the object store:
    AttributeError: ...', naming no option; config_kwargs 5 passed the first request (its
    own settings replaced the user's) and failed later, exit 1, and so did a wrong value
    inside it (its 'retries' 3); anon "maybe" was taken as true (anonymous) and read as
    'these credentials may not read it'; max_concurrency "4" a raw TypeError, exit 1;
    max_concurrency 0 "can't open this kind of location"."""
    uri = f"s3://{bucket}/p.zarr"
    fsspec.filesystem("s3", skip_instance_cache=True).put(tiny_store, f"{bucket}/p.zarr",
                                                          recursive=True)
    before = _objects(bucket)
    with pytest.raises(ActstoreError) as info:
        open_store(uri, storage_options=options)
    assert str(info.value).startswith(f"store {uri}: {want}"), str(info.value)
    assert "\n" not in str(info.value)
    assert _objects(bucket) == before


@pytest.mark.parametrize("uri,conf,want", [
    ("memory://opt-kind.zarr", {"global_store": "x"}, "storage option 'global_store' is a "
     "string, and memory:// takes true or false for it (from FSSPEC_MEMORY or "
     "storage_options); fix its value"),
    ("github://p.zarr", {}, "github:// needs the storage options 'org' and 'repo' (give "
     "them in FSSPEC_GITHUB or storage_options)")], ids=["memory", "github"])
def test_other_filesystems_refused_options_are_named(uri, conf, want, monkeypatch):
    """Beyond object stores, a constructor's refusal was a raw TypeError (exit 1); their
    options' sources leave out --storage-options, which only object stores take."""
    monkeypatch.setitem(fsspec.config.conf, uri.split(":")[0], conf)   # as FSSPEC_<P> sets
    with pytest.raises(ActstoreError) as info:
        open_store(uri)
    assert str(info.value) == f"store {uri}: {want}"


@pytest.mark.parametrize("case", ["missing bucket", "missing credentials"])
def test_bad_object_store_is_one_line_and_writes_nothing(case, bucket, tiny_model, tmp_path,
                                                         monkeypatch):
    uri = f"s3://{bucket}/s-{case.split()[1]}.zarr"
    if case == "missing bucket":
        uri, want = "s3://no-such-bucket-here/s.zarr", "bucket 'no-such-bucket-here' does not"
    else:
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(k)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        want = "no credentials found"
    for call in (lambda: open_store(uri),
                 lambda: materialize(tiny_model, DEMO, uri,
                                     MaterializeSettings(gen=GenerationConfig(steps=STEPS)),
                                     progress=False)):
        with pytest.raises(ActstoreError, match=want) as info:
            call()
        assert "\n" not in str(info.value) and str(info.value).startswith(f"store {uri}: ")
        assert S3_SECRET not in str(info.value)
    monkeypatch.undo()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert fs.find(bucket) == [] and not fs.exists("no-such-bucket-here")


@pytest.mark.parametrize("form,want", [
    ("s3://{b}//s.zarr", "the key has an empty part ('//'), which the object store keeps as "
                         "another key than the one meant; write s3://{b}/s.zarr"),
    ("s3://{b}/runs//s.zarr/", "write s3://{b}/runs/s.zarr"),
    ("s3://", "no bucket in the URL; write s3://BUCKET/PATH"),
    ("s3:///s.zarr", "no bucket in the URL; write s3://BUCKET/PATH")])
def test_malformed_s3_url_is_one_line_and_writes_nothing(form, want, bucket, tiny_model):
    """Before, ``s3://b//s.zarr`` made a store under the key ``b//s.zarr`` that no reader
    found (its summary: 'INCOMPLETE (no model variant yet)'), and ``s3://`` or
    ``s3:///s.zarr`` were an unexpected botocore error, exit 1."""
    uri, want = form.format(b=bucket), want.format(b=bucket)
    for call in (lambda: open_store(uri),
                 lambda: materialize(tiny_model, DEMO, uri,
                                     MaterializeSettings(gen=GenerationConfig(steps=STEPS)),
                                     progress=False)):
        with pytest.raises(ActstoreError) as info:
            call()
        assert str(info.value) == f"store {uri}: {want}" or (
            str(info.value).startswith(f"store {uri}: ") and want in str(info.value))
    assert fsspec.filesystem("s3", skip_instance_cache=True).find(bucket) == []
    proc = _cli("show", "--store", uri)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.strip().count("\n") == 0, err[-2000:]
    assert want in err and "Traceback" not in err


def test_a_new_store_inside_a_store_is_refused_and_writes_nothing(bucket, tiny_model,
                                                                   tmp_path):
    """Before 2026-12-07 ``materialize --store s3://b/p.zarr/sub.zarr`` made a second store
    in the first one's tree (a foreign group beside its images and models)."""
    settings = MaterializeSettings(gen=GenerationConfig(steps=STEPS), block_size=4)
    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    for outer in (f"s3://{bucket}/p.zarr", str(tmp_path / "p.zarr")):
        materialize(tiny_model, DEMO, outer, settings, images="0:4", progress=False)
        before = sorted(fs.find(bucket)) if outer.startswith("s3") else \
            sorted(map(str, tmp_path.rglob("*")))
        for inner in (f"{outer}/sub.zarr", f"{outer}/models/a/b.zarr"):
            with pytest.raises(ActstoreError) as info:
                materialize(tiny_model, DEMO, inner, settings, images="0:4", progress=False)
            assert str(info.value) == (f"store {inner}: is inside the actstore store {outer}, "
                                       "whose tree it would write into; choose a store "
                                       "path outside it")
        after = sorted(fs.find(bucket)) if outer.startswith("s3") else \
            sorted(map(str, tmp_path.rglob("*")))
        assert after == before
    materialize(tiny_model, DEMO, f"s3://{bucket}/q/r.zarr", settings, images="0:4",
                progress=False)   # a folder above that is no store is fine


def test_the_nested_store_check_goes_by_where_a_folder_is(tmp_path, monkeypatch):
    """On disk the check walks the folders a path is physically in: '../new.zarr' from
    inside a store was refused as inside it (fsspec keeps '..' in a local root), and
    'p.zarr//sub.zarr' named the outer store 'p.zarr/'. An object store's query is not part
    of its key, so a '//' there is no empty key part."""
    from actstore.store.layout import ROOT_KEY
    from actstore.store.locations import check_object_url, enclosing_group

    outer = tmp_path / "p.zarr"
    outer.mkdir()
    (outer / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                 "attributes": {ROOT_KEY: {}}}))
    monkeypatch.chdir(outer)
    assert enclosing_group("../new.zarr", ROOT_KEY) is None
    assert enclosing_group("sub.zarr", ROOT_KEY) == str(outer)
    assert enclosing_group(f"{outer}//sub.zarr", ROOT_KEY) == str(outer)
    check_object_url("s3://bkt/p.zarr?versionId=a//b")       # accepted
    with pytest.raises(ActstoreError, match="write s3://bkt/p.zarr"):
        check_object_url("s3://bkt//p.zarr?versionId=a")


def test_writer_marks_and_label_removal_on_s3(bucket):
    """The clean-up's primitives on a real S3 API: a superseded version goes whole, its
    zarr.json first, so a reader that held it is told so; a prefix whose writer looks gone
    loses its mark first and then the rest, and its writer finds out."""
    from actstore.store import commit, io, labelsets
    from actstore.store import layout as lay

    uri = f"s3://{bucket}/marks.zarr"
    versions = []
    for _ in range(2):    # a label run, then a relabel of the same target
        paths = labelsets.begin(uri, ["depth"])
        io.put_group(uri, f"{paths['depth']}/full")
        labelsets.commit_set(uri, paths, {"depth": {"kind": "continuous"}})
        labelsets.release(paths)
        versions.append(paths["depth"])
    labelsets.check_readable(uri, "depth", versions[0], "rerun")    # kept for readers
    labelsets.collect(uri, [], now=time.time() + 2 * labelsets.SUPERSEDED_KEEP_S)
    assert io.list_dir(uri, versions[0]) == [] and io.exists(uri, io.key(versions[1]))
    with pytest.raises(ActstoreError, match="labels 'depth' were replaced"):
        labelsets.check_readable(uri, "depth", versions[0], "rerun")
    path = lay.run_path("depth-20000101T000000000000-s3mark")
    token = commit.begin(uri, path)
    io.put_group(uri, f"{path}/trained")
    try:
        assert commit.still_mine(uri, path, token)
        assert commit.remove_unmarked(uri, path, lambda: False)
        assert io.list_dir(uri, path) == [] and not commit.still_mine(uri, path, token)
    finally:
        commit.release(token)
