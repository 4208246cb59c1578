"""Loading Stable Diffusion v1.x pipelines offline, and the built-in ``tiny-random`` model.

Every model (real SD v1.4, the project's trained toy model, ``tiny-random``) goes through the
same door: a diffusers folder with ``model_index.json`` loaded with ``local_files_only=True``.
``tiny-random`` is therefore *built* once into a cache folder and then loaded like any other,
so tests exercise the real loading path rather than a shortcut.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from actstore.errors import ActstoreError, first_line
from actstore.runtime import configure_cpu_threads
from actstore.generation.tokenizers import write_byte_level_clip_tokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

TINY_RANDOM = "tiny-random"
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# SD v1.x's training noise schedule: what LMS needs to reproduce the paper's sampling.
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "steps_offset": 1}
DTYPES = {"float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """The pieces of a pipeline that generation and capture need, plus where they came from."""

    name: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    source: str = ""
    variant: str = "trained"
    _weights_hash: str | None = field(default=None, repr=False)

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale(self.vae.config)

    @property
    def native_size(self) -> int:
        """The image side the UNet was trained at (512 for SD v1.x)."""
        return native_size(self.unet.config, self.vae.config)

    @property
    def weights_hash(self) -> str:
        """sha256 over every weight tensor, so a store can refuse data from other weights."""
        if self._weights_hash is None:
            self._weights_hash = hash_modules(
                {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder})
        return self._weights_hash


def vae_scale(vae_config: dict) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def native_size(unet_config: dict, vae_config: dict) -> int:
    return int(unet_config["sample_size"]) * vae_scale(vae_config)


@dataclass(frozen=True)
class FolderFacts:
    """What a pipeline folder says of itself without its weights: enough to compare a run's
    settings with a stored variant's in a second, before a cluster starts or a model loads."""

    path: str
    vae_scale_factor: int
    native_size: int
    scheduler_config: dict


def folder_facts(model: str) -> FolderFacts:
    path = model_folder(model)
    unet, vae = (json.loads(Path(path, part, "config.json").read_text())
                 for part in ("unet", "vae"))
    return FolderFacts(path, vae_scale(vae), native_size(unet, vae),
                       read_scheduler_config(path))


def read_scheduler_config(path: str) -> dict:
    with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
        return json.load(f)


def resolve_device(device: str = "auto") -> torch.device:
    """A device checked here, in one line, rather than by the first tensor moved to it (a
    ``cuda:3`` on a two-GPU worker fails deep in weight loading with a CUDA traceback)."""
    from actstore.gpus import check_device

    device = check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ActstoreError(f"dtype {dtype!r} is not supported; use float32 or float16")
    return DTYPES[dtype]


