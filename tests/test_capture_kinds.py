"""Capture kinds in a store: made at creation or added later, checked, verified, read."""

from __future__ import annotations

import contextlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from actstore.errors import ActstoreError
from actstore.generation.materialize import (MaterializeSettings, completion,
                                             format_completion, materialize)
from actstore.generation.sampling import GenerationConfig
from actstore.store.view import open_store
from conftest import DEMO, TINY, cli, plant_a_mismatch, store_arrays, tree_digest
from test_store import SD_LAYERS

ADD = ("attn1", "resnet")
GEN = GenerationConfig(steps=TINY["steps"])
BASE = MaterializeSettings(gen=GEN, batch_size=TINY["batch_size"], block_size=TINY["block_size"])
LEGACY = Path(__file__).parent / "data" / "legacy-store-v1.zip"


def _mat(model, prompts: str, uri: str, images: str | None = None, **options) -> dict:
    """materialize with the reference store's settings and ``options`` (kinds=, x0=, ...)."""
    return materialize(model, prompts, uri, BASE.with_options(**options), images=images,
                       progress=False)


def _copy(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, tiny_model) -> str:
    """A store made with attn1 and resnet from the start."""
    uri = str(tmp_path_factory.mktemp("fresh") / "s.zarr")
    _mat(tiny_model, DEMO, uri, kinds=ADD)
    return uri


@pytest.fixture(scope="module")
def added(tmp_path_factory, tiny_model, tiny_store) -> dict:
    """The attn1 reference store with resnet added afterwards."""
    uri = _copy(tiny_store, tmp_path_factory.mktemp("added") / "s.zarr")
    before = tree_digest(uri)
    summary = _mat(tiny_model, DEMO, uri, kinds=ADD)
    return {"uri": uri, "before": before, "summary": summary}


def test_adding_resnet_leaves_stored_files_and_equals_a_fresh_store(added, fresh):
    after = tree_digest(added["uri"])
    assert {k: after[k] for k in added["before"]} == added["before"]   # checksums unchanged
    new = set(after) - set(added["before"])
    assert new and all(k.startswith(("models/trained/layers/resnet/",
                                     "models/trained/captures/")) for k in new), sorted(new)[:5]
    s = added["summary"]
    assert (s["blocks_written"], s["blocks_added_to"], s["regenerated_and_checked"]) == (0, 4, 16)
    got, want = store_arrays(added["uri"]), store_arrays(fresh)
    assert got.keys() == want.keys()
    assert sum(k.startswith("layers/resnet/") for k in got) == 22
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_layout_names_kind_and_module(added, fresh):
    for uri in (added["uri"], fresh):
        view = open_store(uri)
        assert view.kinds == ["attn1", "resnet"]
        assert view.layers[:16] == SD_LAYERS and len(view.layers) == 16 + 22
        da = view["resnet/up_blocks.3.resnets.2"]
        assert da.dims == ("image", "step", "y", "x", "channel") and da.shape == (16, 4, 8, 8, 32)
        assert da.attrs["kind"] == "resnet" and da.attrs["module"] == "unet.up_blocks.3.resnets.2"
    fp = open_store(fresh).attrs["fingerprint"]
    assert fp["capture"]["kinds"] == ["attn1", "resnet"]
    assert fp["points"]["resnet/mid_block.resnets.1"] == {"kind": "resnet",
                                                          "module": "unet.mid_block.resnets.1"}
    group = zarr.open_group(added["uri"], path="models/trained/captures/resnet", mode="r")
    kept = group.attrs["actstore_capture"]["fingerprint"]
    assert kept["kind"] == "resnet" and len(kept["layers"]) == 22
    assert kept["points"]["resnet/down_blocks.0.resnets.0"]["module"] == \
        "unet.down_blocks.0.resnets.0"


def test_rerun_keeps_the_store_kinds(added, tiny_model):
    before = tree_digest(added["uri"])
    again = _mat(tiny_model, DEMO, added["uri"])      # no --capture
    assert again["kinds"] == list(ADD) and again["blocks_written"] == 0
    assert again["blocks_added_to"] == 0 and tree_digest(added["uri"]) == before


