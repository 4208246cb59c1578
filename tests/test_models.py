"""Loading: real SD v1.4 architecture from a save_pretrained folder, dtypes, devices, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from actstore.errors import ActstoreError
from actstore.generation.models import load_model, resolve_device
from conftest import DEMO, REPO
from test_store import SD_LAYERS

SD14_TOKENS = {"down_blocks.0": (8, 320), "down_blocks.1": (4, 640), "down_blocks.2": (2, 1280),
               "mid_block": (1, 1280), "up_blocks.1": (2, 1280), "up_blocks.2": (4, 640),
               "up_blocks.3": (8, 320)}


def test_sd14_architecture_folder_loads_and_materializes(tmp_path):
    """SD v1.4's real configs (random weights) through the same loader and store, at 64 px."""
    from actstore.store.view import open_store
    from actstore.generation.sampling import GenerationConfig
    from actstore.generation.materialize import MaterializeSettings, materialize
    from sd14 import sd14_folder

    folder = sd14_folder()
    model = load_model(folder, device="cpu")
    assert list(model.unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert model.unet.config.cross_attention_dim == 768
    assert model.text_encoder.config.hidden_size == 768
    assert model.native_size == 512 and model.vae_scale_factor == 8
    uri = str(tmp_path / "sd14.zarr")
    materialize(model, DEMO, uri,
                MaterializeSettings(gen=GenerationConfig(steps=2, height=64, width=64),
                                    batch_size=1, block_size=1),
                images="0:1", progress=False)
    view = open_store(uri)
    assert view.layers == SD_LAYERS
    for layer in SD_LAYERS:
        side, channels = SD14_TOKENS[layer.rsplit(".attentions", 1)[0]]
        assert view[layer].shape == (1, 2, side, side, channels), layer
    assert np.isfinite(view["up_blocks.3.attentions.2"].values.astype(np.float32)).all()


def test_tokenizer_is_byte_level_clip():
    model = load_model("tiny-random", device="cpu")
    ids = model.tokenizer("ab").input_ids
    assert ids[0] == 512 and ids[-1] == 513 and len(ids) == 4  # bos, a, b</w>, eos
    assert len(model.tokenizer) == 514


def test_fp16_materializes(tmp_path):
    from actstore.store.view import open_store
    from actstore.generation.sampling import GenerationConfig
    from actstore.generation.materialize import MaterializeSettings, materialize

    uri = str(tmp_path / "fp16.zarr")
    materialize("tiny-random", DEMO, uri,
                MaterializeSettings(gen=GenerationConfig(steps=2), dtype="float16", device="cpu"),
                images="0:4", progress=False)
    view = open_store(uri)
    assert view.attrs["fingerprint"]["dtype"] == "float16"
    assert np.isfinite(view["mid_block.attentions.0"].values).all()


def test_device_errors():
    with pytest.raises(ActstoreError, match="use cpu, cuda"):
        resolve_device("tpu")
    assert str(resolve_device("cpu")) == "cpu"


def test_missing_model_and_hub_id_not_cached(tmp_path):
    with pytest.raises(ActstoreError, match="no such folder"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ActstoreError, match="local Hugging Face cache"):
        load_model("nobody/not-a-cached-model")


def test_incomplete_pipeline_folder(tmp_path):
    (tmp_path / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
    (tmp_path / "unet").mkdir()
    with pytest.raises(ActstoreError, match="missing component"):
        load_model(str(tmp_path))


def test_loading_a_model_draws_no_bar_and_keeps_the_callers_setting():
    """A notebook's `run_interventions(..., progress=False)` printed transformers' "Loading
    weights" bar for the text encoder (only the command line switched it off)."""
    code = ("from transformers.utils import logging as l\n"
            "from actstore.generation.models import load_model\n"
            "load_model('tiny-random', device='cpu')\n"
            "print('bars', l.is_progress_bar_enabled())\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TQDM_DISABLE", None)
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "bars True" in done.stdout                 # the caller's setting, restored
    assert "Loading weights" not in done.stderr and "it/s" not in done.stderr


def test_two_loads_at_once_keep_the_bar_off_until_the_last_ends():
    """Two threads loading at once (a Dask worker's threads): the first to finish must not
    switch transformers' bar back on under the other, and the caller's setting is what
    is restored after the last (before, it was on again while the second loaded)."""
    import threading

    from transformers.utils import logging as tf_logging

    from actstore.generation.models import _no_loading_bars

    entered = [threading.Event(), threading.Event()]
    leave = [threading.Event(), threading.Event()]
    seen = {}

    def load(i: int) -> None:
        with _no_loading_bars():
            entered[i].set()
            leave[i].wait(30)
            seen[i] = tf_logging.is_progress_bar_enabled()

    was = tf_logging.is_progress_bar_enabled()
    tf_logging.enable_progress_bar()
    try:
        a = threading.Thread(target=load, args=(0,))
        b = threading.Thread(target=load, args=(1,))
        a.start()
        entered[0].wait(30)
        b.start()
        entered[1].wait(30)
        leave[0].set()                      # A ends first, B still loading
        a.join(30)
        during = tf_logging.is_progress_bar_enabled()
        leave[1].set()
        b.join(30)
        after = tf_logging.is_progress_bar_enabled()
    finally:
        (tf_logging.enable_progress_bar if was else tf_logging.disable_progress_bar)()
    assert seen == {0: False, 1: False}
    assert during is False                 # B's load still has no bar
    assert after is True                   # the caller's setting, once both ended
