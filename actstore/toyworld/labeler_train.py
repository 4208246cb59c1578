"""Train and evaluate the toy label model on renders.

Training runs alongside the LDM on a 2-core machine, so it is sized to take minutes on
one thread. Augmentation (blur, noise, colour gain) is there because the label model's
real inputs are the LDM's generated images, which are softer than renders.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from actstore.toyworld.labeler import DEFAULT_CONFIG, LabelNet, ToyLabeler
from actstore.toyworld.render import CAMERAS, render_batch

TRAIN_SEED_OFFSET = 200_000
EVAL_SEED_OFFSET = 300_000


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random gaussian blur (sigma 0-1.2), colour gain and pixel noise, per image."""
    n = x.shape[0]
    sig = torch.rand(n, generator=g) * 1.2
    k = torch.arange(-2, 3, dtype=torch.float32)
    ker = torch.exp(-(k[None] ** 2) / (2 * sig[:, None].clamp(min=1e-3) ** 2))
    ker = ker / ker.sum(1, keepdim=True)  # (n, 5)
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    out = torch.zeros_like(x)
    for i, kv in enumerate(k.long()):  # separable blur, per-image kernels
        out += ker[:, i, None, None, None] * xp[:, :, 2:-2, 2 + kv: 2 + kv + x.shape[-1]]
    xp = F.pad(out, (2, 2, 2, 2), mode="replicate")
    out2 = torch.zeros_like(x)
    for i, kv in enumerate(k.long()):
        out2 += ker[:, i, None, None, None] * xp[:, :, 2 + kv: 2 + kv + x.shape[-2], 2:-2]
    gain = 1 + 0.1 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    noise = torch.randn(x.shape, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) * 0.06)
    return ((out2 + 1) * gain - 1 + noise).clamp(-1, 1)