def test_half_added_kind_is_invisible(tiny_store, tiny_model, tmp_path):
    uri = _copy(tiny_store, tmp_path / "half.zarr")
    _mat(tiny_model, DEMO, uri, images="0:8", kinds=ADD)
    view = open_store(uri)
    assert view.kinds == ["attn1"] and view.pending == {"resnet": (2, 4)}
    with pytest.raises(ActstoreError, match="'resnet' is still being added .2 of 4 blocks"):
        view["resnet/mid_block.resnets.0"]
    # the run's last line says so: it said 'complete (trained 16/16 images)' before
    counts = completion(uri)
    assert counts["trained"] == {"complete": 16, "images": 16, "adding": {"resnet": [2, 4]}}
    assert format_completion(uri, counts) == (f"store {uri}: INCOMPLETE (trained 16/16 "
                                              "images, adding resnet 2/4 blocks)")
    _mat(tiny_model, DEMO, uri, kinds=ADD)
    assert format_completion(uri, completion(uri)) == \
        f"store {uri}: complete (trained 16/16 images)"


@pytest.mark.parametrize("position", [1, 6])
def test_regeneration_check_refuses_a_changed_seed(tiny_store, tmp_path, capsys, position):
    """A seed that no longer matches its stored image (first block, or a later one after
    an earlier block was already added): ``materialize --capture`` exits 2 with one line,
    the store left as it was."""
    import re

    from flows.cli import main

    uri = _copy(tiny_store, tmp_path / "tampered.zarr")
    seeds = zarr.open_array(uri, path="images/seed", mode="r+")
    seeds[position] = int(seeds[position]) + 1
    before = tree_digest(uri)
    code = main(["--no-prefect", "--quiet", "materialize", "--model", "tiny-random",
                 "--prompts", DEMO, "--store", uri, "--steps", str(TINY["steps"]),
                 "--batch-size", str(TINY["batch_size"]), "--capture", ",".join(ADD)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("actstore")]
    assert code == 2 and len(err) == 1, err       # (weight-loading bars aside)
    assert re.search(rf"regeneration check: image 'demo-00{position}' "
                     rf"\(store position {position}\).*nothing is added", err[0]), err[0]
    assert tree_digest(uri) == before


def test_a_changed_seed_in_the_prompt_table_is_refused(tiny_store, tiny_model, tmp_path):
    import pandas as pd

    table = pd.read_csv(DEMO)
    table.loc[2, "seed"] += 1
    table.to_csv(tmp_path / "changed.csv", index=False)
    uri = _copy(tiny_store, tmp_path / "s.zarr")
    before = tree_digest(uri)
    with pytest.raises(ActstoreError, match="different prompt table"):
        _mat(tiny_model, str(tmp_path / "changed.csv"), uri, kinds=ADD)
    assert tree_digest(uri) == before


def test_a_different_model_is_refused(tiny_store, tmp_path):
    from actstore.generation.models import load_model

    other = load_model("tiny-random", device="cpu")
    with __import__("torch").no_grad():
        other.unet.conv_in.weight.add_(1e-3)
    uri = _copy(tiny_store, tmp_path / "other.zarr")
    before = tree_digest(uri)
    with pytest.raises(ActstoreError, match="another model or config .weights_sha256"):
        _mat(other, DEMO, uri, kinds=ADD)
    assert tree_digest(uri) == before


def test_verify_says_what_it_counted(tiny_store, tmp_path, capfd):
    """`actstore verify` of 4 images of a store with both variants said '8/8 images
    reproduced', as if it had checked 8 images: a row is an image of one variant."""
    from flows.cli import main

    uri = _copy(tiny_store, tmp_path / "both.zarr")
    made = cli("materialize", "--store", uri, "--model", "tiny-random", "--prompts", DEMO,
               "--steps", str(TINY["steps"]), "--control", "randomized", "--images", "0:4")
    assert made.returncode == 0, made.stderr
    capfd.readouterr()
    assert main(["--no-prefect", "--quiet", "verify", "--store", uri, "--images", "0:4"]) == 0
    out = capfd.readouterr().out
    said = "4/4 images of trained, 4/4 of randomized reproduced"
    assert out.startswith(f"{uri}: {said} (bitwise)\n"), out
    assert out.rstrip().endswith(f"\n{said}"), out       # the table's last line


def test_verify_reports_per_image(tiny_store, tmp_path):
    uri = _copy(tiny_store, tmp_path / "v.zarr")
    ok = cli("verify", "--store", uri, "--images", "0:8")
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout[:ok.stdout.index("\n}") + 2])
    assert (result["images"], result["reproduced"], result["comparison"]) == (8, 8, "bitwise")
    seeds = zarr.open_array(uri, path="images/seed", mode="r+")
    seeds[5] = int(seeds[5]) + 1
    before = tree_digest(uri)
    bad = cli("verify", "--store", uri, "--images", "4:8")
    err = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(err) == 1, bad.stderr
    assert "1 of 4 images not reproduced (trained:demo-005)" in err[0]
    rows = [line.split() for line in bad.stdout.splitlines() if line.startswith("trained")]
    assert [r[1] for r in rows if "DIFF" in r] == ["demo-005"] and len(rows) == 4
    assert tree_digest(uri) == before


