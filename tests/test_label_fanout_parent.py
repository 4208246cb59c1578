"""`actstore label --workers N` labels on its workers, each loading the label model once;
the command's own process loaded it too (on the CPU as on a GPU, beside worker 0), only to
read its name, targets and provenance. It now reads the folder (config, safetensors header,
hash) instead: seen in a real run as the command process's peak memory, which a label
model of 174 MB raised by 308 MB before (616 -> 925 MB, `--workers 2 --device cpu`,
2026-12-06) and leaves as it is now."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_cli import api  # noqa: F401  (the session's Prefect API, a fixture)

# Prints the command process's own peak RSS once the command is done: VmHWM, its memory
# map's high-water mark (getrusage's ru_maxrss keeps the parent's across exec, so a child
# of this test would report the test's). The guard keeps the spawned worker processes,
# which import the main module, from running the command again.
PEAK_RSS = '''import re, sys
if __name__ == "__main__":
    from flows.cli import main
    code = main(sys.argv[1:])
    with open("/proc/self/status") as status:
        print("peak_rss_kb", re.search(r"VmHWM:\\s*(\\d+)", status.read()).group(1),
              file=sys.stderr)
    sys.exit(code)
'''


def _big_label_model(folder: Path) -> int:
    """A toy label model of the trained one's layout, 12x its widths (random weights: it
    labels, badly); its weights' size in bytes."""
    import torch

    from actstore.toyworld.ckpt import save_folder
    from actstore.toyworld.labeler import DEFAULT_CONFIG, LabelNet

    torch.manual_seed(0)
    config = {**DEFAULT_CONFIG, "widths": [192, 384, 768, 768]}
    save_folder(folder, LabelNet(config["widths"]), config)
    return (folder / "model.safetensors").stat().st_size


def _big_depth_model(folder: Path) -> int:
    """A DPT depth model of 29 M parameters (random weights) saved in float16, as many Hub
    checkpoints are (57 MB), which a provider loads as float32; the file's size in bytes."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    cfg = DPTConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                    intermediate_size=2048, image_size=32, patch_size=8,
                    backbone_out_indices=[1, 3, 5, 7], neck_hidden_sizes=[32, 64, 128, 128],
                    fusion_hidden_size=64, reassemble_factors=[4, 2, 1, 0.5])
    DPTForDepthEstimation(cfg).half().save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False) \
        .save_pretrained(folder)
    return (folder / "model.safetensors").stat().st_size


def _peak_rss(tmp_path: Path, tiny_store: str, labeler: Path, api: str,
              kind: str = "toyworld") -> int:
    """Bytes: the command process's peak RSS while it labels a copy of the store on one
    local worker process (as many as --workers 2 for what the command itself holds)."""
    store = tmp_path / f"{labeler.name}.zarr"
    shutil.copytree(tiny_store, store)
    script = tmp_path / "peak_rss.py"
    script.write_text(PEAK_RSS)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": api}
    proc = subprocess.run([sys.executable, str(script), "--quiet", "label", "--store",
                           str(store), "--provider", f"{kind}:{labeler}", "--target",
                           "depth", "--no-x0", "--workers", "1", "--device", "cpu"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "labels 'depth'" in proc.stdout, proc.stdout
    return int(re.search(r"peak_rss_kb (\d+)", proc.stderr).group(1)) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's VmHWM")
def test_the_command_process_does_not_load_the_label_model(tmp_path, tiny_store, api):  # noqa: F811
    big = tmp_path / "big-labeler"
    weights = _big_label_model(big)
    small = _peak_rss(tmp_path, tiny_store, REPO / "models" / "toy-labeler", api)
    large = _peak_rss(tmp_path, tiny_store, big, api)
    # loading it held its tensors and the network's (2x the file); reading it holds neither
    assert large - small < weights / 4, (small, large, weights)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's VmHWM")
def test_the_command_process_does_not_load_a_hugging_face_label_model(tmp_path, tiny_store,
                                                                     api):  # noqa: F811
    """hf-depth (and hf-segmentation, the same class) too: the command reads the folder's
    config, image processor and weights hash, and loads no weights. Before 2026-12-06 a
    57 MB float16 DPT, loaded as float32, raised its peak by 142 MB (728 -> 870 MB; a
    float32 checkpoint stays in the file's untouched pages: +13 MB for 115 MB)."""
    from test_labels import _tiny_dpt

    small = tmp_path / "small-dpt"
    _tiny_dpt(small)
    big = tmp_path / "big-dpt"
    weights = _big_depth_model(big)
    low = _peak_rss(tmp_path, tiny_store, small, api, kind="hf-depth")
    high = _peak_rss(tmp_path, tiny_store, big, api, kind="hf-depth")
    assert high - low < weights / 4, (low, high, weights)
