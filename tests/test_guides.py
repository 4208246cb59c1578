"""Commands of the guides in docs/ run as written, in both modes, on the small reference
store (the README's own commands are tests/test_readme.py's): what they print is what the
guides say they do."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import DEMO, REPO, TINY
from flows.cli import main

MODES = {"no-prefect": ["--no-prefect"], "prefect": [], "prefect, 1 worker": []}


@pytest.mark.parametrize("mode", list(MODES))
def test_capture_adds_kinds_and_says_so(mode, tiny_store, tmp_path, request, capfd):
    """docs/capture-points.md: `actstore materialize --capture attn1,block,...` on a stored
    model regenerates its blocks and adds the kinds. The summary said '16 images generated
    in 0 blocks (0 blocks already stored)': every block was added to, none generated."""
    store = str(tmp_path / "s.zarr")
    shutil.copytree(tiny_store, store)
    if mode != "no-prefect":
        request.getfixturevalue("prefect_harness")
    workers = ["--workers", "1"] if "worker" in mode else []
    argv = ["materialize", "--store", store, "--model", "tiny-random", "--prompts", DEMO,
            "--steps", str(TINY["steps"]), "--capture", "attn1,block", *workers]
    assert main([*MODES[mode], "--quiet", *argv]) == 0
    out = capfd.readouterr().out
    assert ": trained: 0 images generated in 0 blocks, 16 regenerated and checked to add " \
           "capture kinds to 4 stored blocks (0 blocks already stored)" in out, out
    assert main([*MODES[mode], "--quiet", *argv]) == 0      # a rerun: everything is stored
    out = capfd.readouterr().out
    assert "0 images generated in 0 blocks (4 blocks already stored)" in out, out