def test_bitwise_only_with_the_store_cpu_kernels(tiny_store):
    """Kernels of other instruction sets round differently (the legacy store below was made
    on another CPU): a store made here is compared bit for bit, one made with other CPU
    kernels, one that does not record them, or a run on CUDA to the loose rule."""
    from actstore.generation.regenerate import cpu_kernels, images_match, is_exact
    from actstore.store import core as st

    attrs = st.model_attrs(tiny_store, "trained")
    assert attrs["cpu_kernels"] == cpu_kernels() and is_exact(attrs, "cpu")
    assert not is_exact({**attrs, "cpu_kernels": "AVX2/x86_64/000000000000"}, "cpu")
    assert not is_exact({k: v for k, v in attrs.items() if k != "cpu_kernels"}, "cpu")
    assert not is_exact(attrs, "cuda:0") and not is_exact({**attrs, "device": "cuda"}, "cpu")
    one_level = np.array([1, 0])
    assert images_match(one_level, True).tolist() == [False, True]
    assert images_match(one_level, False).all() and not images_match(np.array([3]), False)[0]


def test_verify_a_store_with_its_randomized_control(tiny_model, tmp_path):
    """Both variants, as the README's materialize lines leave the store `verify` reads: the
    control's permutation of the loaded model must not reach the trained variant."""
    from actstore.generation.models import apply_control, load_model
    from actstore.generation.regenerate import verify

    uri = str(tmp_path / "both.zarr")
    _mat(tiny_model, DEMO, uri, images="0:4", steps=2)
    _mat(apply_control(load_model("tiny-random", device="cpu"), "randomized"), DEMO, uri,
         images="0:4", steps=2)
    result = verify(uri, images="0:4", progress=False)
    assert (result["images"], result["reproduced"], result["comparison"]) == (8, 8, "bitwise")
    assert {r["model"] for r in result["rows"]} == {"trained", "randomized"}


