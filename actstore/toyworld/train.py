"""CPU training of the toy latent diffusion model, stage by stage.

Stages are separate pure-ish functions over a run directory so that (a) the Prefect flow
in ``flows/train_toy.py`` can wrap each as a task, (b) a killed run resumes from the last
checkpoint, and (c) a partial model can be exported at any time. Order: render data ->
VAE -> encode latents (fixes ``scaling_factor``) -> UNet + text encoder -> export.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from actstore.toyworld import model as M
from actstore.toyworld.ckpt import inherit, load_checkpoint, save_checkpoint
from actstore.toyworld.render import CAMERAS, render_batch
from actstore.toyworld.tokenizer import build_tokenizer

TRAIN_SEED_OFFSET = 100_000  # LDM training scenes; prompts CSV and labeler use other ranges


def _log(run_dir: Path, msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(run_dir / "train.log", "a") as f:
        f.write(line + "\n")


def render_data(run_dir: str | Path, n_scenes: int, size: int = 64,
                camera: str = "fixed") -> Path:
    """Render (or reuse) the training scenes: rgb.npy + prompts.json in the run dir.

    ``camera`` is the renderer's world option; it is kept in ``world.json`` so cached
    renders of another camera are never reused (a run dir without it holds fixed-camera
    renders, the only world before the option existed).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rgb_p, pr_p, w_p = run_dir / "rgb.npy", run_dir / "prompts.json", run_dir / "world.json"
    cached = json.loads(w_p.read_text())["camera"] if w_p.exists() else "fixed"
    if (rgb_p.exists() and pr_p.exists() and cached == camera
            and len(json.loads(pr_p.read_text())) == n_scenes):
        return run_dir
    t0 = time.time()
    seeds = np.arange(TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + n_scenes)
    b = render_batch(seeds, size, camera=camera)
    np.save(rgb_p, b["rgb"])
    np.save(run_dir / "salient.npy", b["salient"])
    pr_p.write_text(json.dumps(b["prompt"]))
    w_p.write_text(json.dumps({"camera": camera}))
    _log(run_dir, f"rendered {n_scenes} scenes ({camera} camera) in {time.time() - t0:.1f}s")
    return run_dir


def _images(run_dir: Path) -> torch.Tensor:
    rgb = np.load(run_dir / "rgb.npy")
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pl in zip(ema.parameters(), live.parameters()):
            pe.lerp_(pl, 1.0 - decay)


