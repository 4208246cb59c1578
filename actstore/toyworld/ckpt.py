"""Resumable checkpoints in safetensors + JSON (no pickles).

Training runs in the background on a shared 2-core machine and may be killed; each stage
keeps one "latest" checkpoint (model, EMA copy, AdamW moments) and a JSON state file so a
rerun continues from the last saved step instead of starting over.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"opt.{pid}.{k}"] = v.detach().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = float(v)
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for pid, sc in meta.get("scalars", {}).items():
        for k, v in sc.items():
            state.setdefault(int(pid), {})[k] = torch.tensor(v)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module],
                    opt: torch.optim.Optimizer | None, state: dict) -> None:
    """Atomically write ``path`` (.safetensors) and ``path`` with .json next to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in modules.items():
        for k, v in mod.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().contiguous().clone()
    meta: dict = {"state": state}
    if opt is not None:
        ot, om = _flatten_optimizer(opt)
        tensors.update(ot)
        meta["optimizer"] = om
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    jtmp = path.with_suffix(".json.tmp")
    jtmp.write_text(json.dumps(meta, indent=1))
    os.replace(jtmp, path.with_suffix(".json"))


def load_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module],
                    opt: torch.optim.Optimizer | None = None) -> dict | None:
    """Restore modules (and optimizer) in place; returns the saved state or None."""
    path = Path(path)
    if not path.exists() or not path.with_suffix(".json").exists():
        return None
    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    for name, mod in modules.items():
        pre = f"{name}."
        mod.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    if opt is not None and "optimizer" in meta:
        _restore_optimizer(opt, tensors, meta["optimizer"])
    return meta["state"]


def save_folder(path: str | Path, module: torch.nn.Module, config: dict) -> None:
    """A small trained model as a folder: ``model.safetensors`` + ``config.json``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=1))


def load_folder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config) of a :func:`save_folder` folder; no pickle is read."""
    path = Path(path)
    return load_file(str(path / "model.safetensors")), json.loads((path / "config.json").read_text())


def _inherit_pipeline(run_dir: Path, folder: Path) -> dict:
    """Warm start from an exported model folder (e.g. ``models/toy-ldm``), whose run
    directory is not kept: its VAE (decoder included) becomes this run's finished VAE
    checkpoint, and its UNet and text encoder (EMA weights, as exported) start both the
    live and the EMA copies."""
    ck = run_dir / "ckpt"
    vae_ck, unet_ck = ck / "vae.safetensors", ck / "init_unet.safetensors"
    sf = float(json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"])
    if not (vae_ck.exists() and unet_ck.exists()):
        from actstore.toyworld.model import load_pipeline

        pipe = load_pipeline(folder)
        save_checkpoint(vae_ck, {"vae": pipe.vae}, None,
                        {"step": 0, "elapsed": 0.0, "from": str(folder)})
        mods = {pre + name: mod for pre in ("", "ema_")
                for name, mod in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))}
        st = json.loads((folder / "train_state.json").read_text()) \
            if (folder / "train_state.json").exists() else {}
        save_checkpoint(unet_ck, mods, None, {"step": st.get("step", 0), "from": str(folder)})
    return {"scaling_factor": sf, "unet_ckpt": unet_ck, "vae_frozen": True}


def inherit(run_dir: str | Path, parent: str | Path) -> dict:
    """Set ``run_dir`` up to continue from ``parent``'s models on new data.

    The VAE checkpoints are copied (so their stages are already done and export finds
    them); the UNet is not, only pointed to, so this run's own optimizer, schedule and
    checkpoints start fresh. Returns what the later stages need from the parent.
    ``parent`` may also be an exported model folder (``model_index.json``); then the VAE
    is frozen as it is (the VAE and decoder stages are skipped).
    """
    run_dir, parent = Path(run_dir), Path(parent)
    (run_dir / "ckpt").mkdir(parents=True, exist_ok=True)
    if (parent / "model_index.json").exists():
        return _inherit_pipeline(run_dir, parent)
    for name in ("vae", "vae_decoder"):
        for ext in (".safetensors", ".json"):
            src, dst = parent / "ckpt" / f"{name}{ext}", run_dir / "ckpt" / f"{name}{ext}"
            if src.exists() and not dst.exists():
                shutil.copy2(src, dst)
    sf = json.loads((parent / "latent_stats.json").read_text())["scaling_factor"]
    return {"scaling_factor": sf, "unet_ckpt": parent / "ckpt" / "unet.safetensors"}