@contextlib.contextmanager
def _images_per_unet_call():
    """The number of images of every generating UNet call made inside (a CFG call takes
    each twice; a call of one sample is the capture points' shape probe): the batch size a
    block is regenerated with, seen where it acts, on any machine."""
    import torch
    from diffusers import UNet2DConditionModel

    seen: list[int] = []

    def count(module, args):
        if isinstance(module, UNet2DConditionModel) and args[0].shape[0] > 1:
            seen.append(args[0].shape[0] // 2)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        yield seen
    finally:
        hook.remove()


def _error_line(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("actstore")]


def test_blocks_regenerate_with_their_own_batch_size(tiny_model, tmp_path, capsys):
    """A batch of 2 and one of 4 may round differently (they did on the Intel CPUs this
    suite first ran on, not on every CPU), so a block made with 2 is reproduced bit for bit
    for certain only with 2: verify takes it from the block's record; a failure with
    --batch-size overriding it names it; a block recorded before batch sizes were says to
    pass it; a kind added to the block later equals the kind made with it at creation.
    Failures are planted (a stored byte changed) so that every machine sees them."""
    from actstore.generation.regenerate import recorded_batch_size, verify
    from actstore.store import commit
    from flows.cli import main

    uri = str(tmp_path / "b2.zarr")
    _mat(tiny_model, DEMO, uri, images="0:4", steps=2, batch_size=2)
    assert recorded_batch_size(uri, "trained", 0, 4) == 2
    with _images_per_unet_call() as calls:
        own = verify(uri, images="0:4", progress=False)
    assert own["reproduced"] == 4 and set(calls) == {2}, (own["not_reproduced"], calls)
    assert (own["recorded_batch_sizes_overridden"], own["blocks_without_batch_size"]) == ([], 0)
    four = str(tmp_path / "b4.zarr")     # this CPU's rounding, measured: 4 per call from scratch
    _mat(tiny_model, DEMO, four, images="0:4", steps=2, batch_size=4)
    made2, made4 = store_arrays(uri), store_arrays(four)
    same = made2.keys() == made4.keys() and all(np.array_equal(made2[k], made4[k])
                                                for k in made2)
    with _images_per_unet_call() as calls:
        other = verify(uri, images="0:4", batch_size=4, progress=False)
    assert set(calls) == {4} and other["recorded_batch_sizes_overridden"] == [2], calls
    assert (other["reproduced"] == 4) == same, (other["not_reproduced"], same)

    planted = _copy(uri, tmp_path / "planted.zarr")
    plant_a_mismatch(planted)
    before = tree_digest(planted)
    argv = ["--no-prefect", "--quiet", "verify", "--store", planted, "--images", "0:4"]
    assert main([*argv, "--batch-size", "4"]) == 2
    err = _error_line(capsys)
    assert len(err) == 1 and "its blocks were made 2 images per UNet call, not --batch-size " \
        "4" in err[0] and "generation differ" not in err[0], err
    assert main(argv) == 2          # regenerated with its own: the store's fault, said so
    err = _error_line(capsys)
    assert len(err) == 1 and "the store and this machine's generation differ" in err[0], err
    assert "UNet call" not in err[0] and "record no batch size" not in err[0], err
    assert tree_digest(planted) == before

    old = _copy(uri, tmp_path / "old.zarr")
    record = commit.block_record(old, "models/trained", 0, 4)
    del record["batch_size"]
    commit.write_block_record(old, "models/trained", 0, 4, record)
    argv = ["--no-prefect", "--quiet", "verify", "--store", old, "--images", "0:4"]
    with _images_per_unet_call() as calls:
        code = main(argv)                 # 4 per call, as before batch sizes were recorded
    assert set(calls) == {4} and code == (0 if same else 2), (calls, code, same)
    capsys.readouterr()
    assert main([*argv, "--batch-size", "2"]) == 0
    bad = _copy(old, tmp_path / "bad.zarr")
    plant_a_mismatch(bad)
    before = tree_digest(bad)
    argv = ["--no-prefect", "--quiet", "verify", "--store", bad, "--images", "0:4"]
    assert main(argv) == 2
    err = _error_line(capsys)                                            # (bars aside)
    assert len(err) == 1 and "1 blocks record no batch size" in err[0], err
    assert "pass the store's --batch-size" in err[0]
    assert main([*argv, "--batch-size", "2"]) == 2            # given: no hint to give it
    err = _error_line(capsys)
    assert len(err) == 1 and "record no batch size" not in err[0], err
    assert tree_digest(bad) == before
    with pytest.raises(ActstoreError, match="records none .made before 2026-12-05., so pass "
                                            "the --batch-size it was made with"):
        _mat(tiny_model, DEMO, bad, images="0:4", steps=2, batch_size=2, kinds=ADD)
    _mat(tiny_model, DEMO, old, images="0:4", steps=2, batch_size=2, kinds=ADD)
    made = str(tmp_path / "made.zarr")
    _mat(tiny_model, DEMO, made, images="0:4", steps=2, batch_size=2, kinds=ADD)
    with _images_per_unet_call() as calls:
        _mat(tiny_model, DEMO, uri, images="0:4", steps=2, batch_size=4, kinds=ADD)  # added
    assert set(calls) == {2}, calls
    added, together = store_arrays(uri), store_arrays(made)
    resnet = [k for k in together if "resnet" in k]
    assert resnet and all(np.array_equal(added[k], together[k]) for k in resnet)


def test_verify_refuses_another_model(tiny_store, tmp_path):
    from actstore.generation.regenerate import verify
    from sd14 import sd14_folder

    with pytest.raises(ActstoreError, match="is not the one store .* was made with"):
        verify(tiny_store, model=sd14_folder(), images="0:4", progress=False)


def test_bad_capture_kind_is_one_line(tmp_path):
    uri = str(tmp_path / "none.zarr")
    out = cli("materialize", "--store", uri, "--model", "tiny-random", "--prompts", "demo",
              "--capture", "attn1,conv")
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1 and "unknown kind 'conv'" in err[0], err
    assert not Path(uri).exists()


def test_vae_source_without_the_vae_kind_is_one_line(tiny_store, tmp_path):
    """`materialize --vae-source x0` without the vae kind was accepted and stored nothing
    of it (a new store, or an existing one, made as if the option were not there)."""
    new = str(tmp_path / "none.zarr")
    made = ["--model", "tiny-random", "--prompts", DEMO, "--steps", str(TINY["steps"]),
            "--vae-source", "x0"]
    for uri, capture in ((new, []), (new, ["--capture", "attn1,block"]),
                         (_copy(tiny_store, tmp_path / "old.zarr"), [])):
        before = tree_digest(uri) if Path(uri).exists() else None
        out = cli("materialize", "--store", uri, *made, *capture)
        err = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("actstore")]
        assert out.returncode == 2 and len(err) == 1, out.stderr
        assert "--vae-source x0: only the vae capture kind" in err[0], err
        assert f"--capture {capture[1] if capture else 'attn1'},vae" in err[0], err
        assert (tree_digest(uri) == before) if before else not Path(uri).exists()