@pytest.mark.parametrize("mode", ["no-prefect", "prefect"])
def test_verify_names_a_batch_size_other_than_the_blocks(mode, tiny_store, tmp_path, request,
                                                         capfd):
    """docs/capture-points.md: `actstore verify ... --batch-size N` is bit for bit for
    certain only if N is the one the block was made with. When a block was not reproduced
    with another N, the line said 'the store and this machine's generation differ', blaming
    the store for the option; it now names the blocks' own batch size (the mismatch is
    planted, a stored byte changed: whether 2 and 4 round alike depends on the CPU). Writes
    nothing either way."""
    from conftest import plant_a_mismatch, tree_digest

    if mode == "prefect":
        request.getfixturevalue("prefect_harness")
    store = str(shutil.copytree(tiny_store, tmp_path / "planted.zarr"))
    plant_a_mismatch(store)
    before, kept = tree_digest(store), tree_digest(tiny_store)
    argv = [*MODES[mode], "--quiet", "verify", "--store", store, "--images", "0:4"]
    assert main([*argv, "--batch-size", "2"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its blocks were made 4 images per UNet call, not " \
                             "--batch-size 2" in err[0] and "generation differ" not in err[0], err
    assert main([*argv, "--batch-size", str(TINY["batch_size"])]) == 2   # the store's own
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "generation differ" in err[0] and "UNet call" not in err[0], err
    argv[argv.index(store)] = tiny_store
    assert main([*argv, "--batch-size", str(TINY["batch_size"])]) == 0
    assert "4/4 images of trained reproduced (bitwise)" in capfd.readouterr().out
    assert (tree_digest(store), tree_digest(tiny_store)) == (before, kept)


@pytest.fixture(scope="module")
def kinds_store(tmp_path_factory, tiny_model, tiny_store) -> str:
    """The reference store as the main job leaves its store: block and vae points beside
    attn1, labels and a salient probe run over an attn1, a block and the vae point."""
    from actstore.generation.materialize import MaterializeSettings, materialize
    from actstore.generation.sampling import GenerationConfig
    from actstore.label.labels import write_labels
    from actstore.probe.runs import run_probes

    uri = str(tmp_path_factory.mktemp("kinds") / "store.zarr")
    shutil.copytree(tiny_store, uri)
    materialize(tiny_model, DEMO, uri,
                MaterializeSettings(gen=GenerationConfig(steps=TINY["steps"]),
                                    batch_size=TINY["batch_size"],
                                    block_size=TINY["block_size"]).with_options(
                    kinds=("attn1", "block", "vae")), progress=False)
    write_labels(uri, "toyworld", ["salient"], progress=False)
    run_probes(uri, "salient", layers=["up_blocks.3.attentions.0",
                                       "block/up_blocks.3.attentions.0",
                                       "vae/decoder.mid_block.attentions.0"],
               steps=[0], scheduler="threads", progress=False)
    return uri


def _bench(script: str, *args: str) -> subprocess.CompletedProcess:
    """A benchmark as benchmarks/README.md runs it: from the repository root."""
    return subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_store_write_bench_on_a_store_with_capture_kinds(kinds_store):
    """benchmarks/README.md: `bench_store_write.py --store runs/main/store.zarr ...` took
    every layer of the store, and since the main job captures block and vae too, the
    names `block/...` sent numpy.save into a folder that did not exist (a traceback)."""
    done = _bench("bench_store_write.py", "--store", kinds_store, "--block", "4", "--mb", "4",
                  "--repeats", "1", "--codecs", "zstd")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "33 layers" in done.stdout and "/ numpy.save" in done.stdout, done.stdout
    for writer in ("npy", "store", "bound"):
        assert re.search(rf"^\s+{writer}\s+cached", done.stdout, re.M), (writer, done.stdout)


def test_interventions_bench_on_a_store_with_a_vae_probe(kinds_store):
    """benchmarks/README.md: `bench_interventions.py --store runs/main/store.zarr --target
    salient ...` edited every layer of the probe run by default, the VAE decoder's
    included, which no edit reaches: it stopped in a traceback ('the VAE decoder takes no
    part in denoising'). Its default is now the run's UNet layers."""
    done = _bench("bench_interventions.py", "--store", kinds_store, "--target", "salient",
                  "--provider", "toyworld", "--images", "demo-012", "--n-targets", "1",
                  "--repeats", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 layers × steps [0]" in done.stdout, done.stdout
    assert re.search(r"^gradient/projection: wall", done.stdout, re.M), done.stdout


def test_int8_gram_bench_keeps_its_bound_and_lambda():
    """benchmarks/README.md (2026-12-06): `bench_gram_int8.py` backs "measured, not kept"
    for Gram products on the int8 units. Its int8 route must stay within the error bound
    the README derives (the script exits non-zero otherwise) and choose the float32
    route's λ on the planted problem, or the notes' accuracy figures are stale. Without
    timings (``--repeats 0``): on a CPU without int8 matrix units (an AMD EPYC) the timed
    routes took 7 of this test's 8 minutes, and timings are the benchmark's, not a test's."""
    done = _bench("bench_gram_int8.py", "--shapes", "8x8x1280", "--repeats", "0",
                  "--planted", "320")
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^8x8x1280: task of 6400 tokens", done.stdout, re.M), done.stdout
    lam = re.search(r"float32 \(([\d.e+-]+), .*int8 \(([\d.e+-]+),", done.stdout)
    assert lam and lam.group(1) == lam.group(2), done.stdout


@pytest.mark.parametrize("mode", ["no-prefect", "prefect"])
@pytest.mark.parametrize("json_out", [False, True])
def test_a_reader_that_stops_early_is_no_failure(mode, json_out, explore_store):
    """`actstore show --store S | head -1`, the way one looks at a store's first line:
    head closes the pipe, and the command printed a BrokenPipeError traceback, exit 1.
    Now nothing on stderr, exit 0 (the command's work is done; the reader had enough)."""
    cmd = [sys.executable, "-m", "flows.cli", *MODES[mode], *(["--json"] if json_out else []),
           "show", "--store", explore_store]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    proc.stdout.close()                      # the reader is gone before the first line
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0 and err == "", err


@pytest.mark.parametrize("module", ["persistence", "reach"])
def test_diagnostics_help_explains_every_option(module):
    """docs/interventions.md's `python -m actstore.intervene.persistence --store S
    --probe-run R --layers … --steps … --strength …` and `... reach --store S`: run by
    hand, so their --help is what a user reads (persistence listed ten options, none
    explained, as the actstore commands' own test demands of theirs)."""
    import importlib

    parser = importlib.import_module(f"actstore.intervene.{module}").build_parser()
    bare = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not bare, f"python -m actstore.intervene.{module}: options without help: {bare}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_to_a_section_find_it():
    """A guide's `file.md#section` link lands on that heading: benchmarks/README.md sent
    readers to results.md#interventions-on-the-toy-model after the heading had grown
    ': where the representation drives the image' (the page opened at its top)."""
    guides = [REPO / "README.md", REPO / "benchmarks" / "README.md",
              *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "models").glob("*/README.md"))]
    broken = []
    for guide in guides:
        for path, anchor in re.findall(r"\]\(([^)\s#]*)#([^)\s]+)\)", guide.read_text()):
            target = guide.parent / path if path else guide
            headings = re.findall(r"^#+ (.*)$", target.read_text(), re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(f"{guide.relative_to(REPO)}: {path}#{anchor}")
    assert not broken, broken
