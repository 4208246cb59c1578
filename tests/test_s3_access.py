"""What a user meets when the object store refuses them, on an S3 API that checks
credentials and permissions (moto's server with IAM enforced, ``iam_s3.py``): a wrong secret
key, read-only credentials running a command that writes, credentials with no access.

Each refusal is one line, ``actstore <command>: error: store <uri>: ...``, naming what was
refused and the setting or permission to change, exit 2, with the bucket byte-identical
afterwards and no secret in any output, log or Prefect's database; every command, in the
default Prefect mode and with --no-prefect. Read-only credentials read: ``open_store``,
``verify``, and a materialize rerun with nothing left to do, which writes nothing.

The command matrix runs in this process (``main``) against one shared store; a few cases
also run as a user runs them, in a fresh process with the standard AWS variables or
``--storage-options``, where nothing the command started may outlive it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid

import fsspec
import psutil
import pytest

from actstore.errors import ActstoreError
from actstore.probe.runs import list_runs
from actstore.store import io
from actstore.store.view import open_store
from conftest import EXPLORE_LAYERS, REPO, TINY
from flows.cli import main
from iam_s3 import iam_s3  # noqa: F401 - the module's fixture
from storecheck import object_digest

LAYER = EXPLORE_LAYERS[0]
MATERIALIZE = ["--model", "tiny-random", "--prompts", "demo", "--steps", str(TINY["steps"]),
               "--batch-size", str(TINY["batch_size"]), "--block-size", str(TINY["block_size"])]
# Every command that writes into an existing store, each writing something new there.
WRITES = {
    "materialize": ["materialize", *MATERIALIZE, "--control", "randomized"],
    "label": ["label", "--provider", "toyworld", "--target", "shading", "--no-x0"],
    "probe": ["probe", "--target", "salient", "--layers", LAYER, "--steps", "0",
              "--scheduler", "threads"],
    "intervene": ["intervene", "--probe-run", "{run}", "--layers", LAYER, "--steps", "0",
                  "--images", "demo-012", "--n-targets", "1", "--provider", "toyworld"],
    "sweep": ["sweep", "--probe-run", "{run}", "--validation", "1", "--evaluation", "1",
              "--step-counts", "1", "--strength", "1", "--provider", "toyworld",
              "--out", "{out}"],
}
COMMANDS = {**WRITES, "verify": ["verify", "--images", "0:4"]}
NO_PREFECT_ONLY = {"verify"}      # runs in process whatever the mode
SAY = {   # user -> what the one line must say: what was refused, what to change
    "wrong": [r"the secret key does not match the access key id \(SignatureDoesNotMatch\)",
              "check AWS_SECRET_ACCESS_KEY"],
    "nobody": [r"these credentials may not read bucket '{bucket}' \(ListObjectsV2: "
               r"AccessDenied\)", r"ask the bucket's owner for read access \(s3:ListBucket"],
    "reader": [r"these credentials may not write to it \((PutObject|DeleteObjects?): "
               r"AccessDenied\)", r"ask the bucket's owner for write access \(s3:PutObject"],
}


@pytest.fixture(scope="module")
def seeded(iam_s3, explore_store):   # noqa: F811 - the fixture imported above
    """The explore store (labels, probe runs, an intervention) uploaded by the writer;
    this process reads the bucket with the writer's credentials unless a test says so."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **iam_s3.options("writer"))
    fs.put(explore_store, f"{iam_s3.bucket}/s.zarr", recursive=True)
    run = next(r for r, a in list_runs(explore_store).items() if a["target"] == "salient")
    bucket = f"s3://{iam_s3.bucket}"
    digest = object_digest(bucket, **iam_s3.options("writer"))
    assert any(k.startswith("s.zarr/models/") for k in digest)
    yield {"uri": f"{bucket}/s.zarr", "run": run, "digest": digest}
    io.set_storage_options(f"{bucket}/", {})


