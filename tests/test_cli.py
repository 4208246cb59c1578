"""The command line as a user meets it: output modes, one-line failures in both modes (the
store byte-for-byte unchanged), option checks, and no Prefect server left after kill -9.
A full disk and a read-only store: tests/test_disk.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from actstore.store.view import open_store
from conftest import DEMO, REPO, TINY, tree_digest
from flows.cli import main

SMALL = ["--steps", "2", "--batch-size", "4", "--block-size", "4"]


def run(*argv: str, api: str | None = None, timeout: float = 600,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """A fresh ``python -m flows.cli`` process; ``api``: the Prefect API its flows use
    (None and no --no-prefect: the command starts its own temporary server)."""
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full.pop("PREFECT_API_URL", None)
    if api:
        full["PREFECT_API_URL"] = api
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], capture_output=True,
                          text=True, timeout=timeout, env=full, cwd=REPO)


def run_after_import(module: str, *argv: str) -> subprocess.CompletedProcess:
    """:func:`main` called by a program that imported ``module`` first (a notebook, a
    script): libraries read their quiet settings from the environment only when imported."""
    code = f"import sys, {module}; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("actstore") and ": error: " in lines[0], err
    return lines[0]


@pytest.fixture(scope="session")
def api(prefect_harness) -> str:
    """The session's Prefect API, for subprocesses in the default (Prefect) mode."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture()
def labelled(tmp_path, tiny_store) -> str:
    """A copy of the reference store with a 'depth' target from a user array."""
    from actstore.label.labels import write_labels

    uri = str(tmp_path / "labelled.zarr")
    shutil.copytree(tiny_store, uri)
    ids = list(open_store(uri).images["image"].values)
    path = tmp_path / "depth.npz"
    rng = np.random.default_rng(0)
    np.savez(path, image_id=np.array(ids), depth=rng.normal(size=(len(ids), 64, 64)))
    write_labels(uri, f"array:{path}", "depth", on_x0=False, progress=False)
    return uri


def _table(tmp_path: Path, rows: list[str], name: str = "t.csv") -> str:
    path = tmp_path / name
    path.write_text("image_id,prompt,seed,split\n" + "\n".join(rows) + "\n")
    return str(path)


# ---- output: a short summary, --json, progress bars only without --quiet ----

def test_summary_by_default_json_on_request(tmp_path):
    uri = str(tmp_path / "s.zarr")
    command = ["materialize", "--model", "tiny-random", "--prompts", DEMO, "--store", uri]
    common = [*command, "--images", "0:4", *SMALL]
    first = run("--no-prefect", *common)
    assert first.returncode == 0, first.stderr
    done, state = first.stdout.strip().splitlines()                    # two lines
    assert done.startswith(f"{uri}: trained: 4 images generated in 1 blocks")
    assert state == f"store {uri}: INCOMPLETE (trained 4/16 images)"
    assert "img-step" in first.stderr                                  # the progress bar
    again = run("--no-prefect", *common, "--json", "--quiet")
    assert again.stderr == ""                                          # no bar, no logs
    assert json.loads(again.stdout)["blocks_skipped"] == 1
    # the model's folder loaded after diffusers: no "Loading weights" bar of transformers'
    later = run_after_import("diffusers", "--no-prefect", "--quiet", *command, "--images",
                             "0:8", *SMALL)
    assert later.returncode == 0 and later.stderr == "", later.stderr
    assert later.stdout.splitlines()[1] == f"store {uri}: INCOMPLETE (trained 8/16 images)"


