"""The command line on s3:// (moto's S3 server on loopback), as a user runs it: two region
workers filling one store at once, labels fanned out over 2 worker processes and probe in
Prefect's default mode, the same
intervention experiment twice at once; the whole store then equal, object by object, to the
same steps run serially through the library on local disk.
Endpoint and credentials come from the standard AWS variables, fsspec's own ``FSSPEC_S3``
JSON, or ``--storage-options`` (inline or @file), and never reach a store, an output or
Prefect's database."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import fsspec
import numpy as np
import pytest

from actstore.intervene.results import list_interventions, open_intervention
from actstore.intervene.run import run_interventions
from actstore.intervene.settings import InterventionSettings
from actstore.label.labels import open_labels, write_labels
from actstore.probe.runs import load_probe, run_probes
from conftest import REPO, S3_KEY_ID, S3_SECRET, TINY
from storecheck import assert_same_store

pytestmark = pytest.mark.usefixtures("s3_server")
LAYERS = ["up_blocks.3.attentions.0", "up_blocks.2.attentions.0"]
MATERIALIZE = ["--model", "tiny-random", "--prompts", "demo", "--steps", str(TINY["steps"]),
               "--batch-size", str(TINY["batch_size"]), "--block-size", str(TINY["block_size"])]
PROBE = ["--target", "salient", "--layers", *LAYERS, "--steps", "0", "1"]
IMAGES = ["demo-012", "demo-013"]
INTERVENE = ["--layers", *LAYERS, "--steps", "0", "--images", *IMAGES, "--n-targets", "1"]


def _options(s3_env: dict) -> str:
    return json.dumps({"key": s3_env["AWS_ACCESS_KEY_ID"],
                       "secret": s3_env["AWS_SECRET_ACCESS_KEY"],
                       "client_kwargs": {"endpoint_url": s3_env["AWS_ENDPOINT_URL"],
                                         "region_name": "us-east-1"}})


def _bare_env(**extra: str) -> dict:
    """No AWS variables at all: the store is unreachable unless told otherwise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    return {**env, **extra}


def _start(*args: str, prefect: bool = False, env: dict | None = None) -> subprocess.Popen:
    mode = [] if prefect else ["--no-prefect"]
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *mode, "--quiet", "--json",
                             *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**(env or os.environ), "PYTHONPATH": str(REPO)})


def _done(proc: subprocess.Popen) -> dict:
    """Wait, check success and that no credential was printed; the printed result."""
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    for secret in (S3_SECRET, S3_KEY_ID):
        assert secret not in out + err
    return json.JSONDecoder().raw_decode(out[out.index("{"):])[0]


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory, tiny_store):
    """The same steps, serially, through the library on a local copy of the store."""
    uri = str(tmp_path_factory.mktemp("s3cli") / "ref.zarr")
    shutil.copytree(tiny_store, uri)
    with pytest.MonkeyPatch.context() as env:   # a value set before the tests is put back
        env.setenv("ACTSTORE_THREADS", "1")     # as each label worker: conv sums depend on it
        write_labels(uri, "toyworld", ["salient", "depth"], on_x0=False, progress=False)
    run = run_probes(uri, "salient", layers=LAYERS, steps=[0, 1], scheduler="threads",
                     progress=False)
    exp = run_interventions(uri, run, InterventionSettings(
        target="salient", layers=tuple(LAYERS), steps=(0,), images=tuple(IMAGES),
        n_targets=1), progress=False)
    return uri, run, exp["experiment_id"]