@pytest.fixture(scope="module")
def api(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _listing(iam) -> dict:
    """Every object's key, size, ETag and modification time: any write changes one."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **iam.options("writer"))
    return {p: (d["size"], d.get("ETag"), str(d.get("LastModified")))
            for p, d in fs.find(iam.bucket, detail=True).items()}


def _argv(name: str, seeded: dict, tmp_path, store: str | None = None) -> list[str]:
    argv = [a.replace("{run}", seeded["run"]).replace("{out}", str(tmp_path / "out"))
            for a in COMMANDS[name]]
    return [argv[0], "--store", store or seeded["uri"], *argv[1:]]


def _in_process(capsys, iam, user: str, argv: list[str], prefect: bool) -> tuple[int, str]:
    """``main`` with ``user``'s credentials for this bucket; (exit code, stderr)."""
    io.set_storage_options(f"s3://{iam.bucket}/", iam.options(user))
    code = main([*([] if prefect else ["--no-prefect"]), "--quiet", *argv])
    out, err = capsys.readouterr()
    for secret in iam.secrets():
        assert secret not in out + err
    return code, err


def _refused(code: int, err: str, user: str, command: str, uri: str, bucket: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith(f"actstore {command}: error: store {uri}: "), line
    for words in SAY[user]:
        assert re.search(words.format(bucket=bucket), line), (words, line)
    return line


MODES = ["prefect", "no-prefect"]
MATRIX = [(user, command, mode) for user in ("wrong", "nobody") for command in COMMANDS
          for mode in MODES if mode == "no-prefect" or command not in NO_PREFECT_ONLY] + \
         [("reader", command, mode) for command in WRITES for mode in MODES]


@pytest.mark.parametrize("user,command,mode", MATRIX)
def test_refused_on_an_existing_store(capsys, tmp_path, iam_s3, seeded, api, user, command,
                                      mode):
    before = _listing(iam_s3)
    code, err = _in_process(capsys, iam_s3, user, _argv(command, seeded, tmp_path),
                            prefect=mode == "prefect")
    _refused(code, err, user, command, seeded["uri"], iam_s3.bucket)
    assert _listing(iam_s3) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("user", ["wrong", "nobody", "reader"])
@pytest.mark.parametrize("mode", MODES)
def test_refused_on_a_new_store(capsys, tmp_path, iam_s3, seeded, api, user, mode):
    uri = f"s3://{iam_s3.bucket}/new-{uuid.uuid4().hex[:8]}.zarr"
    before = _listing(iam_s3)
    code, err = _in_process(capsys, iam_s3, user, ["materialize", "--store", uri, *MATERIALIZE],
                            prefect=mode == "prefect")
    line = _refused(code, err, user, "materialize", uri, iam_s3.bucket)
    assert _listing(iam_s3) == before, line


@pytest.mark.parametrize("mode", MODES)
def test_read_only_credentials_read(capsys, tmp_path, iam_s3, seeded, api, mode):
    """open_store and verify work; a materialize rerun with every block stored has nothing
    to write, so it succeeds without write access and changes nothing."""
    before = _listing(iam_s3)
    io.set_storage_options(f"s3://{iam_s3.bucket}/", iam_s3.options("reader"))
    view = open_store(seeded["uri"])
    assert len(view.image_index) == 16 and "trained" in repr(view)
    if mode == "no-prefect":
        code, err = _in_process(capsys, iam_s3, "reader", _argv("verify", seeded, tmp_path),
                                prefect=False)
        assert code == 0, err
    code, err = _in_process(capsys, iam_s3, "reader", ["materialize", "--store", seeded["uri"],
                                                       *MATERIALIZE], prefect=mode == "prefect")
    assert code == 0 and err == "", err
    assert _listing(iam_s3) == before


@pytest.mark.parametrize("user", ["wrong", "nobody"])
def test_library_refusal_names_the_setting(iam_s3, seeded, user):
    """The library's own error (no command line): what a notebook sees."""
    io.set_storage_options(f"s3://{iam_s3.bucket}/", iam_s3.options(user))
    with pytest.raises(ActstoreError) as info:
        open_store(seeded["uri"])
    text = str(info.value)
    assert text.startswith(f"store {seeded['uri']}: ") and "\n" not in text
    for words in SAY[user]:
        assert re.search(words.format(bucket=iam_s3.bucket), text), (words, text)
    assert all(secret not in text for secret in iam_s3.secrets())


def test_store_usable_though_the_bucket_head_is_refused(iam_s3, seeded):
    """Credentials scoped to a prefix are refused the bucket's HEAD yet may list and read
    the store (and list a new one's empty prefix). Before, opening refused the store in
    one line ('access to bucket ... is denied') though every request it makes was allowed;
    the listing the refusal is asked again with now decides."""
    options = iam_s3.options("scoped")
    with pytest.raises(PermissionError):
        fsspec.filesystem("s3", skip_instance_cache=True, **options).info(iam_s3.bucket)
    io.set_storage_options(f"s3://{iam_s3.bucket}/", options)
    try:
        view = open_store(seeded["uri"])
        assert len(view.image_index) == 16 and "trained" in repr(view)
        assert not io.store_nonempty(f"s3://{iam_s3.bucket}/new-{uuid.uuid4().hex[:8]}.zarr")
    finally:
        io.set_storage_options(f"s3://{iam_s3.bucket}/", {})


def test_unknown_access_key_names_the_key_setting(iam_s3, seeded):
    io.set_storage_options(f"s3://{iam_s3.bucket}/",
                           {**iam_s3.options("reader"), "key": "AKIA0000000000UNKNOWN"})
    with pytest.raises(ActstoreError, match=r"no such access key id \(InvalidAccessKeyId\); "
                                            "check AWS_ACCESS_KEY_ID"):
        open_store(seeded["uri"])


def test_refusal_without_the_services_code():
    """A worker's refusal can arrive without the service's error (its cause stays in the
    worker): on an object store it is still a refusal, said without guessing the operation;
    on a local store a bare PermissionError is not called one."""
    from flows.cli_report import failure_line

    line, code = failure_line("label", PermissionError("Access Denied"), "s3://b/s.zarr")
    assert code == 2 and line.startswith("actstore label: error: store s3://b/s.zarr: the "
                                          "object store refused a request with these "
                                          "credentials (Access Denied)"), line
    assert "ask the bucket's owner for write access" in line
    line, code = failure_line("label", PermissionError("Access Denied"), "/data/s.zarr")
    assert code == 1 and "unexpected PermissionError" in line and "bucket" not in line


# -- as a user runs them: a fresh process, the standard variables or --storage-options -----

def _cli(iam, user: str, argv: list[str], tmp_path, *, prefect: bool,
         options_file: bool = False) -> tuple[int, str, str]:
    """The command in a fresh process with ``user``'s credentials, in the default mode with
    its own temporary Prefect server (as a user runs it) or --no-prefect; nothing it started
    may outlive it, and no secret may reach its output or Prefect's files."""
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "FSSPEC_", "PREFECT_API_URL"))}
    home = tmp_path / f"prefect-{mark[:6]}"
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(home), ACTSTORE_TEST_MARK=mark,
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
               AWS_EC2_METADATA_DISABLED="true")
    if options_file:
        secrets = tmp_path / "s3.json"
        secrets.write_text(json.dumps(iam.options(user)))
        argv = ["--storage-options", f"@{secrets}", *argv]
    else:
        env.update(iam.env(user))
    cmd = [sys.executable, "-m", "flows.cli", *([] if prefect else ["--no-prefect"]), *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    deadline = time.time() + 15
    while (left := _marked(mark)) and time.time() < deadline:
        time.sleep(0.2)
    assert not left, f"outlived the command: {left}"
    for secret in iam.secrets():
        assert secret not in proc.stdout + proc.stderr
        for f in (p for p in home.rglob("*") if p.is_file()):
            assert secret.encode() not in f.read_bytes(), f
    return proc.returncode, proc.stdout, proc.stderr


def _marked(mark: str) -> list[str]:
    """Processes whose environment carries ``mark``: what a command started, in any session."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("ACTSTORE_TEST_MARK") == mark:
                found.append(" ".join(p.cmdline()))
        except psutil.Error:
            pass
    return found


@pytest.mark.parametrize("prefect", [True, False], ids=["prefect", "no-prefect"])
def test_cli_wrong_secret_on_a_new_store(iam_s3, seeded, tmp_path, prefect):
    uri = f"s3://{iam_s3.bucket}/fresh.zarr"
    before = _listing(iam_s3)
    code, _, err = _cli(iam_s3, "wrong", ["materialize", "--store", uri, *MATERIALIZE],
                        tmp_path, prefect=prefect)
    _refused(code, err, "wrong", "materialize", uri, iam_s3.bucket)
    assert _listing(iam_s3) == before


def test_cli_read_only_label_over_two_workers(iam_s3, seeded, tmp_path):
    """Credentials from --storage-options, the refusal met in a worker process."""
    before = _listing(iam_s3)
    code, _, err = _cli(iam_s3, "reader", [*_argv("label", seeded, tmp_path), "--workers", "2"],
                        tmp_path, prefect=True, options_file=True)
    _refused(code, err, "reader", "label", seeded["uri"], iam_s3.bucket)
    assert _listing(iam_s3) == before


def test_cli_no_access_probe(iam_s3, seeded, tmp_path):
    code, _, err = _cli(iam_s3, "nobody", _argv("probe", seeded, tmp_path), tmp_path,
                        prefect=False)
    _refused(code, err, "nobody", "probe", seeded["uri"], iam_s3.bucket)


def test_bucket_is_byte_identical_after_every_refusal(iam_s3, seeded):
    """Last in this module: every refused command above left every object as it was."""
    assert object_digest(f"s3://{iam_s3.bucket}", **iam_s3.options("writer")) == \
        seeded["digest"]


def test_refusals_name_the_providers_own_permissions():
    """A refusal on Google Cloud Storage or Azure names that provider's permissions and
    credential settings, not S3's."""
    from flows.cli_report import failure_line

    for uri, wanted in [("gs://b/s.zarr", ("storage.objects.create", "GOOGLE_APPLICATION")),
                        ("gcs://b/s.zarr", ("storage.objects.create", "GOOGLE_APPLICATION")),
                        ("abfs://c/s.zarr", ("Storage Blob Data Contributor", "AZURE_STORAGE")),
                        ("s3a://b/s.zarr", ("s3:PutObject", "AWS_ACCESS_KEY_ID"))]:
        line, code = failure_line("probe", PermissionError("Forbidden"), uri)
        assert code == 2 and all(w in line for w in wanted), (uri, line)
        if not uri.startswith("s3"):
            assert "s3:" not in line and "AWS_" not in line, (uri, line)