def test_main_quiet_prints_tables_and_files_only(api, tmp_path):
    from actstore.intervene.sweep import list_sweeps

    out = tmp_path / "main"
    res = run("main", "--quiet", "--model", "tiny-random", "--steps", "2", "--targets",
              "salient", "--out", str(out), api=api)
    assert res.returncode == 0, res.stderr
    assert "%|" not in res.stderr and "INFO" not in res.stderr, res.stderr
    assert "INFO" not in res.stdout and "{" not in res.stdout        # no logs, no JSON dump
    lines = res.stdout.splitlines()
    assert lines[0].split()[:4] == ["target", "kind", "metric", "best"]
    assert any(ln.split()[:3] == ["salient", "attn1", "dice_label"] for ln in lines)
    assert any(ln.startswith("causal test") for ln in lines)          # the sweep table
    files = lines[lines.index("files written:") + 1:]
    assert files[0].strip() == str(out / "store.zarr")
    for f in files:
        assert Path(f.strip()).exists(), f
    assert {Path(f.strip()).name for f in files} == {p.name for p in out.iterdir()}  # all
    assert {Path(f.strip()).name for f in files} >= {
        "samples-trained.png", "salient-curves.png", "dose-response.png", "summary.txt",
        "capture-kinds.png", "report.html"}
    # tiny-random's salient probes include zero-weight points (one-class labels): those are
    # left unedited, so no image of the sweep goes non-finite and its table says so
    causal = lines[next(i for i, ln in enumerate(lines) if ln.startswith("causal test")):]
    assert any(ln.split()[:1] == ["salient"] for ln in causal), causal
    assert not any("non-finite" in ln for ln in causal), causal
    # the summary file holds every table printed, the causal test's too (before
    # 2026-12-07 the probe table only); causal.json its records, as stored
    printed = "\n".join(lines[:lines.index("files written:")]).rstrip("\n")
    assert (out / "summary.txt").read_text() == printed + "\n"
    sweeps = json.loads((out / "causal.json").read_text())
    stored = list_sweeps(str(out / "store.zarr"))
    assert list(sweeps) == ["salient"]
    assert sweeps["salient"] == stored[sweeps["salient"]["sweep_id"]]


def test_info_logs_only_with_verbose(api, labelled):
    """Prefect's flow-run INFO lines: hidden by default, shown with --verbose."""
    argv = ["label", "--store", labelled, "--provider", "toyworld", "--no-x0", "--target"]
    default = run(*argv, "salient", api=api)
    assert default.returncode == 0, default.stderr
    assert "INFO" not in default.stderr and "label" in default.stderr   # its bar only
    verbose = run("--verbose", *argv, "shading", api=api)
    assert verbose.returncode == 0, verbose.stderr
    assert "INFO" in verbose.stderr and "Finished in state Completed" in verbose.stderr


# ---- one line per failure, in both modes, nothing stored changed ----

def test_failure_inside_a_flow_is_one_line(api, labelled):
    """Refused inside the flow (labels exist): Prefect's failure logs stay out of sight."""
    before = tree_digest(labelled)
    argv = ["label", "--store", labelled, "--provider", "toyworld", "--target", "depth"]
    res = run(*argv, api=api)
    assert res.returncode == 2
    assert "already has labels 'depth'" in one_line(res.stderr) and res.stdout == ""
    debug = run("--debug", *argv, api=api)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == one_line(res.stderr)
    assert tree_digest(labelled) == before


@pytest.mark.parametrize("prefect", [False, True], ids=["no-prefect", "prefect"])
def test_bad_table_is_one_line_in_both_modes(api, tmp_path, tiny_store, prefect):
    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(tiny_store, uri)
    before = tree_digest(uri)
    bad = _table(tmp_path, ["a,x,1,train", "a,y,2,test"])
    mode = [] if prefect else ["--no-prefect"]
    res = run(*mode, "materialize", "--model", "tiny-random", "--prompts", bad, "--store",
              uri, *SMALL, api=api)
    assert res.returncode == 2 and "duplicate image_id 'a'" in one_line(res.stderr)
    assert tree_digest(uri) == before


def _refused(capsys, argv: list[str]) -> str:
    code = main(argv)
    assert code == 2
    return one_line(capsys.readouterr().err)


