"""Toy-world label model: the counterpart of MiDaS (depth), TRACER (salient) and an
intrinsic-image model (shading).

Probes on generated images need labels computed *from the generated image*, as in the
paper, because a generated picture matches no render exactly. This small U-Net is
trained on renders (with blur/noise augmentation so it tolerates the LDM's softer
samples) and exposes the label-provider interface used for real label models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from actstore.toyworld.ckpt import load_folder, save_folder

TARGETS = {"depth": "continuous", "salient": "binary", "shading": "continuous"}
DEFAULT_CONFIG = {"widths": [16, 32, 64, 64], "size": 64, "targets": list(TARGETS)}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
    )


class LabelNet(nn.Module):
    """Plain U-Net; outputs (depth, salient logit, shading) channels at input resolution."""

    def __init__(self, widths=(16, 32, 64, 64)):
        super().__init__()
        w = list(widths)
        self.enc = nn.ModuleList([_block(3, w[0])] + [_block(w[i], w[i + 1])
                                                      for i in range(len(w) - 1)])
        self.dec = nn.ModuleList([_block(w[i + 1] + w[i], w[i]) for i in reversed(range(len(w) - 1))])
        self.head = nn.Conv2d(w[0], 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, blk in enumerate(self.enc):
            x = blk(x if i == 0 else F.avg_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for blk in self.dec:
            s = skips.pop()
            x = blk(torch.cat([F.interpolate(x, size=s.shape[-2:], mode="nearest"), s], 1))
        return self.head(x)


def _to_input(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
    return x


class ToyLabeler:
    """Label provider for toy-world images (depth, salient, shading per pixel)."""

    name = "toyworld"
    targets = dict(TARGETS)

    def __init__(self, net: LabelNet, config: dict, device: str = "cpu"):
        self.net = net.to(device).eval()
        self.config = config
        self.device = device

    @classmethod
    def from_pretrained(cls, path: str | Path = "models/toy-labeler",
                        device: str = "cpu") -> "ToyLabeler":
        state, cfg = load_folder(path)
        net = LabelNet(cfg["widths"])
        net.load_state_dict(state)
        return cls(net, cfg, device)

    def save_pretrained(self, path: str | Path) -> None:
        save_folder(path, self.net, self.config)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
        """images: uint8 (N,H,W,3). Returns {target: float32 (N,H,W)}; salient as 0/1."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected (N,H,W,3) uint8 images, got {images.shape}")
        n, h, w, _ = images.shape
        outs = []
        for i in range(0, n, batch_size):
            x = _to_input(images[i:i + batch_size], self.config["size"]).to(self.device)
            y = self.net(x)
            if (h, w) != tuple(y.shape[-2:]):
                y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
            outs.append(y.cpu())
        y = torch.cat(outs).numpy() if outs else np.zeros((0, 3, h, w), np.float32)
        return {
            "depth": y[:, 0].astype(np.float32),
            "salient": (y[:, 1] > 0).astype(np.float32),
            "shading": y[:, 2].astype(np.float32),
        }