def _tensors(b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(b["rgb"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.stack([torch.from_numpy(b["inv_depth"]),
                     torch.from_numpy(b["salient"].astype(np.float32)),
                     torch.from_numpy(b["shading"])], 1)
    return x, y


def fit(net: torch.nn.Module,
        batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor], *, n_train: int,
        steps: int, batch: int, lr: float, seed: int, tag: str) -> float:
    """AdamW with a one-cycle schedule over random batches of ``n_train`` cached renders;
    ``batch_loss(idx, g)`` augments and scores one batch. Returns the smoothed final loss."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    t0, avg = time.time(), None
    for step in range(steps):
        loss = batch_loss(torch.randint(0, n_train, (batch,), generator=g), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        avg = loss.item() if avg is None else 0.97 * avg + 0.03 * loss.item()
        if (step + 1) % 100 == 0:
            per = (time.time() - t0) / (step + 1)
            print(f"{tag} step {step + 1}/{steps} loss {avg:.4f}, {per:.2f} s/step, "
                  f"ETA {per * (steps - step - 1) / 60:.1f} min", flush=True)
    return avg


def train_labeler(out_dir: str | Path = "models/toy-labeler", *, n_train: int = 4000,
                  steps: int = 1500, batch: int = 32, lr: float = 2e-3, threads: int = 1,
                  seed: int = 0, camera: str = "fixed",
                  init_from: str | Path | None = None) -> ToyLabeler:
    """Fit LabelNet on fresh renders (seeds disjoint from LDM data and the eval set).

    ``init_from`` (a label model folder) fine-tunes that model instead, e.g. the shipped
    one on renders of another world option: depth of the ground depends on the camera,
    which the fixed-camera model never saw move."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.time()
    x_all, y_all = _tensors(render_batch(range(TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + n_train),
                                         camera=camera))
    net = (ToyLabeler.from_pretrained(init_from).net.train() if init_from
           else LabelNet(DEFAULT_CONFIG["widths"]))

    def batch_loss(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        p, y = net(_augment(x_all[idx], g)), y_all[idx]
        return (F.l1_loss(p[:, 0], y[:, 0]) + F.binary_cross_entropy_with_logits(p[:, 1], y[:, 1])
                + F.l1_loss(p[:, 2], y[:, 2]))

    avg = fit(net, batch_loss, n_train=n_train, steps=steps, batch=batch, lr=lr, seed=seed,
              tag="labeler")
    cfg = dict(DEFAULT_CONFIG, train={"n_train": n_train, "steps": steps, "batch": batch,
                                      "lr": lr, "final_loss": avg, "camera": camera,
                                      "init_from": str(init_from) if init_from else None,
                                      "wall_minutes": (time.time() - t0) / 60})
    lab = ToyLabeler(net, cfg)
    lab.save_pretrained(out_dir)
    return lab


def evaluate(labeler: ToyLabeler, n_eval: int = 300, seed_offset: int = EVAL_SEED_OFFSET,
             camera: str = "fixed") -> dict:
    """Held-out accuracy against exact render labels.

    Depth RMSE is reported both on the [0,1] relative inverse depth and after z-scoring
    prediction and truth with dataset-wide mean/std (the paper's convention).
    """
    b = render_batch(range(seed_offset, seed_offset + n_eval), camera=camera)
    pred = labeler(b["rgb"])
    m_t, m_p = b["salient"], pred["salient"] > 0.5
    dice = 2 * (m_t & m_p).sum((1, 2)) / np.maximum(m_t.sum((1, 2)) + m_p.sum((1, 2)), 1)
    dt, dp = b["inv_depth"], pred["depth"]
    zt, zp = (dt - dt.mean()) / dt.std(), (dp - dp.mean()) / dp.std()
    sp = [spearmanr(dp[i].ravel(), dt[i].ravel())[0] for i in range(n_eval)]
    st, sp_ = b["shading"].ravel(), pred["shading"].ravel()
    return {
        "n_eval": n_eval,
        "mask_dice_mean": float(dice.mean()),
        "depth_rmse_relinv": float(np.sqrt(((dp - dt) ** 2).mean())),
        "depth_rmse_zscored": float(np.sqrt(((zp - zt) ** 2).mean())),
        "depth_spearman_mean": float(np.mean(sp)),
        "shading_pearson": float(np.corrcoef(st, sp_)[0, 1]),
    }


def write_readme(out_dir: str | Path, metrics: dict, cfg: dict, command: str) -> None:
    tr = cfg.get("train", {})
    text = f"""# toy-labeler

Toy-world label model (depth / salient object / shading), the counterpart of MiDaS,
TRACER and an intrinsic-image model for the toy world. A small U-Net
(widths {cfg['widths']}, 64x64 input) trained on renders with blur/noise/colour
augmentation. Load with `ToyLabeler.from_pretrained("models/toy-labeler")`
(safetensors + config.json; no pickle).

Outputs per pixel: `depth` = relative inverse depth in [0, 1] (1 = nearest, sky ~ 0),
`salient` = 0/1 object mask (logit > 0), `shading` = max(0, n.l) x visibility (sky = 1).

## Training
Command: `{command}`
Scenes: {tr.get('n_train')} renders (seeds {TRAIN_SEED_OFFSET}+), {tr.get('steps')} steps,
batch {tr.get('batch')}, AdamW one-cycle lr {tr.get('lr')}, 1 CPU thread,
wall time {tr.get('wall_minutes', 0):.1f} min, final loss {tr.get('final_loss', 0):.4f}.

## Held-out accuracy on {metrics['n_eval']} renders (seeds {EVAL_SEED_OFFSET}+)
| metric | value |
|---|---|
| salient mask Dice (mean per image) | {metrics['mask_dice_mean']:.3f} |
| depth RMSE, relative inverse depth [0,1] | {metrics['depth_rmse_relinv']:.4f} |
| depth RMSE, dataset z-scored | {metrics['depth_rmse_zscored']:.4f} |
| depth Spearman (mean per image) | {metrics['depth_spearman_mean']:.3f} |
| shading Pearson (all pixels) | {metrics['shading_pearson']:.3f} |
"""
    Path(out_dir, "README.md").write_text(text)
    Path(out_dir, "metrics.json").write_text(json.dumps(metrics, indent=1))


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    p = argparse.ArgumentParser(description="Train the toy-world label model on renders.")
    p.add_argument("--out", default="models/toy-labeler")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--init-from", default=None, metavar="FOLDER",
                   help="fine-tune this label model instead of training from scratch")
    p.add_argument("--camera", default="fixed", choices=list(CAMERAS),
                   help="world option of the training and held-out renders")
    p.add_argument("--eval-only", action="store_true",
                   help="only measure the model in --out on held-out renders of the current "
                        "world (e.g. after a world change) and print the metrics")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.eval_only:
        torch.set_num_threads(a.threads)
        print(json.dumps(evaluate(ToyLabeler.from_pretrained(a.out), camera=a.camera), indent=1))
        return 0
    lab = train_labeler(a.out, n_train=a.n_train, steps=a.steps, batch=a.batch, threads=a.threads,
                        camera=a.camera, init_from=a.init_from, lr=a.lr)
    metrics = evaluate(lab, camera=a.camera)
    print(json.dumps(metrics, indent=1))
    cmd = ("python -m actstore.toyworld.labeler_train " + " ".join(argv or [])).strip()
    write_readme(a.out, metrics, lab.config, cmd)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