@pytest.mark.parametrize("rows,words", [
    (["img/003,a cat,1,train"], "row 1: image_id 'img/003' is not"),
    (["ok,a cat,1,train", "../../etc,a dog,2,train"], "row 2: image_id '../../etc'"),
    (["a,a cat,1,train", "b,a dog,2,validation"], "split 'validation' is not train or test"),
    (["a,a cat,1,Train"], "write 'train'"),
    (["a,a cat,1,train", "b," + " ".join(["word"] * 2000) + ",2,test"],
     "row 2 (image_id 'b'): prompt is 8000 tokens for this model, its text encoder reads 75"),
])
def test_prompt_table_refusals(capsys, tmp_path, tiny_store, rows, words):
    """New store: nothing created. Existing store: byte-for-byte unchanged."""
    table = _table(tmp_path, rows)
    new = tmp_path / "new.zarr"
    base = ["--no-prefect", "--quiet", "materialize", "--model", "tiny-random", "--prompts",
            table, *SMALL]
    line = _refused(capsys, [*base, "--store", str(new)])
    assert words in line, line
    assert not new.exists()
    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(tiny_store, uri)
    before = tree_digest(uri)
    _refused(capsys, [*base, "--store", uri])
    assert tree_digest(uri) == before


@pytest.mark.parametrize("argv,option", [
    (["materialize", "--store", "s", "--steps", "0"], "--steps"),
    (["materialize", "--store", "s", "--steps", "-1"], "--steps"),
    (["materialize", "--store", "s", "--block-size", "0"], "--block-size"),
    (["materialize", "--store", "s", "--batch-size", "0"], "--batch-size"),
    (["materialize", "--store", "s", "--height", "-8"], "--height"),
    (["materialize", "--store", "s", "--guidance", "nan"], "--guidance"),
    (["materialize", "--store", "s", "--guidance", "-1"], "--guidance"),
    (["probe", "--store", "s", "--target", "t", "--steps", "-1"], "--steps"),
    (["intervene", "--store", "s", "--probe-run", "r", "--n-targets", "0"], "--n-targets"),
    (["intervene", "--store", "s", "--probe-run", "r", "--iterations", "0"], "--iterations"),
    (["intervene", "--store", "s", "--probe-run", "r", "--lr", "0"], "--lr"),
    (["intervene", "--store", "s", "--probe-run", "r", "--margin", "-4"], "--margin"),
    (["intervene", "--store", "s", "--probe-run", "r", "--steps", "x"], "--steps"),
    (["intervene", "--store", "s", "--probe-run", "r", "--seed", "-1"], "--seed"),
    (["main", "--steps", "0"], "--steps"),
    (["main", "--threads", "0"], "--threads"),
    (["--threads", "0", "main"], "--threads"),
])
def test_numeric_options_are_checked_by_the_parser(capsys, argv, option):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert f"argument {option}" in line and "(see actstore" in line


def test_unknown_url_protocol(capsys, tmp_path):
    line = _refused(capsys, ["--no-prefect", "materialize", "--model", "tiny-random",
                             "--prompts", DEMO, "--store", "foo://bucket/s.zarr", *SMALL])
    assert "unknown URL protocol 'foo://'" in line


@pytest.mark.parametrize("option", ["--scheduler", "--cluster"])
def test_unreachable_scheduler_fails_within_seconds(capsys, labelled, option):
    """probe takes the address as --cluster too, the other commands' name for it."""
    with socket.socket() as sock:    # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    before = tree_digest(labelled)
    t0 = time.perf_counter()
    line = _refused(capsys, ["--no-prefect", "probe", "--store", labelled, "--target",
                             "depth", option, f"tcp://127.0.0.1:{port}"])
    assert time.perf_counter() - t0 < 20    # not distributed's 30 s connect timeout
    assert f"no Dask scheduler reachable at 127.0.0.1:{port}" in line
    assert tree_digest(labelled) == before


