"""Labels in the store: values, layout, providers, and bad input leaving the store unchanged."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from actstore.store.view import open_store
from actstore.errors import ActstoreError
from actstore.label.hfmodels import background_ids
from actstore.label.providers import ArrayLabels, LabelProvider, get_provider
from actstore.label.labels import label_path, list_targets, open_labels, write_labels
from actstore.metrics import pool
from actstore.store import labelsets
from conftest import REPO, TINY, tree_digest


class Brightness:
    """Labels anyone can recompute: depth = mean brightness, salient = brighter than mean."""

    name = "brightness"
    targets = {"depth": "continuous", "salient": "binary", "shade": "continuous"}

    def __init__(self, nan_at: int | None = None, fraction: bool = False):
        self.nan_at, self.fraction, self.calls = nan_at, fraction, 0

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        b = images.astype(np.float32).mean(-1) / 255
        if self.nan_at is not None and self.calls * 4 <= self.nan_at < self.calls * 4 + len(b):
            b[self.nan_at - self.calls * 4, 0, 0] = np.nan
        self.calls += 1
        sal = (b > b.mean(axis=(1, 2), keepdims=True)).astype(np.float32)
        return {"depth": b, "salient": sal * (0.9 if self.fraction else 1), "shade": 1 - b}


def expected(images: np.ndarray, split: np.ndarray, kind: str = "depth"):
    raw = Brightness()(images)[kind]
    if kind == "salient":
        return raw, None, None
    train = raw[split == "train"].astype(np.float64)
    mean, std = train.mean(), train.std()
    return ((raw - mean) / std).astype(np.float32), mean, std


def full_digest(path) -> dict:
    """Files and their hashes plus every directory: 'unchanged' includes no stray folders."""
    out = tree_digest(path)
    out.update({str(p.relative_to(path)) + "/": "dir" for p in Path(path).rglob("*")
                if p.is_dir()})
    return out


@pytest.fixture()
def store(tmp_path, tiny_store) -> str:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, dst)
    return str(dst)


def test_write_labels_layout_values_and_reader(store):
    outside = {k: v for k, v in full_digest(store).items() if not k.startswith("labels")}
    res = write_labels(store, Brightness(), "depth", batch_size=3, progress=False)
    write_labels(store, Brightness(), "salient", on_x0=False, progress=False)
    # Nothing outside labels/ changed: activations, images, root metadata.
    after = {k: v for k, v in full_digest(store).items() if not k.startswith("labels")}
    assert after == outside and any(k.startswith("models/") for k in after)

    view = open_store(store)
    images = view.final_images.values
    split = view.images["split"].values
    want, mean, std = expected(images, split)
    assert res["mean"] == pytest.approx(mean) and res["std"] == pytest.approx(std)
    assert res["resolutions"] == ["r1", "r2", "r4", "r8"] and res["x0"]

    ds = open_labels(store, "depth")
    assert list(ds.image.values) == list(view.images["image"].values)
    assert (ds.split.values == split).all()
    np.testing.assert_allclose(ds.full.values, want, atol=1e-5)
    assert ds.full.values[split == "train"].mean() == pytest.approx(0, abs=1e-5)
    for side in (8, 4, 2, 1):
        np.testing.assert_allclose(ds[f"r{side}"].values, pool(want, side), atol=1e-5)
    x0 = view.x0_images.values
    raw_x0 = Brightness()(x0.reshape(-1, *x0.shape[2:]))["depth"].reshape(x0.shape[:-1])
    np.testing.assert_allclose(ds.x0.values, (raw_x0 - mean) / std, atol=1e-4)
    assert list(ds.timestep.values) == list(view.x0_images.timestep.values)
    assert ds.attrs["normalization"] == "zscore-train" and ds.attrs["kind"] == "continuous"
    assert ds.attrs["source_model"] == "trained" and ds.attrs["provider"] == "brightness"
    assert ds.attrs["layer_arrays"]["mid_block.attentions.0"] == "r1"

    # Plain xarray and zarr see the same thing: dimension names, one block per chunk.
    plain = xr.open_zarr(store, group=label_path(store, "depth"), consolidated=False)
    assert plain.full.dims == ("image", "y", "x") and plain.x0.dims == ("image", "step", "y", "x")
    arrays = zarr.open_group(store, path=label_path(store, "depth"), mode="r")
    assert arrays["full"].chunks == (TINY["block_size"], 64, 64)
    assert arrays["x0"].chunks == (TINY["block_size"], 1, 64, 64)
    assert arrays["full"].dtype == np.float32

    sal = open_labels(store, "salient")
    np.testing.assert_array_equal(sal.full.values, expected(images, split, "salient")[0])
    assert set(np.unique(sal.full.values)) <= {0.0, 1.0} and "x0" not in sal
    assert sal.attrs["normalization"] == "none" and sal.attrs["mean"] is None
    assert set(list_targets(store)) == {"depth", "salient"}


def test_overwrite_replaces_only_that_target(store):
    write_labels(store, Brightness(), "depth", on_x0=False, progress=False)
    write_labels(store, Brightness(), "salient", on_x0=False, progress=False)
    before = full_digest(store)
    with pytest.raises(ActstoreError, match="already has labels 'depth'.*--overwrite"):
        write_labels(store, Brightness(), "depth", progress=False)
    assert full_digest(store) == before
    res = write_labels(store, Brightness(), "depth", overwrite=True, progress=False)
    assert res["replaced"] and "x0" in open_labels(store, "depth")
    after = full_digest(store)
    mine = ("labels/depth", "labels/_commits")
    assert {k: v for k, v in after.items() if not k.startswith(mine)} == \
        {k: v for k, v in before.items() if not k.startswith(mine)}
    records = [k for k in after if k.startswith("labels/_commits/c") and k.endswith("zarr.json")]
    assert len(records) == 3   # the superseded one is kept for readers that resolved it...
    labelsets.collect(store, ["depth"], now=time.time() + labelsets.SUPERSEDED_KEEP_S)
    after = full_digest(store)
    records = [k for k in after if k.startswith("labels/_commits/c") and k.endswith("zarr.json")]
    assert len(records) == 2   # ...a day: then salient's and the new depth's remain


def test_target_without_commit_is_invisible_and_rewritten(store):
    write_labels(store, Brightness(), "depth", on_x0=False, progress=False)
    version = label_path(store, "depth")
    shutil.rmtree(Path(store) / "labels" / "_commits")   # as if killed before the commit
    assert list_targets(store) == {}
    with pytest.raises(ActstoreError, match="no complete labels 'depth'"):
        open_labels(store, "depth")
    write_labels(store, Brightness(), "depth", on_x0=False, progress=False)   # no --overwrite
    assert "depth" in list_targets(store)
    assert not (Path(store) / version).exists()   # the unreachable version was cleaned


def _label_arrays(store: str, target: str) -> dict:
    group = zarr.open_group(store, path=label_path(store, target), mode="r")
    return {name: arr[...] for name, arr in group.arrays()}


def test_several_targets_in_one_pass_match_single_calls(store, tmp_path):
    """One provider call per batch for all targets, and the same bytes as one call each."""
    single = str(tmp_path / "single.zarr")
    shutil.copytree(store, single)
    targets = ["depth", "salient", "shade"]
    together = Brightness()
    res = write_labels(store, together, targets, batch_size=3, progress=False)
    alone, summaries = [], {}
    for t in targets:
        alone.append(Brightness())
        summaries[t] = write_labels(single, alone[-1], t, batch_size=3, progress=False)
    assert together.calls * 2 <= sum(p.calls for p in alone)
    assert together.calls == alone[0].calls          # as many calls as one target alone
    assert list(res) == targets and set(list_targets(store)) == set(targets)
    for t in targets:
        got, want = _label_arrays(store, t), _label_arrays(single, t)
        assert set(got) == set(want) == {"full", "r1", "r2", "r4", "r8", "x0"}
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{t}/{name}")
        drop = ("created",)
        assert {k: v for k, v in open_labels(store, t).attrs.items() if k not in drop} == \
            {k: v for k, v in open_labels(single, t).attrs.items() if k not in drop}
        assert {k: v for k, v in res[t].items() if k not in ("store", "seconds")} == \
            {k: v for k, v in summaries[t].items() if k not in ("store", "seconds")}
    assert [p.name for p in Path(store, "labels").iterdir() if p.name.startswith("_")] == \
        ["_commits"] and not list(Path(store, "labels").rglob("_pending"))


def test_several_targets_from_the_command_line(store, tmp_path, capsys, monkeypatch):
    from flows.cli import main

    ids = list(open_store(store).images["image"].values)
    rng = np.random.default_rng(2)
    maps = {"depth": rng.normal(size=(16, 64, 64)).astype(np.float32),
            "mask": (rng.random((16, 64, 64)) > 0.5).astype(np.float32)}
    path = _npz(tmp_path, ids, maps)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert main(["--no-prefect", "--quiet", "--json", "label", "--store", store, "--provider",
                 f"array:{path}", "--target", "depth", "mask"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"depth", "mask"} and out["mask"]["kind"] == "binary"
    np.testing.assert_array_equal(open_labels(store, "mask").full.values, maps["mask"])


def test_a_mask_of_one_class_is_refused_from_the_command_line(store, tmp_path, capsys):
    """`actstore label --provider array:FILE` with a mask all 0 on the train images
    labelled fine (exit 0); now one line, exit 2, the store as it was."""
    from flows.cli import main

    ids = list(open_store(store).images["image"].values)
    path = _npz(tmp_path, ids, {"mask": np.zeros((len(ids), 64, 64), np.float32)})
    before = full_digest(store)
    assert main(["--no-prefect", "--quiet", "label", "--store", store, "--provider",
                 f"array:{path}", "--target", "mask"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "'mask' is constant over the train images" in lines[0], lines
    assert full_digest(store) == before


def test_several_targets_bad_one_writes_none(store):
    """All or nothing for the set: one bad target, late or up front, and nothing is written."""
    write_labels(store, Brightness(), "salient", on_x0=False, progress=False)
    ids = list(open_store(store).images["image"].values)

    class LateNanShade(Brightness):
        def __call__(self, images):
            out = super().__call__(images)
            if self.calls == 8:      # 4 final-image blocks, then x0 blocks: the last one
                out["shade"] = out["shade"].copy()
                out["shade"][0, 0, 0] = np.nan
            return out

    cases = {
        "late NaN in one target": (lambda: write_labels(store, LateNanShade(), ["depth", "shade"],
                                                        progress=False),
                                   f"'shade' labels contain NaN/inf for image '{ids[12]}' on "
                                   "the step-0 x0 image"),
        "one already exists": (lambda: write_labels(store, Brightness(),
                                                    ["depth", "salient"], progress=False),
                               "already has labels 'salient'.*--overwrite"),
        "one not made": (lambda: write_labels(store, Brightness(), ["depth", "normals"],
                                              progress=False), "no target 'normals'"),
        "one bad name": (lambda: write_labels(store, Brightness(), ["depth", "_x"]),
                         "target '_x'"),
        "none": (lambda: write_labels(store, Brightness(), []), "no target given"),
    }
    for case, (call, message) in cases.items():
        before = full_digest(store)
        with pytest.raises(ActstoreError, match=message) as err:
            call()
        assert "\n" not in str(err.value), case
        assert full_digest(store) == before, case
    assert set(list_targets(store)) == {"salient"}


def test_several_targets_on_fresh_store_fail_leave_no_labels_group(store):
    before = full_digest(store)
    with pytest.raises(ActstoreError, match="'depth' labels contain NaN/inf"):
        write_labels(store, Brightness(nan_at=9), ["salient", "depth"], progress=False)
    assert full_digest(store) == before and not (Path(store) / "labels").exists()


def _npz(tmp_path, ids, maps: dict, name="labels.npz") -> str:
    path = str(tmp_path / name)
    np.savez(path, image_id=np.array(ids, dtype=str), **maps)
    return path


def _numbered_npz(tmp_path, maps) -> str:
    path = str(tmp_path / "numbered.npz")
    np.savez(path, image_id=np.arange(len(maps)), depth=maps)
    return path


def test_user_arrays_matched_by_image_id(store, tmp_path):
    view = open_store(store)
    ids = list(view.images["image"].values)
    rng = np.random.default_rng(0)
    depth = rng.normal(3, 2, (len(ids), 64, 64)).astype(np.float32)
    mask = (rng.random((len(ids), 64, 64)) > 0.5).astype(np.float32)
    order = rng.permutation(len(ids))        # rows in another order, plus an extra image
    extra = np.zeros((1, 64, 64), np.float32)
    path = _npz(tmp_path, [ids[i] for i in order] + ["not-in-store"],
                {"depth": np.concatenate([depth[order], extra]),
                 "mask": np.concatenate([mask[order], extra])})
    prov = get_provider(f"array:{path}")
    assert isinstance(prov, LabelProvider) and prov.targets == {"depth": "continuous",
                                                                "mask": "binary"}
    res = write_labels(store, f"array:{path}", "depth", progress=False)
    assert not res["x0"] and "image id" in res["x0_note"]
    train = view.images["split"].values == "train"
    want = (depth - depth[train].mean(dtype=np.float64)) / depth[train].std(dtype=np.float64)
    np.testing.assert_allclose(open_labels(store, "depth").full.values, want, atol=1e-5)

    # The same labels from a Zarr group, kind taken from the array's attribute.
    zpath = str(tmp_path / "labels.zarr")
    g = zarr.open_group(zpath, mode="w")
    g.create_array("image_id", data=np.array(ids, dtype=str))
    g.create_array("mask", data=mask, attributes={"kind": "continuous"})
    assert ArrayLabels(zpath).targets == {"mask": "continuous"}
    write_labels(store, f"array:{zpath}", "mask", progress=False)
    m = mask.astype(np.float64)
    np.testing.assert_allclose(open_labels(store, "mask").full.values,
                               (mask - m[train].mean()) / m[train].std(), atol=1e-5)


def test_toy_labeler_provider_roundtrip(store, tmp_path):
    """The toyworld adapter, with untrained weights so it runs without models/toy-labeler."""
    import torch

    from actstore.toyworld.labeler import DEFAULT_CONFIG, LabelNet, ToyLabeler

    torch.manual_seed(0)
    ToyLabeler(LabelNet([8, 8]), {**DEFAULT_CONFIG, "widths": [8, 8], "size": 32}) \
        .save_pretrained(tmp_path / "toy")
    prov = get_provider(f"toyworld:{tmp_path / 'toy'}")
    assert set(prov.targets) == {"depth", "salient", "shading"}
    res = write_labels(store, prov, "salient", on_x0=False, progress=False)
    ds = open_labels(store, "salient")
    assert set(np.unique(ds.full.values)) <= {0.0, 1.0}
    assert ds.attrs["provider"] == f"toyworld:{tmp_path / 'toy'}" and res["kind"] == "binary"
    assert len(ds.attrs["provider_provenance"]["weights_sha256"]) == 64


@pytest.mark.skipif(not (REPO / "models" / "toy-labeler" / "config.json").is_file(),
                    reason="models/toy-labeler not trained in this checkout")
def test_trained_toy_labeler(store):
    res = write_labels(store, "toyworld", "depth", progress=False)
    ds = open_labels(store, "depth")
    assert np.isfinite(ds.full.values).all() and res["x0"]
    assert ds.x0.shape == (16, TINY["steps"], 64, 64)


# ---- Hugging Face adapters, from tiny random models saved locally (nothing downloaded) ----

def _tiny_dpt(path: Path) -> str:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    cfg = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                    intermediate_size=16, image_size=32, patch_size=8,
                    backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 8, 8],
                    fusion_hidden_size=8, reassemble_factors=[4, 2, 1, 0.5])
    DPTForDepthEstimation(cfg).save_pretrained(path)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False) \
        .save_pretrained(path)
    return str(path)


def _tiny_segformer(path: Path, id2label: dict | None = None) -> str:
    from transformers import (SegformerConfig, SegformerForSemanticSegmentation,
                              SegformerImageProcessor)

    id2label = id2label or {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    cfg = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                          hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
                          num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                          decoder_hidden_size=16, num_labels=len(id2label), id2label=id2label,
                          label2id={v: k for k, v in id2label.items()})
    SegformerForSemanticSegmentation(cfg).save_pretrained(path)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def test_hf_depth_adapter(tmp_path):
    folder = _tiny_dpt(tmp_path / "dpt")
    prov = get_provider(f"hf-depth:{folder}")
    assert prov.targets == {"depth": "continuous"}
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    out = prov(images)["depth"]
    assert out.shape == (3, 40, 48) and out.dtype == np.float32 and np.isfinite(out).all()
    assert prov.provenance["model_type"] == "dpt" and not prov.provenance["output"].startswith("1/")


def test_hf_segmentation_adapter(tmp_path, store):
    folder = _tiny_segformer(tmp_path / "seg")
    prov = get_provider(f"hf-segmentation:{folder}")
    assert prov.targets == {"salient": "binary"} and prov.background == [0]
    images = np.random.default_rng(1).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    out = prov(images)["salient"]
    assert out.shape == (2, 40, 48) and out.dtype == np.float32
    assert set(np.unique(out)) <= {0.0, 1.0}
    # End to end from a spec (x0 labels are covered by the first test).
    res = write_labels(store, f"hf-segmentation:{folder}", "salient", batch_size=8,
                       on_x0=False, progress=False)
    ds = open_labels(store, "salient")
    final = open_store(store).final_images.values
    np.testing.assert_array_equal(ds.full.values, prov(final)["salient"])
    assert res["kind"] == "binary" and ds.attrs["provider"] == f"hf-segmentation:{folder}"
    assert ds.attrs["provider_provenance"]["background_ids"] == [0]
    assert background_ids({0: "cat", 1: "Background", 2: "sky"}) == [1, 2]
    assert background_ids({0: "wall", 1: "person"}) == [0]
    assert background_ids({0: "person", 1: "car"}) == [0]


@pytest.mark.parametrize("kind", ["hf-depth", "hf-segmentation"])
def test_hf_float16_checkpoint_labels_in_float32(tmp_path, kind):
    """A label model saved in float16 (as many Hub checkpoints are) loaded in float16
    (transformers' dtype="auto") and its first batch raised 'Input type (float) and bias
    type (c10::Half) should be the same'; it now runs in float32 and labels as the same
    weights loaded in float32 do, bit for bit."""
    import torch
    from transformers import AutoModelForDepthEstimation, AutoModelForSemanticSegmentation

    make, auto = ((_tiny_dpt, AutoModelForDepthEstimation) if kind == "hf-depth" else
                  (_tiny_segformer, AutoModelForSemanticSegmentation))
    folder = make(tmp_path / "half")
    auto.from_pretrained(folder).half().save_pretrained(folder)
    assert json.loads((Path(folder) / "config.json").read_text())["dtype"] == "float16"
    prov = get_provider(f"{kind}:{folder}")
    assert {p.dtype for p in prov.model.parameters()} == {torch.float32}
    images = np.random.default_rng(2).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    (out,) = prov(images).values()
    ref = make(tmp_path / "ref")        # the float16 weights, saved again in float32
    auto.from_pretrained(folder, dtype=torch.float32).save_pretrained(ref)
    (expected,) = get_provider(f"{kind}:{ref}")(images).values()
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(out, expected)


def test_hf_remote_code_is_refused(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "my-rmbg", "auto_map": {"AutoModelForImageSegmentation": "m.Net"}}))
    (folder / "preprocessor_config.json").write_text("{}")
    with pytest.raises(ActstoreError, match="remote code"):
        get_provider(f"hf-segmentation:{folder}")
    with pytest.raises(ActstoreError, match="no config.json"):
        get_provider(f"hf-depth:{tmp_path / 'nothing'}")


# ---- Bad input: one-line ActstoreError, store byte-for-byte unchanged ----

def _bad_cases(store: str, tmp_path: Path) -> dict:
    ids = list(open_store(store).images["image"].values)
    ok = np.zeros((len(ids), 64, 64), np.float32)
    nan = ok.copy()
    nan[5, 3, 3] = np.nan
    return {
        "unknown provider": (lambda: write_labels(store, "midas-please", "depth"),
                             "not known; use one of"),
        "unknown target": (lambda: write_labels(store, Brightness(), "normals"),
                           "no target 'normals'; it makes depth, salient, shade"),
        "bad target name": (lambda: write_labels(store, Brightness(), "_x"), "target '_x'"),
        "missing ids": (lambda: write_labels(
            store, f"array:{_npz(tmp_path, ids[2:], {'depth': ok[2:]}, 'a.npz')}", "depth"),
            f"2 of the store's 16 image ids are missing \\(e.g. {ids[0]}, {ids[1]}\\)"),
        # ids saved as row numbers: the line said only that all 16 were missing
        "numeric ids": (lambda: write_labels(store, f"array:{_numbered_npz(tmp_path, ok)}",
                                             "depth"),
                        "image_id holds numbers, 0, 1, 2 ...: save the store's image ids"),
        "wrong shape": (lambda: write_labels(
            store, f"array:{_npz(tmp_path, ids, {'depth': ok[:, :32, :32]}, 'b.npz')}",
            "depth"), "32x32 but the store's images are 64x64"),
        "nan in user array": (lambda: write_labels(
            store, f"array:{_npz(tmp_path, ids, {'depth': nan}, 'c.npz')}", "depth"),
            f"NaN/inf for image '{ids[5]}'"),
        "nan from provider late": (lambda: write_labels(store, Brightness(nan_at=13), "depth"),
                                   f"NaN/inf for image '{ids[13]}'"),
        "binary not 0/1": (lambda: write_labels(store, Brightness(fraction=True), "salient",
                                                overwrite=True),   # old target kept intact
                           "values other than 0/1"),
        "no such variant": (lambda: write_labels(store, Brightness(), "depth",
                                                 source_model="randomized"),
                            "no model 'randomized'"),
        "object ids": (lambda: write_labels(store, f"array:{_object_npz(tmp_path, ids)}",
                                            "depth"), "without pickle"),
        "text labels": (lambda: write_labels(   # was a ValueError once a version was begun
            store, f"array:{_npz(tmp_path, ids, {'depth': np.full(ok.shape, 'far')}, 'd.npz')}",
            "depth"), "array 'depth' holds <U3 values"),
        "constant depth": (lambda: write_labels(
            store, f"array:{_npz(tmp_path, ids, {'depth': ok + 2}, 'e.npz')}", "depth"),
            "'depth' is constant over the train images, so it can't be z-scored"),
        # binary maps of one class over the train images labelled fine, then probed to
        # Dice 1.000: refused as constant continuous labels are
        "mask all 0": (lambda: write_labels(
            store, f"array:{_npz(tmp_path, ids, {'mask': ok}, 'f.npz')}", "mask"),
            "'mask' is constant over the train images, every train map is all 0, so a "
            "probe has no class to tell apart"),
        "mask all 1 on train": (lambda: write_labels(
            store, f"array:{_npz(tmp_path, ids, {'mask': _ones_on_train(store)}, 'g.npz')}",
            "mask"), "'mask' is constant over the train images, every train map is all 1"),
        "torn npz": (lambda: write_labels(store, f"array:{_torn_npz(tmp_path)}", "depth"),
                     "torn.npz is not a NumPy file of plain arrays"),   # was BadZipFile
        # the prompt reader beside the labeler has the same two files: it was 'unexpected
        # RuntimeError: Error(s) in loading state_dict for LabelNet: Missing key(s) ...'
        "another toy model": (lambda: write_labels(
            store, f"toyworld:{REPO / 'models' / 'toy-reader'}", "depth"),
            "toy-reader holds no toy label model .*e.g. models/toy-labeler"),
    }


def _ones_on_train(store: str) -> np.ndarray:
    """Masks all 1 on the train images, one pixel of 0 on each other: of two classes
    over the store, of one over the images the probes are fitted on."""
    split = open_store(store).images["split"].values
    maps = np.ones((len(split), 64, 64), np.float32)
    maps[split != "train", 0, 0] = 0
    assert (split != "train").any()
    return maps


def _torn_npz(tmp_path: Path) -> str:
    path = tmp_path / "torn.npz"
    path.write_bytes(b"PK\x03\x04 cut off here")
    return str(path)


def _object_npz(tmp_path: Path, ids) -> str:
    path = str(tmp_path / "obj.npz")
    np.savez(path, image_id=np.array(ids, dtype=object), depth=np.zeros((16, 64, 64)))
    return path


def test_bad_input_leaves_store_unchanged(store, tmp_path):
    write_labels(store, Brightness(), "salient", on_x0=False, progress=False)
    for case, (call, message) in _bad_cases(store, tmp_path).items():
        before = full_digest(store)
        with pytest.raises(ActstoreError, match=message) as err:
            call()
        assert "\n" not in str(err.value), case
        assert full_digest(store) == before, case


def test_bad_input_on_fresh_store_leaves_no_labels_group(store):
    before = full_digest(store)
    with pytest.raises(ActstoreError, match="NaN/inf"):
        write_labels(store, Brightness(nan_at=9), "depth", progress=False)
    assert full_digest(store) == before and not (Path(store) / "labels").exists()


def test_incomplete_store_is_refused(store):
    shutil.rmtree(Path(store) / "models/trained/_blocks/00000004-00000008")
    before = full_digest(store)
    with pytest.raises(ActstoreError, match="incomplete \\(1 image blocks missing: 4:8\\)"):
        write_labels(store, Brightness(), "depth", progress=False)
    assert full_digest(store) == before


def test_label_summary_lists_resolutions_smallest_first(tmp_path, tiny_model, capsys):
    """128x128 images give 16x16 grids: in text order the summary read 'r16, r2, r4, r8'."""
    from actstore.generation.materialize import MaterializeSettings, materialize
    from actstore.generation.sampling import GenerationConfig
    from conftest import DEMO
    from flows.cli import main

    rows = Path(DEMO).read_text(encoding="utf-8").splitlines()
    prompts = tmp_path / "four.csv"
    prompts.write_text("\n".join([rows[0], *rows[1:4], rows[11]]) + "\n", encoding="utf-8")
    uri = str(tmp_path / "big.zarr")
    materialize(tiny_model, str(prompts), uri, MaterializeSettings(
        gen=GenerationConfig(steps=1, height=128, width=128), batch_size=4, block_size=4),
        progress=False)
    ids = list(open_store(uri).images["image"].values)
    np.savez(tmp_path / "d.npz", image_id=np.array(ids),
             depth=np.random.default_rng(0).normal(size=(len(ids), 128, 128)))
    assert main(["--no-prefect", "label", "--store", uri, "--no-x0", "--provider",
                 f"array:{tmp_path / 'd.npz'}", "--target", "depth"]) == 0
    out = capsys.readouterr().out
    assert "4 images at r2, r4, r8, r16;" in out, out


def test_the_bar_hears_each_batch_not_each_block(store):
    """A block's labels are counted batch by batch, in both passes: before 2026-12-06 the
    bar moved once per block, and a block of SD x0 images (images × steps through the
    label model) is minutes of labelling, shown as one jump. The counts add up to the
    pass's total either way."""
    from actstore.label import blocks
    from actstore.label.labels import abort_labels, prepare_labels
    from actstore.label.settings import LabelSettings
    from actstore.progress import Progress

    heard: list[int] = []
    bar = Progress(0, 1, "", enabled=False, relay=lambda steps, *_: heard.append(steps))
    prov = Brightness()
    job = prepare_labels(store, prov, "depth", LabelSettings(batch_size=2))
    try:
        blocks.run_blocks(job, blocks.PASS1, job.blocks, prov=prov, bar=bar)
        pass1 = list(heard)
        heard.clear()
        blocks.run_blocks(job, blocks.PASS2, job.blocks, blocks.stats(job), prov=prov,
                          bar=bar)
    finally:
        abort_labels(job)
        labelsets.release(job.paths)
    assert job.block == TINY["block_size"] > 2
    assert pass1 == [2] * (len(job.ids) // 2)
    assert heard == [2] * (len(job.ids) * TINY["steps"] // 2)


@pytest.mark.parametrize("kind", ["hf-depth", "hf-segmentation"])
def test_hf_folder_is_described_as_it_loads(tmp_path, kind):
    """A fan-out's command (``label --workers/--cluster``) describes the label model
    without loading it: before, it loaded the weights beside its workers only to read its
    name and provenance. The description is the loaded provider's, field for field and in
    the same order, so the job key is too: a run killed before this change resumes after
    it, by a command that describes and workers that load."""
    import transformers

    from actstore.label.blocks import job_key
    from actstore.label.providers import describe_provider, folder_sha256

    folder = (_tiny_dpt if kind == "hf-depth" else _tiny_segformer)(tmp_path / "m")
    described = describe_provider(f"{kind}:{folder}")
    assert described.model is None
    loaded = get_provider(f"{kind}:{folder}")
    extra = ({"output": "relative inverse depth"} if kind == "hf-depth" else
             {"background_ids": [0], "background_labels": ["LABEL_0"]})
    # the provenance as written before 2026-12-06: the loaded model's own class
    expected = {"folder": folder, "model_type": "dpt" if kind == "hf-depth" else "segformer",
                "model_class": type(loaded.model).__name__,
                "transformers": transformers.__version__,
                "weights_sha256": folder_sha256(folder), **extra}
    for prov in (described, loaded):
        assert (prov.name, prov.spec, prov.targets) == (kind, f"{kind}:{folder}",
                                                        loaded.targets)
        assert list(prov.provenance.items()) == list(expected.items())
    assert job_key(described.spec, described.provenance, {"ids": [1]}) == \
        job_key(loaded.spec, loaded.provenance, {"ids": [1]})
    images = np.random.default_rng(3).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(described(images)[next(iter(loaded.targets))],
                                  loaded(images)[next(iter(loaded.targets))])


@pytest.mark.parametrize("kind", ["hf-depth", "hf-segmentation"])
def test_hf_folder_is_described_with_public_names_only(tmp_path, monkeypatch, kind):
    """The model class was found with transformers' private ``_get_model_class`` and the
    auto classes' ``_model_mapping``, which any release may rename or drop: with both
    gone, the folder is still described as the class its loaded model is."""
    import transformers
    from transformers.models.auto import auto_factory

    from actstore.label.providers import describe_provider

    folder = (_tiny_dpt if kind == "hf-depth" else _tiny_segformer)(tmp_path / "m")
    monkeypatch.delattr(auto_factory, "_get_model_class")
    for auto in ("AutoModelForDepthEstimation", "AutoModelForSemanticSegmentation",
                 "AutoModelForImageSegmentation"):
        monkeypatch.delattr(getattr(transformers, auto), "_model_mapping")
    described = describe_provider(f"{kind}:{folder}")
    monkeypatch.undo()
    assert described.model is None
    loaded = get_provider(f"{kind}:{folder}")
    assert described.provenance["model_class"] == type(loaded.model).__name__ == \
        ("DPTForDepthEstimation" if kind == "hf-depth" else "SegformerForSemanticSegmentation")