def hash_modules(modules: dict[str, torch.nn.Module]) -> str:
    """Content hash of the weights, independent of file layout (folder, HF cache, in memory)."""
    h = hashlib.sha256()
    for prefix in sorted(modules):
        state = modules[prefix].state_dict()
        for key in sorted(state):
            t = state[key].detach().to("cpu").contiguous()
            h.update(f"{prefix}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# Loads in progress in this process, and the caller's bar setting before the first: two
# threads loading at once (a Dask worker's threads) must not have the first to finish
# switch the bar back on under the other, nor the second take "off" for the caller's.
_LOADS = {"count": 0, "bar_was": False}
_LOADS_LOCK = threading.Lock()


@contextmanager
def _no_loading_bars():
    """transformers draws a "Loading weights" bar for the text encoder: a notebook's
    ``materialize(..., progress=False)`` or ``run_interventions(..., progress=False)``
    printed it (only the command line switched it off). Off while any load runs; a bar
    setting of the caller's is restored after the last."""
    from transformers.utils import logging as tf_logging

    with _LOADS_LOCK:
        if _LOADS["count"] == 0:
            _LOADS["bar_was"] = tf_logging.is_progress_bar_enabled()
            tf_logging.disable_progress_bar()
        _LOADS["count"] += 1
    try:
        yield
    finally:
        with _LOADS_LOCK:
            _LOADS["count"] -= 1
            if _LOADS["count"] == 0 and _LOADS["bar_was"]:
                tf_logging.enable_progress_bar()


def load_model(model: str, *, dtype: str | torch.dtype = "float32",
               device: str = "auto") -> LoadedModel:
    """Load ``tiny-random``, a diffusers SD v1.x folder, or a Hugging Face id from the local cache.

    Nothing is ever downloaded and no remote code runs: a missing model is an error that
    says where actstore looked.
    """
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    if dev.type == "cpu":
        configure_cpu_threads()
    path = model_folder(model)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = {"local_files_only": True, "torch_dtype": torch_dtype}
    try:
        with _no_loading_bars():
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer",
                                                      local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ActstoreError(f"model {model!r} at {path}: could not load "
                            f"({first_line(exc)}); check the folder is a complete "
                            "diffusers SD v1.x pipeline") from exc
    scheduler_config = read_scheduler_config(path)
    from actstore.generation.capture import self_attention_layers
    if not self_attention_layers(unet):
        raise ActstoreError(f"model {model!r} at {path}: its UNet has no self-attention "
                            "(attn1) layers; actstore needs an SD v1.x UNet")
    for m in (unet, vae, text_encoder):
        m.to(dev).eval().requires_grad_(False)
    return LoadedModel(name=model, unet=unet, vae=vae, text_encoder=text_encoder,
                       tokenizer=tokenizer, scheduler_config=scheduler_config, device=dev,
                       dtype=torch_dtype, source=str(path))


def model_folder(model: str) -> str:
    """The pipeline folder ``model`` names (``tiny-random`` built on first use), checked."""
    path = build_tiny_random() if model == TINY_RANDOM else _locate(model)
    _check_pipeline_folder(path, model)
    return path


def check_model(model: str) -> None:
    """A one-line error if ``model`` is not found or is no pipeline folder, loading
    nothing: commands check before they create an output folder, a store or a server."""
    if model != TINY_RANDOM:
        _check_pipeline_folder(_locate(model), model)


def _locate(model: str) -> str:
    expanded = os.path.expanduser(os.path.expandvars(model))
    if os.path.isdir(expanded):
        return expanded
    if "/" in model and not os.path.exists(expanded) and model.count("/") == 1 \
            and not model.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        try:
            return snapshot_download(model, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any hub failure means "not cached here"
            raise ActstoreError(
                f"model {model!r} is neither a folder nor in the local Hugging Face cache "
                f"({type(exc).__name__}); download it on a machine with internet and copy it "
                "here, or pass the folder path") from exc
    raise ActstoreError(f"model {model!r}: no such folder; pass a diffusers SD v1.x folder, "
                        f"a cached Hugging Face id, or {TINY_RANDOM!r}")


def _check_pipeline_folder(path: str, model: str) -> None:
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise ActstoreError(f"model {model!r}: {path} has no model_index.json, so it is not a "
                            "diffusers pipeline folder; save one with pipeline.save_pretrained()")
    try:
        entries = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise ActstoreError(f"model {model!r}: {index} is not valid JSON ({exc.msg})") from exc
    missing = [c for c in REQUIRED_COMPONENTS
               if c not in entries or not (Path(path) / c).is_dir()]
    if missing:
        raise ActstoreError(f"model {model!r}: {path} is not an SD v1.x pipeline: missing "
                            f"component(s) {', '.join(missing)} (need {', '.join(REQUIRED_COMPONENTS)})")


def sd_unet(block_out_channels: tuple[int, ...], cross_attention_dim: int, sample_size: int,
            attention_head_dim: int = 8, norm_num_groups: int = 32) -> UNet2DConditionModel:
    """A UNet with SD v1.x's block topology (so its 16 ``attn1`` modules keep SD's names)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=block_out_channels, norm_num_groups=norm_num_groups,
        cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sd_vae(block_out_channels: tuple[int, ...], layers_per_block: int, sample_size: int,
           norm_num_groups: int = 32, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """An AutoencoderKL shaped like SD's (×8 with four blocks), 4 latent channels."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=layers_per_block,
        block_out_channels=block_out_channels, norm_num_groups=norm_num_groups,
        sample_size=sample_size, scaling_factor=scaling_factor,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)


def tiny_random_components(seed: int = 0) -> dict:
    """Random weights with SD v1.x's block topology: the same 16 ``attn1`` names, tiny sizes.

    64×64 images, ×8 VAE, so 8×8 latents; self-attention at 8, 4, 2 and 1 tokens per side.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
        pad_token_id=513))
    return {"unet": sd_unet((32, 64, 64, 64), 32, 8, norm_num_groups=8),
            "vae": sd_vae((8, 16, 16, 16), 1, 64, norm_num_groups=8),
            "text_encoder": text_encoder}


def save_pipeline_folder(path: str | Path, components: dict,
                         tokenizer_writer: Callable[[Path], object] | None = None,
                         scheduler_config: dict | None = None) -> Path:
    """Write a diffusers SD folder (model_index.json layout) from in-memory components."""
    from diffusers import LMSDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (tokenizer_writer or write_byte_level_clip_tokenizer)(path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    scheduler = LMSDiscreteScheduler(**(scheduler_config or SD_BETAS))
    pipe = StableDiffusionPipeline(
        unet=components["unet"], vae=components["vae"], text_encoder=components["text_encoder"],
        tokenizer=tokenizer, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_random(cache_dir: str | None = None) -> str:
    """Build ``tiny-random`` once into a cache folder; later calls just return the folder."""
    root = Path(cache_dir or os.environ.get("ACTSTORE_CACHE",
                                            Path.home() / ".cache" / "actstore"))
    path = root / "tiny-random-v3"
    if (path / "model_index.json").is_file():
        return str(path)
    tmp = root / f".tiny-random-v3.{os.getpid()}.tmp"
    save_pipeline_folder(tmp, tiny_random_components())
    try:
        os.replace(tmp, path)  # atomic: concurrent builders race harmlessly
    except OSError:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def randomize_unet(unet: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The paper's control: permute each weight tensor's elements with a fixed seed.

    Biases (and norm offsets, which diffusers also names ``bias``) keep their values, so
    the control keeps the trained model's activation scales but loses its learned structure.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if name.endswith("bias"):
                continue
            flat = param.data.reshape(-1)
            perm = torch.randperm(flat.numel(), generator=gen).to(flat.device)
            param.data.copy_(flat[perm].reshape(param.shape))
    return unet


def variant_of(control: str | None) -> str:
    """The model variant (the store's ``models/<variant>``) a ``--control`` makes."""
    if control in (None, "", "trained"):
        return "trained"
    if control != "randomized":
        raise ActstoreError(f"--control {control!r} is not known; use 'randomized'")
    return control


def apply_control(model: LoadedModel, control: str | None, seed: int = 0) -> LoadedModel:
    if variant_of(control) == "trained":
        return model
    if model.variant == control:  # already applied (a worker's reused model): permute once
        return model
    randomize_unet(model.unet, seed)
    model.variant = "randomized"
    model._weights_hash = None
    return model


def diffusers_pipeline(model: LoadedModel) -> StableDiffusionPipeline:
    """The same components as a stock diffusers pipeline (LMS): the yardstick that
    actstore's own denoising loop is checked and timed against."""
    from diffusers import LMSDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        unet=model.unet, vae=model.vae, text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        scheduler=LMSDiscreteScheduler.from_config(model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