def test_probe_refuses_a_store_without_test_images(capsys, tmp_path, tiny_model):
    from actstore.generation.materialize import MaterializeSettings, materialize
    from actstore.generation.sampling import GenerationConfig
    from actstore.label.labels import write_labels

    table = _table(tmp_path, [f"i{k},a thing {k},{k},train" for k in range(4)])
    uri = str(tmp_path / "train-only.zarr")
    materialize(tiny_model, table, uri, MaterializeSettings(gen=GenerationConfig(steps=1)),
                progress=False)
    ids = list(open_store(uri).images["image"].values)
    depth = np.random.default_rng(0).normal(size=(4, 64, 64))   # all 1 is a constant mask
    np.savez(tmp_path / "d.npz", image_id=np.array(ids), depth=depth)
    write_labels(uri, f"array:{tmp_path / 'd.npz'}", "depth", on_x0=False, progress=False)
    before = tree_digest(uri)
    line = _refused(capsys, ["--no-prefect", "probe", "--store", uri, "--target", "depth",
                             "--scheduler", "sync"])
    assert "no test-split images to score probes on" in line
    assert tree_digest(uri) == before


def test_hf_pickle_weights_refused_by_name(capsys, tmp_path, labelled):
    from transformers import DPTImageProcessor

    folder = tmp_path / "dpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "dpt"}))
    DPTImageProcessor().save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    before = tree_digest(labelled)
    line = _refused(capsys, ["--no-prefect", "label", "--store", labelled, "--provider",
                             f"hf-depth:{folder}", "--target", "shade"])
    assert "found pytorch_model.bin: pickle files, never loaded" in line
    assert tree_digest(labelled) == before


def test_main_refuses_a_missing_model_before_creating_out(capsys, tmp_path):
    out = tmp_path / "m"
    line = _refused(capsys, ["main", "--model", str(tmp_path / "nonexistent"), "--out",
                             str(out)])
    assert "no such folder" in line and not out.exists()


def test_main_refused_inside_its_flow_leaves_no_out_folder(api, tmp_path):
    """A capture kind refused when the flow plans materialize: the folder the flow would
    fill was made first and left empty."""
    out = tmp_path / "m"
    res = run("--quiet", "main", "--model", "tiny-random", "--steps", "2", "--capture", "bogus",
              "--out", str(out), api=api)
    assert res.returncode == 2 and "bogus" in one_line(res.stderr)
    assert not out.exists()


def test_main_refusing_its_store_names_out_not_store(api, tmp_path):
    """`actstore main --steps 3` where an earlier job left a 2-step store refused it with
    '...; use a new --store', an option main does not have; the line now names --out and
    the folder to remove, and nothing in it changed."""
    out = tmp_path / "m"
    first = run("--quiet", "main", "--model", "tiny-random", "--prompts", DEMO, "--out",
                str(out), "--images", "0:8", "--steps", "2", api=api)
    assert first.returncode == 0, first.stderr
    before = tree_digest(out)
    res = run("--quiet", "main", "--model", "tiny-random", "--prompts", DEMO, "--out",
              str(out), "--images", "0:8", "--steps", "3", api=api)
    line = one_line(res.stderr)
    assert res.returncode == 2 and "generation.steps" in line, res.stderr
    assert "--store" not in line and "a new --out" in line and f"remove {out}" in line
    assert tree_digest(out) == before


def test_main_finds_images_its_blocks_cannot_hold_before_a_flow(tmp_path):
    """`actstore main --images 0:4`: the job's store has blocks of 8 images (or an existing
    store's size), but the command checked --images against blocks of 1, so materialize
    refused it inside the flow, after the Prefect server and (--workers 2) a local cluster
    had started (31 s on 2 cores, 2026-12-06). A Prefect API nothing listens on tells
    when: the alignment line, not that API's 'Connection refused'."""
    out = tmp_path / "m"
    res = run("--quiet", "main", "--model", "tiny-random", "--prompts", DEMO, "--out",
              str(out), "--images", "0:4", "--steps", "2", "--workers", "2",
              api="http://127.0.0.1:9/api")
    line = one_line(res.stderr)
    assert res.returncode == 2 and "--images 0:4: not aligned to the store's 8-image " \
        "blocks" in line, line
    assert not out.exists()


