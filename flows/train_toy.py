"""Prefect flow: train the toy latent diffusion model (thin wiring over the library).

Each stage is a task calling ``actstore.toyworld.train``; every stage resumes from the
run directory's checkpoints, so rerunning the flow after a crash continues where it
stopped. Run: ``python -m flows.train_toy --run-dir runs/toy-ldm --out models/toy-ldm``
(same options as ``python -m actstore.toyworld.train``, which runs the same
stages without Prefect).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# A busy 2-core machine can take longer than Prefect's default to start its ephemeral
# API server; training must not die for that. Set before Prefect reads its settings.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import torch  # noqa: E402
from prefect import flow, task  # noqa: E402

from actstore.toyworld import train as T  # noqa: E402


@task
def render_data_task(run_dir: str, n_scenes: int, camera: str = "fixed") -> str:
    return str(T.render_data(run_dir, n_scenes, camera=camera))


@task
def train_vae_task(run_dir: str, steps: int, batch: int, lr: float) -> str:
    return str(T.train_vae(run_dir, steps=steps, batch=batch, lr=lr))


@task
def inherit_task(run_dir: str, parent: str) -> dict:
    init = T.inherit(run_dir, parent)
    return {"scaling_factor": init["scaling_factor"], "unet_ckpt": str(init["unet_ckpt"]),
            "vae_frozen": bool(init.get("vae_frozen"))}


@task
def encode_latents_task(run_dir: str, scaling_factor: float | None) -> float:
    return T.encode_latents(run_dir, scaling_factor=scaling_factor)


@task
def train_unet_task(run_dir: str, *, steps: int, batch: int, lr: float, ckpt_every: int,
                    max_minutes: float | None, init_ckpt: str | None,
                    snr_gamma: float | None) -> str:
    return str(T.train_unet(run_dir, steps=steps, batch=batch, lr=lr, ckpt_every=ckpt_every,
                            max_minutes=max_minutes, init_ckpt=init_ckpt, snr_gamma=snr_gamma))


@task
def finetune_decoder_task(run_dir: str, steps: int, batch: int) -> str:
    return str(T.finetune_decoder(run_dir, steps=steps, batch=batch))


@task
def export_task(run_dir: str, out: str) -> str:
    return str(T.export(run_dir, out))


@flow(name="train-toy-ldm")
def train_toy(run_dir: str = "runs/toy-ldm", out: str = "models/toy-ldm", *,
              n_scenes: int = 8000, vae_steps: int = 400, vae_batch: int = 16,
              vae_lr: float = 1e-3,
              unet_steps: int = 4000, unet_batch: int = 32, lr: float = 3e-4,
              ckpt_every: int = 250, max_minutes: float | None = None,
              decoder_steps: int = 600, threads: int = 1, init_from: str | None = None,
              snr_gamma: float | None = None, camera: str = "fixed") -> str:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    init = inherit_task(run_dir, init_from) if init_from else {}
    render_data_task(run_dir, n_scenes, camera)
    if not init.get("vae_frozen"):  # warm start from a model folder: its VAE as it is
        train_vae_task(run_dir, vae_steps, vae_batch, vae_lr)
    if T._latents_stale(Path(run_dir)):
        encode_latents_task(run_dir, init.get("scaling_factor"))
    train_unet_task(run_dir, steps=unet_steps, batch=unet_batch, lr=lr, ckpt_every=ckpt_every,
                    max_minutes=max_minutes, init_ckpt=init.get("unet_ckpt"),
                    snr_gamma=snr_gamma)
    if decoder_steps > 0 and not init.get("vae_frozen"):
        finetune_decoder_task(run_dir, decoder_steps, vae_batch)
    return export_task(run_dir, out)


build_parser = T.build_parser   # the same command line as python -m actstore.toyworld.train


def main(argv: list[str] | None = None) -> int:
    a = T.parse_args(argv)
    if a.stage != "all":  # single stages go straight to the library, no orchestration
        return T.main(argv)
    train_toy(run_dir=a.run_dir, out=a.out, n_scenes=a.n_scenes, vae_steps=a.vae_steps,
              vae_batch=a.vae_batch, vae_lr=a.vae_lr, unet_steps=a.unet_steps,
              unet_batch=a.unet_batch,
              lr=a.lr, ckpt_every=a.ckpt_every, max_minutes=a.max_minutes,
              decoder_steps=a.decoder_steps, threads=a.threads, init_from=a.init_from,
              snr_gamma=a.snr_gamma, camera=a.camera)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