def test_a_catalog_vae_source_without_the_vae_kind_names_the_catalog(tmp_path):
    """A catalog store with vae_source x0 and no vae kind was refused as if the user had
    typed it: '--vae-source x0: ...; add --capture attn1,vae or drop --vae-source', to a
    command that gave no --vae-source and could not drop it. The line now names the
    catalog store and the ways on; nothing is created."""
    catalog = tmp_path / "catalog.yaml"
    uri = tmp_path / "x0.zarr"
    catalog.write_text(f"""version: 1
models:
  tiny-random:
    builtin: tiny-random
prompt_sets:
  demo:
    path: {DEMO}
stores:
  x0store:
    uri: {uri}
    model: tiny-random
    prompts: demo
    steps: {TINY["steps"]}
    vae_source: x0
""")
    out = cli("--catalog", str(catalog), "materialize", "--store", "x0store")
    err = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("actstore")]
    assert out.returncode == 2 and len(err) == 1, out.stderr
    assert "catalog store 'x0store' sets vae_source x0: only the vae capture kind" in err[0]
    assert "add --capture attn1,vae, or remove its vae_source" in err[0], err
    assert "drop --vae-source" not in err[0], err
    assert not uri.exists()


def test_other_vae_source_is_refused(tiny_store, tiny_model, tmp_path):
    uri = _copy(tiny_store, tmp_path / "vae.zarr")
    _mat(tiny_model, DEMO, uri, images="0:4", kinds=("attn1", "vae"))
    before = tree_digest(uri)
    with pytest.raises(ActstoreError, match="'vae' of model 'trained' was added with other "
                                            "settings .vae_source: store has .latent., this run has .x0."):
        _mat(tiny_model, DEMO, uri, images="4:8", kinds=("attn1", "vae"), vae_source="x0")
    assert tree_digest(uri) == before


def test_vae_point_at_the_last_step_is_the_final_decode(tiny_model, tmp_path):
    """The vae kind decodes each step's updated latent: at the last step the very latent
    the final image is decoded from, so it equals a hook on that decode."""
    from actstore.generation.points import hooks
    from actstore.generation.sampling import generate

    uri = str(tmp_path / "vae.zarr")
    _mat(tiny_model, DEMO, uri, images="0:4", kinds=("attn1", "vae"))
    name = "vae/decoder.mid_block.attentions.0"
    seen = []
    rows = open_store(uri).images
    with hooks(tiny_model, [name], lambda n, t: seen.append(t.clone())):
        generate(tiny_model, [str(p) for p in rows["prompt"].values],
                 [int(s) for s in rows["seed"].values], GEN)
    stored = open_store(uri)[name].isel(step=-1).values          # (image, y, x, C) float16
    expect = seen[-1].numpy().reshape(stored.shape).astype(np.float16)
    np.testing.assert_array_equal(stored, expect)
    early = open_store(uri)[name].isel(step=0).values
    assert not np.array_equal(early, stored)