def test_cli_on_s3_equals_a_serial_local_run(bucket, s3_server, tiny_store, local_ref,
                                             tmp_path):
    ref, ref_run, ref_exp = local_ref
    uri = f"s3://{bucket}/cli.zarr"
    workers = [_start("materialize", "--store", uri, *MATERIALIZE, "--images", "0:8"),
               _start("materialize", "--store", uri, *MATERIALIZE, "--images", "8:16",
                      env=_bare_env(FSSPEC_S3=_options(s3_server)))]
    for w in workers:
        _done(w)
    assert_same_store(uri, tiny_store)

    # Labels fanned out over 2 worker processes in Prefect mode, credentials inherited.
    _done(_start("label", "--store", uri, "--provider", "toyworld", "--target", "salient",
                 "depth", "--no-x0", "--workers", "2", prefect=True,
                 env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-label"),
                      "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
                      "ACTSTORE_THREADS": "1"}))
    for t in ("salient", "depth"):
        got, want = open_labels(uri, t), open_labels(ref, t)
        assert set(got.data_vars) == set(want.data_vars)
        for name in want.data_vars:
            np.testing.assert_array_equal(got[name].values, want[name].values)

    # Prefect mode, options from a file: the secret must not reach Prefect's database.
    secrets = tmp_path / "s3.json"
    secrets.write_text(_options(s3_server))
    prefect_home = tmp_path / "prefect"
    run = _done(_start("--storage-options", f"@{secrets}", "probe", "--store", uri, *PROBE,
                       "--scheduler", "threads", prefect=True,
                       env=_bare_env(PREFECT_HOME=str(prefect_home),
                                     PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300"))
                 )["run_id"]
    for f in (p for p in prefect_home.rglob("*") if p.is_file()):
        assert S3_SECRET.encode() not in f.read_bytes(), f
    for layer in LAYERS:
        np.testing.assert_allclose(load_probe(uri, run, layer)["weights"],
                                   load_probe(ref, ref_run, layer)["weights"], atol=1e-6)

    # The same experiment twice at once: both finish, the summary is there.
    twice = [_start("intervene", "--store", uri, "--probe-run", run, *INTERVENE),
             _start("--storage-options", _options(s3_server), "intervene", "--store", uri,
                    "--probe-run", run, *INTERVENE, env=_bare_env())]
    exp = {_done(p)["experiment_id"] for p in twice}.pop()
    assert exp in list_interventions(uri)
    got, want = open_intervention(uri, exp), open_intervention(ref, ref_exp)
    for name in ("output", "new_label", "score_pre", "score_post"):
        np.testing.assert_array_equal(got[name].values, want[name].values)

    assert_same_store(uri, ref, alias={exp: ref_exp})
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for path in fs.find(bucket):
        data = fs.cat_file(path)
        assert S3_SECRET.encode() not in data and S3_KEY_ID.encode() not in data, path


@pytest.mark.parametrize("argv,want", [
    (["main", "--model", "tiny-random", "--out", "s3://{b}/main"],
     "--out s3://{b}/main: the main job keeps its store, figures and report in a local "
     "folder; give one, or put a store on an object store with the standalone commands"),
    (["--no-prefect", "sweep", "--store", "s3://{b}/s.zarr", "--probe-run", "r", "--out",
      "s3://{b}/sweep"], "--out s3://{b}/sweep: figures are written to a local path")])
def test_an_object_store_url_for_a_local_output_is_one_line(argv, want, bucket, capsys):
    """main's --out holds its store: before 2026-12-07 an s3:// one was refused as 'figures
    are written to a local path', which hid where the store could go."""
    from flows.cli import main

    code = main([a.format(b=bucket) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert want.format(b=bucket) in err
    assert fsspec.filesystem("s3", skip_instance_cache=True).find(bucket) == []


@pytest.mark.parametrize("prefect", [True, False], ids=["prefect", "no-prefect"])
def test_a_refused_endpoint_or_option_is_one_line_and_leaves_the_store(prefect, bucket,
                                                                       s3_server, tiny_store,
                                                                       tmp_path):
    """A user's endpoint with a scheme botocore will not send to, and options s3fs's
    filesystem refuses or takes wrongly, on an existing store: exit 2, the one line only (no
    Prefect log or stack before it), every object byte-identical. Before: 'can't reach the
    object store at htp://...', and for client_kwargs 5 and anon "maybe" messages naming
    no option (the latter a permission refusal: "maybe" was taken as anonymous)."""
    uri = f"s3://{bucket}/p.zarr"
    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    fs.put(tiny_store, f"{bucket}/p.zarr", recursive=True)
    before = {p: fs.cat_file(p) for p in fs.find(bucket)}
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    cases = [(["--storage-options", '{"client_kwargs": {"endpoint_url": "htp://127.0.0.1:5123"'
               '}}'], env, "the endpoint 'htp://127.0.0.1:5123' has the scheme 'htp://', and "
              "an object store's endpoint is http:// or https://; fix it in --storage-options"),
             ([], {**env, "AWS_ENDPOINT_URL": "ftp://127.0.0.1:5123"}, "the endpoint "
              "'ftp://127.0.0.1:5123' has the scheme 'ftp://', and an object store's endpoint "
              "is http:// or https://; fix it in AWS_ENDPOINT_URL"),
             (["--storage-options", '{"client_kwargs": 5}'], env, "storage option "
              "'client_kwargs' (a whole number) is refused by s3://"),
             (["--storage-options", '{"anon": "maybe"}'], env, "storage option 'anon' is a "
              "string, and s3:// takes true or false for it")]
    label = ["label", "--store", uri, "--provider", "toyworld", "--target", "salient"]
    for command in (["materialize", "--store", uri, *MATERIALIZE], label):
        for flags, case_env, want in cases[:1] if command is label else cases:
            proc = _start(*flags, *command, prefect=prefect, env=case_env)
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 2 and err.count("\n") == 1, err[-3000:]
            assert err.startswith(f"actstore {command[0]}: error: store {uri}: {want}"), err
    assert {p: fs.cat_file(p) for p in fs.find(bucket)} == before
    # label opened its store inside its flow: a temporary Prefect server started first, and
    # the line came 30-40 s later; now no server (its database) is made
    assert not list((tmp_path / "prefect").rglob("*.db"))