DEAD_API = "http://127.0.0.1:9/api"     # the discard port: nothing listens


def test_an_unreachable_prefect_api_is_named_with_the_ways_out(tmp_path):
    """A ``PREFECT_API_URL`` nothing listens on: one line naming that API and how to go
    on, exit 2, no store. Until 2026-12-06 the line was 'Connection refused; check the
    path and rerun', as if a file were missing."""
    store = tmp_path / "s.zarr"
    res = run("--quiet", "materialize", "--model", "tiny-random", "--prompts", DEMO,
              "--store", str(store), "--images", "0:4", *SMALL, api=DEAD_API, timeout=300)
    line = one_line(res.stderr)
    assert res.returncode == 2, res.stderr
    assert line == (f"actstore materialize: error: the Prefect API at {DEAD_API} "
                    "(PREFECT_API_URL) cannot be reached (Connection refused); start it "
                    "(prefect server start) or point PREFECT_API_URL at one that runs, unset "
                    "PREFECT_API_URL to use a temporary local server, or run without "
                    "Prefect (actstore --no-prefect materialize ...)"), line
    assert not store.exists()


def test_other_refused_connections_are_not_called_prefect():
    """Connections really refused (the discard port and port 1, where nothing listens) by
    what is not the Prefect API, an object-store endpoint over HTTP or a socket such as a
    scheduler's, keep the plain line while ``PREFECT_API_URL`` names a dead API; the same
    refusal of a request to that API is said as the API's."""
    import httpx
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli_report import failure_line

    def met(call) -> BaseException:
        with pytest.raises(Exception) as caught:
            call()
        return caught.value

    with temporary_settings(updates={PREFECT_API_URL: DEAD_API}):
        for exc in (met(lambda: httpx.get("http://127.0.0.1:1/bucket/s.zarr/zarr.json")),
                    met(lambda: httpx.get("http://127.0.0.1:9/apis/other")),
                    met(lambda: socket.create_connection(("127.0.0.1", 9), timeout=5))):
            line, code = failure_line("label", exc)
            assert "Prefect" not in line and code == 2, line
            assert line.endswith("Connection refused; check the path and rerun"), line
        line, code = failure_line("main", met(lambda: httpx.get(f"{DEAD_API}/health")))
    assert line.startswith(f"actstore main: error: the Prefect API at {DEAD_API} "), line
    assert "--no-prefect" not in line and code == 2, line    # main runs only as a flow


def test_main_needs_prefect(capsys):
    assert "main runs as one Prefect flow" in _refused(capsys, ["--no-prefect", "main"])


# ---- no temporary Prefect server outlives its command ----

def test_kill_minus_9_leaves_no_prefect_server(tmp_path):
    import psutil

    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--quiet", "materialize", "--model",
         "tiny-random", "--prompts", DEMO, "--store", str(tmp_path / "k.zarr"),
         "--steps", "500"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    server = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            server = _up_server(psutil.Process(proc.pid))
            if server is not None:
                break
            time.sleep(0.2)
        assert server is not None, f"no temporary server seen: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        while time.time() < deadline and _alive(server):
            time.sleep(0.2)
        assert not _alive(server), "the temporary Prefect server outlived its command"
    finally:
        if proc.poll() is None:
            proc.kill()
        if server is not None and _alive(server):
            server.kill()


def _up_server(cli):
    """The command's guarded server once it answers on its port, else None."""
    for child in cli.children():
        try:
            cmd = child.cmdline()
        except Exception:
            continue
        if "flows.parent_watch" in cmd and "--port" in cmd:
            port = int(cmd[cmd.index("--port") + 1])
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return None
            return child
    return None


def _alive(proc) -> bool:
    import psutil
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