def train_vae(run_dir: str | Path, *, steps: int = 700, batch: int = 32, lr: float = 5e-4,
              kl_weight: float = 1e-6, ckpt_every: int = 100, seed: int = 0,
              obj_weight: float = 5.0) -> Path:
    """L1 reconstruction (object pixels up-weighted) + tiny KL; no perceptual/GAN loss
    (flat toy colours don't need it)."""
    run_dir = Path(run_dir)
    ck = run_dir / "ckpt" / "vae.safetensors"
    torch.manual_seed(seed)
    vae = M.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    st = load_checkpoint(ck, {"vae": vae}, opt) or {"step": 0, "elapsed": 0.0}
    if st["step"] >= steps:
        return ck
    x_all = _images(run_dir)
    # Objects cover ~5% of pixels; without up-weighting them the VAE learns sky and
    # ground first and renders objects as dark blobs for hundreds of steps.
    sal_p = run_dir / "salient.npy"
    w_all = (1.0 + obj_weight * torch.from_numpy(np.load(sal_p)).float()[:, None]
             if sal_p.exists() else None)
    g = torch.Generator().manual_seed(seed + st["step"])
    t_start, step0, avg = time.time(), st["step"], None
    vae.train()
    for step in range(st["step"], steps):
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=g)
        x = x_all[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        err = (rec - x).abs()
        l1 = err.mean()
        rec_loss = l1 if w_all is None else (err * w_all[idx]).mean()
        loss = rec_loss + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        avg = l1.item() if avg is None else 0.95 * avg + 0.05 * l1.item()
        done = step + 1
        if done % 20 == 0 or done == steps:
            sps = (time.time() - t_start) / (done - step0)
            _log(run_dir, f"vae step {done}/{steps} l1 {avg:.4f} {sps:.2f}s/step "
                          f"eta {sps * (steps - done) / 60:.1f}min")
        if done % ckpt_every == 0 or done == steps:
            st = {"step": done, "elapsed": st["elapsed"] + time.time() - t_start, "l1": avg}
            t_start, step0 = time.time(), done
            save_checkpoint(ck, {"vae": vae}, opt, st)
    return ck


def encode_latents(run_dir: str | Path, batch: int = 256,
                   scaling_factor: float | None = None) -> float:
    """Encode every training image once (posterior mean) and fix scaling_factor = 1/std.

    A warm-started run passes its parent's ``scaling_factor``: the inherited UNet was
    trained on latents scaled that way, and a new factor would shift its input range.
    """
    run_dir = Path(run_dir)
    vae = M.make_vae()
    load_checkpoint(run_dir / "ckpt" / "vae.safetensors", {"vae": vae})
    vae.eval()
    x_all = _images(run_dir)
    outs = []
    with torch.no_grad():
        for i in range(0, x_all.shape[0], batch):
            outs.append(vae.encode(x_all[i:i + batch]).latent_dist.mean)
    lat = torch.cat(outs).numpy().astype(np.float32)
    np.save(run_dir / "latents.npy", lat)
    sf = float(1.0 / lat.std()) if scaling_factor is None else float(scaling_factor)
    (run_dir / "latent_stats.json").write_text(json.dumps(
        {"std": float(lat.std()), "mean": float(lat.mean()), "scaling_factor": sf}))
    _log(run_dir, f"encoded {lat.shape} latents, std {lat.std():.4f} -> scaling_factor {sf:.4f}")
    return sf


def finetune_decoder(run_dir: str | Path, *, steps: int = 600, batch: int = 16, lr: float = 5e-4,
                     ckpt_every: int = 100, obj_weight: float = 5.0, seed: int = 1) -> Path:
    """Keep training the VAE decoder on the frozen encoder's latents (as SD's ft-EMA VAE).

    The UNet only sees encoder latents, so once they are fixed the decoder can improve
    in parallel with UNet training without invalidating it; export picks this up.
    """
    run_dir = Path(run_dir)
    ck = run_dir / "ckpt" / "vae_decoder.safetensors"
    torch.manual_seed(seed)
    vae = M.make_vae()
    load_checkpoint(run_dir / "ckpt" / "vae.safetensors", {"vae": vae})
    dec = torch.nn.ModuleDict({"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv})
    opt = torch.optim.AdamW(dec.parameters(), lr=lr, weight_decay=0.0)
    st = load_checkpoint(ck, {"dec": dec}, opt) or {"step": 0, "elapsed": 0.0}
    if st["step"] >= steps:
        return ck
    x_all = _images(run_dir)
    lat = torch.from_numpy(np.load(run_dir / "latents.npy"))
    w_all = 1.0 + obj_weight * torch.from_numpy(np.load(run_dir / "salient.npy")).float()[:, None]
    g = torch.Generator().manual_seed(seed + st["step"])
    t_start, step0, avg = time.time(), st["step"], None
    for step in range(st["step"], steps):
        cur_lr = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        for grp in opt.param_groups:
            grp["lr"] = cur_lr
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=g)
        z = lat[idx] + 0.05 * lat.std() * torch.randn(lat[idx].shape, generator=g)
        rec = vae.decode(z).sample
        err = (rec - x_all[idx]).abs()
        loss = (err * w_all[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        avg = err.mean().item() if avg is None else 0.95 * avg + 0.05 * err.mean().item()
        done = step + 1
        if done % 20 == 0 or done == steps:
            sps = (time.time() - t_start) / (done - step0)
            _log(run_dir, f"decoder step {done}/{steps} l1 {avg:.4f} {sps:.2f}s/step "
                          f"eta {sps * (steps - done) / 60:.1f}min")
        if done % ckpt_every == 0 or done == steps:
            st = {"step": done, "elapsed": st["elapsed"] + time.time() - t_start, "l1": avg}
            t_start, step0 = time.time(), done
            save_checkpoint(ck, {"dec": dec}, opt, st)
    return ck


def _tokenize_all(tok, prompts: list[str]) -> torch.Tensor:
    enc = tok(prompts, padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt")
    return enc["input_ids"]


def train_unet(run_dir: str | Path, *, steps: int = 3000, batch: int = 64, lr: float = 3e-4,
               p_uncond: float = 0.1, ckpt_every: int = 200, max_minutes: float | None = None,
               ema_decay: float = 0.998, warmup: int = 100, seed: int = 0,
               init_ckpt: str | Path | None = None, snr_gamma: float | None = None) -> Path:
    """Epsilon-prediction DDPM training (SD betas) of UNet + text encoder jointly.

    10% of captions are replaced by "" so classifier-free guidance has an unconditional
    branch. The learning rate decays (cosine) over the planned steps or the time budget,
    whichever ends first; ``max_minutes``
    stops early at a checkpoint so a wall-clock budget is always met. ``init_ckpt``
    (another run's UNet checkpoint) starts a fresh run from its weights, with a new
    optimizer and schedule; once this run has its own checkpoint, that one wins.
    ``snr_gamma`` weights each sample's loss by min(SNR, gamma) / SNR (Min-SNR, Hang et
    al. 2023): low-noise steps, which only polish texture, stop dominating the gradient,
    and the high-noise steps that decide layout and object shape get the capacity.
    """
    run_dir = Path(run_dir)
    ck = run_dir / "ckpt" / "unet.safetensors"
    tok = build_tokenizer(run_dir / "tokenizer")
    torch.manual_seed(seed)
    unet, te = M.make_unet(), M.make_text_encoder(tok)
    ema_u, ema_t = copy.deepcopy(unet), copy.deepcopy(te)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    mods = {"unet": unet, "text_encoder": te, "ema_unet": ema_u, "ema_text_encoder": ema_t}
    st = load_checkpoint(ck, mods, opt)
    if st is None and init_ckpt is not None:
        parent = load_checkpoint(init_ckpt, mods)
        _log(run_dir, f"warm start from {init_ckpt} (step {parent['step']})")
    st = st or {"step": 0, "elapsed": 0.0}
    if st["step"] >= steps:
        return ck
    sf = json.loads((run_dir / "latent_stats.json").read_text())["scaling_factor"]
    lat = torch.from_numpy(np.load(run_dir / "latents.npy")) * sf
    ids = _tokenize_all(tok, json.loads((run_dir / "prompts.json").read_text()))
    empty = _tokenize_all(tok, [""])[0]
    acp = M.alphas_cumprod()
    g = torch.Generator().manual_seed(seed + 7919 * st["step"])
    unet.train(), te.train()
    t_start, step0, avg = time.time(), st["step"], None
    budget_s = None if max_minutes is None else max_minutes * 60.0
    for step in range(st["step"], steps):
        frac = step / steps
        if budget_s is not None:  # anneal against whichever runs out first: steps or time
            frac = max(frac, (st["elapsed"] + time.time() - t_start) / budget_s)
        cur_lr = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        for grp in opt.param_groups:
            grp["lr"] = max(cur_lr, lr * 0.05)
        idx = torch.randint(0, lat.shape[0], (batch,), generator=g)
        z0 = lat[idx]
        tid = ids[idx].clone()
        drop = torch.rand(batch, generator=g) < p_uncond
        tid[drop] = empty
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, acp.shape[0], (batch,), generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = te(tid)[0]
        pred = unet(zt, t, cond).sample
        mse = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if snr_gamma is None:
            loss = mse.mean()
        else:
            snr = (a / (1 - a)).view(-1)
            loss = (snr.clamp(max=snr_gamma) / snr * mse).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_u, unet, d)
        _ema_update(ema_t, te, d)
        avg = mse.mean().item() if avg is None else 0.98 * avg + 0.02 * mse.mean().item()
        done = step + 1
        out_of_time = budget_s is not None and st["elapsed"] + time.time() - t_start > budget_s
        if done % 20 == 0 or done == steps:
            sps = (time.time() - t_start) / (done - step0)
            _log(run_dir, f"unet step {done}/{steps} loss {avg:.4f} lr {cur_lr:.2e} "
                          f"{sps:.2f}s/step eta {sps * (steps - done) / 60:.1f}min")
        if done % ckpt_every == 0 or done == steps or out_of_time:
            st = {"step": done, "elapsed": st["elapsed"] + time.time() - t_start, "loss": avg,
                  "planned_steps": steps}
            t_start, step0 = time.time(), done
            save_checkpoint(ck, mods, opt, st)
            export(run_dir, run_dir / "model")
            _log(run_dir, f"checkpoint at step {done}, exported {run_dir / 'model'}")
        if out_of_time:
            _log(run_dir, f"time budget of {max_minutes} min reached at step {done}")
            break
    return ck


def export(run_dir: str | Path, out_dir: str | Path, use_ema: bool = True) -> Path:
    """Write the standard SD folder from the latest checkpoints (EMA weights by default)."""
    run_dir = Path(run_dir)
    tok = build_tokenizer(run_dir / "tokenizer")
    sf = json.loads((run_dir / "latent_stats.json").read_text())["scaling_factor"]
    vae = M.make_vae(scaling_factor=sf)
    load_checkpoint(run_dir / "ckpt" / "vae.safetensors", {"vae": vae})
    dec_ck = run_dir / "ckpt" / "vae_decoder.safetensors"
    if dec_ck.exists():  # decoder fine-tuned on the same frozen-encoder latents
        dec = torch.nn.ModuleDict({"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv})
        load_checkpoint(dec_ck, {"dec": dec})
    unet, te = M.make_unet(), M.make_text_encoder(tok)
    pre = "ema_" if use_ema else ""
    st = load_checkpoint(run_dir / "ckpt" / "unet.safetensors",
                         {f"{pre}unet": unet, f"{pre}text_encoder": te})
    out = M.save_pipeline(vae, te, tok, unet, out_dir)
    (Path(out) / "train_state.json").write_text(json.dumps(st or {}, indent=1))
    return out


def _latents_stale(run: Path) -> bool:
    lat, ck = run / "latent_stats.json", run / "ckpt" / "vae.safetensors"
    return not lat.exists() or lat.stat().st_mtime < ck.stat().st_mtime


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    p = argparse.ArgumentParser(prog="python -m actstore.toyworld.train",
                                description="Train the toy latent diffusion model on CPU.")
    p.add_argument("--run-dir", default="runs/toy-ldm", help="checkpoints, data cache, log")
    p.add_argument("--out", default="models/toy-ldm", help="final StableDiffusionPipeline folder")
    p.add_argument("--n-scenes", type=int, default=8000)
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-minutes", type=float, default=None, help="UNet wall-clock budget")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is fastest on a shared/busy 2-core box")
    p.add_argument("--stage", default="all",
                   choices=["all", "data", "vae", "latents", "unet", "decoder", "export"])
    p.add_argument("--snr-gamma", type=float, default=None,
                   help="Min-SNR loss weighting min(SNR, gamma)/SNR (5 is the paper's value); "
                        "default: plain MSE")
    p.add_argument("--init-from", default=None, metavar="RUN_DIR",
                   help="warm start: reuse that run's VAE, decoder, latent scaling and "
                        "UNet weights (new data, optimizer and schedule)")
    p.add_argument("--camera", default="fixed", choices=list(CAMERAS),
                   help="world option for rendered training scenes: 'varied' draws camera "
                        "pitch and height per scene (actstore.toyworld.render.sample_camera)")
    p.add_argument("--decoder-steps", type=int, default=600,
                   help="decoder-only fine-tuning on frozen-encoder latents; with --stage "
                        "all it runs after the UNet, or run --stage decoder in parallel")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry (``python -m actstore.toyworld.train``; ``python -m flows.train_toy`` runs the
    same stages as a Prefect flow); every stage resumes if rerun."""
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    run = Path(a.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    _log(run, f"train-toy args: {vars(a)}")
    t0 = time.time()
    init = inherit(run, a.init_from) if a.init_from else {}
    if a.stage in ("all", "data"):
        render_data(run, a.n_scenes, camera=a.camera)
    if a.stage in ("all", "vae") and not init.get("vae_frozen"):
        train_vae(run, steps=a.vae_steps, batch=a.vae_batch, lr=a.vae_lr)
    if a.stage == "latents" or (a.stage == "all" and _latents_stale(run)):
        encode_latents(run, scaling_factor=init.get("scaling_factor"))
    if a.stage in ("all", "unet"):
        train_unet(run, steps=a.unet_steps, batch=a.unet_batch, lr=a.lr,
                   ckpt_every=a.ckpt_every, max_minutes=a.max_minutes,
                   init_ckpt=init.get("unet_ckpt"), snr_gamma=a.snr_gamma)
    if a.stage == "decoder" or (a.stage == "all" and a.decoder_steps > 0
                                and not init.get("vae_frozen")):
        finetune_decoder(run, steps=a.decoder_steps, batch=a.vae_batch)
    if a.stage in ("all", "export"):
        export(run, a.out)
        _log(run, f"exported {a.out}")
    _log(run, f"done stage {a.stage} in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