def test_legacy_store_reads_extends_and_takes_new_kinds(tiny_model, tmp_path):
    """A store written by the code before capture kinds (schema 1, attn1 only; made with
    4 images, 2 steps, no x0): read as before, extended, given resnet."""
    uri = str(tmp_path / "legacy.zarr")
    with zipfile.ZipFile(LEGACY) as z:
        z.extractall(uri)
    old = zarr.open_group(uri, path="models/trained", mode="r").attrs["actstore_model"]
    assert "kinds" not in old["fingerprint"]["capture"]
    ref = str(tmp_path / "ref.zarr")
    _mat(tiny_model, DEMO, ref, images="0:8", steps=2, x0=False)
    view = open_store(uri)
    assert view.layers == SD_LAYERS and view.kinds == ["attn1"]
    stored = view["mid_block.attentions.0"].values
    fresh = open_store(ref)["mid_block.attentions.0"]
    # The zip was written on another CPU: torch picks its kernels by instruction set, so
    # activations agree to float16 rounding, not bit for bit (the regeneration check
    # compares the final uint8 images, which must still match exactly below).
    np.testing.assert_allclose(stored, fresh.isel(image=slice(0, 4)).values,
                               rtol=2e-3, atol=1e-3)
    more = _mat(tiny_model, DEMO, uri, images="0:8", steps=2, x0=False)
    assert (more["blocks_written"], more["blocks_skipped"]) == (1, 1)
    add = _mat(tiny_model, DEMO, uri, images="0:8", steps=2, x0=False, kinds=ADD)
    assert add["blocks_added_to"] == 2
    now = zarr.open_group(uri, path="models/trained", mode="r").attrs["actstore_model"]
    assert now["fingerprint"] == old["fingerprint"]
    view = open_store(uri)
    assert view.kinds == ["attn1", "resnet"]
    now_attn1 = view["mid_block.attentions.0"].values
    np.testing.assert_array_equal(now_attn1[:4], stored)  # the legacy blocks untouched
    np.testing.assert_array_equal(now_attn1[4:], fresh.isel(image=slice(4, 8)).values)


@pytest.fixture(scope="module")
def planted_kinds(tmp_path_factory, tiny_model, tiny_store) -> dict:
    """block, resnet and vae added to the attn1 store; labels planted as a linear map of a
    residual-stream point's step-2 activations, probed on block and resnet arrays."""
    from actstore.label.labels import write_labels
    from actstore.probe.runs import run_probes

    root = tmp_path_factory.mktemp("kinds-grid")
    uri = _copy(tiny_store, root / "s.zarr")
    _mat(tiny_model, DEMO, uri, kinds=("block", "resnet", "vae"))
    view = open_store(uri)
    x = view["block/up_blocks.3.attentions.0"].isel(step=2).values.astype(np.float32)
    rng = np.random.default_rng(1)
    y = x @ rng.normal(size=x.shape[-1]).astype(np.float32)
    y += 0.2 * y.std() * rng.normal(size=y.shape).astype(np.float32)
    full = np.kron(y, np.ones((1, 8, 8), np.float32))           # 8x8 grid → 64 px
    np.savez(root / "y.npz", image_id=view.images["image"].values.astype(str), depth=full,
             salient=(full > np.median(full)).astype(np.float32))
    layers = ["block/up_blocks.3.attentions.0", "resnet/up_blocks.3.resnets.2"]
    runs = {}
    for target in ("depth", "salient"):
        write_labels(uri, f"array:{root / 'y.npz'}", target, progress=False)
        runs[target] = run_probes(uri, target, layers=layers, steps=[2], scheduler="threads",
                                  progress=False)
    return {"uri": uri, "layers": layers, "runs": runs}


@pytest.mark.parametrize("layer", ["block/up_blocks.3.attentions.0",
                                   "resnet/up_blocks.3.resnets.2"])
