"""The randomized control: the paper's weight-permuted UNet, through the same pipeline."""

from __future__ import annotations

import shutil

import numpy as np
import torch

from actstore.store.view import open_store
from actstore.generation.models import load_model, randomize_unet
from actstore.store.core import model_variants
from conftest import TINY, cli


def test_randomize_permutes_weights_and_keeps_biases():
    a = load_model("tiny-random", device="cpu").unet
    b = randomize_unet(load_model("tiny-random", device="cpu").unet, seed=0)
    c = randomize_unet(load_model("tiny-random", device="cpu").unet, seed=0)
    moved = 0
    for (name, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(),
                                         c.named_parameters()):
        assert torch.equal(q, r)  # fixed seed: reproducible
        if name.endswith("bias"):
            assert torch.equal(p, q), name
        else:
            assert torch.equal(p.flatten().sort().values, q.flatten().sort().values), name
            moved += int(not torch.equal(p, q))
    assert moved > 50


def test_control_materializes_beside_trained(tmp_path, tiny_store):
    uri = str(tmp_path / "both.zarr")
    shutil.copytree(tiny_store, uri)
    args = ["--model", "tiny-random", "--prompts", "demo", "--steps", str(TINY["steps"]),
            "--images", "0:8"]
    done = cli("materialize", "--store", uri, "--control", "randomized", *args)
    assert done.returncode == 0, done.stderr
    assert model_variants(uri) == ["randomized", "trained"]
    trained, control = open_store(uri), open_store(uri, "randomized")
    assert control.attrs["fingerprint"]["variant"] == "randomized"
    assert control.attrs["fingerprint"]["weights_sha256"] != \
        trained.attrs["fingerprint"]["weights_sha256"]
    layer = "up_blocks.2.attentions.0"
    a = trained[layer].isel(image=slice(0, 8)).values.astype(np.float32)
    b = control[layer].values.astype(np.float32)
    assert a.shape == b.shape and not np.allclose(a, b)
    assert list(control.images["image"].values) == list(trained.images["image"].values[:8])