def test_probe_grid_on_block_and_resnet_matches_sklearn(planted_kinds, layer):
    from sklearn.linear_model import LogisticRegression, Ridge

    from actstore.label.labels import open_labels
    from actstore.probe.runs import load_probe

    uri = planted_kinds["uri"]
    view = open_store(uri)
    train = view.images["split"].values == "train"
    X = view[layer].isel(step=2).values.astype(np.float64)[train]
    X = X.reshape(-1, X.shape[-1])
    gram = np.trace((X - X.mean(0)).T @ (X - X.mean(0))) / X.shape[1]   # the solver's λ unit
    y = open_labels(uri, "depth")["r8"].values[train].reshape(-1)
    probe = load_probe(uri, planted_kinds["runs"]["depth"], layer)
    ref = Ridge(alpha=probe["lam"][0] * gram).fit(X, y)
    np.testing.assert_allclose(probe["weights"][0], ref.coef_, rtol=1e-3,
                               atol=1e-3 * np.abs(ref.coef_).max())
    assert abs(probe["bias"][0] - ref.intercept_) < 1e-3
    m = (open_labels(uri, "salient")["r8"].values[train].reshape(-1) > 0.5).astype(int)
    probe = load_probe(uri, planted_kinds["runs"]["salient"], layer)
    assert probe["solver"] == "logistic"
    ref = LogisticRegression(C=1 / (probe["lam"][0] * gram), tol=1e-10, max_iter=10000).fit(X, m)
    theirs = ref.decision_function(X)
    np.testing.assert_allclose(X @ probe["weights"][0] + probe["bias"][0], theirs,
                               rtol=1e-3, atol=1e-3 * np.abs(theirs).max())


def test_summary_and_figure_per_kind(planted_kinds, tmp_path):
    from actstore.plots.figures import kind_comparison
    from actstore.probe.emergence import format_table, summary_table
    from actstore.probe.runs import open_emergence

    rows = summary_table(open_emergence(planted_kinds["uri"]))
    assert [(r["target"], r["kind"]) for r in rows] == [
        ("depth", "block"), ("depth", "resnet"), ("salient", "block"), ("salient", "resnet")]
    assert rows[0]["best_layer"] == "block/up_blocks.3.attentions.0"
    assert " kind " in format_table(rows).splitlines()[0]
    png = kind_comparison(planted_kinds["uri"], str(tmp_path / "kinds.png"))
    assert Path(png).stat().st_size > 10_000


def test_kill_minus_9_while_adding_then_rerun_is_identical(tiny_store, fresh, tmp_path):
    import signal
    import time

    from actstore.store.core import completed_blocks_at
    from test_resume import ARGS, _popen

    uri = _copy(tiny_store, tmp_path / "killed.zarr")
    stored = tree_digest(uri)
    group = "models/trained/captures/resnet"
    proc = _popen(uri, "--capture", "attn1,resnet")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if Path(uri, group).exists() and completed_blocks_at(uri, group):
            break
        time.sleep(0.05)
    time.sleep(0.3)              # the next block mid-generation or mid-write
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(completed_blocks_at(uri, group))
    assert open_store(uri).kinds == (["attn1", "resnet"] if done == 4 else ["attn1"])
    rerun = cli("materialize", "--store", uri, *ARGS, "--capture", "attn1,resnet")
    assert rerun.returncode == 0, rerun.stderr
    assert f'"blocks_added_to": {4 - done}' in rerun.stdout
    after = tree_digest(uri)
    assert {k: after[k] for k in stored} == stored
    got, want = store_arrays(uri), store_arrays(fresh)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_interventions_edit_a_residual_stream_point(planted_kinds, tiny_model, tmp_path):
    """The intervention experiment takes a block point by name, like an attn1 layer; a VAE
    point, which denoising never runs, is refused."""
    from actstore.intervene.run import run_interventions
    from actstore.intervene.settings import InterventionSettings
    from conftest import PixelLabels

    uri = _copy(planted_kinds["uri"], tmp_path / "iv.zarr")
    run = planted_kinds["runs"]["depth"]
    base = InterventionSettings(steps=(2,), images=("demo-012", "demo-013"), n_targets=1,
                                provider=PixelLabels())
    kw = {"model": tiny_model, "progress": False}
    out = run_interventions(uri, run, base.with_(layers=("block/up_blocks.3.attentions.0",)),
                            **kw)
    assert out["complete"] and out["interventions"] == 2
    assert out["layers"] == ["block/up_blocks.3.attentions.0"]
    edit = out["dose"][0]["probe"]["edit"]
    assert edit["relative_change"] > 0 and edit["probe_error_after"] < \
        edit["probe_error_before"]
    with pytest.raises(ActstoreError, match="VAE decoder takes no part in denoising"):
        run_interventions(uri, run, base.with_(layers=("vae/decoder.mid_block.attentions.0",)),
                          **kw)
