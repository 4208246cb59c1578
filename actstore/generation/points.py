"""Capture points: which module outputs a run stores, their names, shapes and hooks.

A capture point is one module output of the pipeline, of one *kind*:

=========  ==============================================  ===============================
kind       module hooked (output stored)                   store name
=========  ==============================================  ===============================
attn1      ``<site>.transformer_blocks.0.attn1``: self-    ``<site>`` (e.g.
           attention before the residual add (the paper)   ``up_blocks.1.attentions.0``)
attn2      ``<site>.transformer_blocks.0.attn2``: cross-   ``attn2/<site>``
           attention before the residual add
block      ``<site>`` (a Transformer2DModel): the residual  ``block/<site>``
           stream after the attention block
resnet     every ``<block>.resnets.<j>`` of the UNet       ``resnet/<block>.resnets.<j>``
vae        ``decoder.mid_block.attentions.<j>.to_out.0``   ``vae/decoder.mid_block.
           of the VAE: its self-attention before the       attentions.<j>``
           residual add, while decoding each step's latent
=========  ==============================================  ===============================

``<site>`` is ``<block>.attentions.<j>``. A name is the module path with the kind in front
(attn1 keeps the bare site, the name stores have always used), so name ↔ module is a
bijection: :func:`module_of` needs no model. Module paths start at the pipeline component
(``unet.`` or ``vae.``).

Every point's output is seen as tokens ``(batch, height·width, channels)`` in row-major
(y, x) order, whatever its native layout (attention outputs are tokens already; Transformer2D
and ResNet outputs are ``(batch, C, H, W)``), so a probe or an edit is written once for all
kinds. :func:`hooks` hands that token view to a callback; a tensor the callback returns
replaces the output (how interventions edit).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from actstore.errors import ActstoreError
from actstore.generation.pointnames import (ATTN1_SUFFIX, DEFAULT_KINDS, KINDS,  # noqa: F401
                                            UNET_KINDS, VAE_SOURCES, CapturePoint, block_of,
                                            kind_of, module_of, name_of, parse_kinds, site_of)

if TYPE_CHECKING:
    from actstore.generation.models import LoadedModel

_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _flow_order(site: str):
    """Data-flow order of UNet sites: encoder, middle, decoder; then by their indices."""
    parts = site.split(".")
    return (_BLOCK_ORDER.get(parts[0], 3), [int(p) for p in parts if p.isdigit()])


def point_sites(unet: torch.nn.Module, vae: torch.nn.Module | None, kind: str) -> list[str]:
    """The sites of one kind in a model, in data-flow order (no forward pass needed)."""
    if kind == "vae":
        if vae is None:
            return []
        sites = [n for n, m in vae.named_modules()
                 if re.fullmatch(r"decoder\.mid_block\.attentions\.\d+", n)]
    elif kind == "resnet":
        sites = [n for n, _ in unet.named_modules()
                 if re.fullmatch(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.resnets\.\d+", n)]
    else:
        sites = [n[: -len(ATTN1_SUFFIX)] for n, _ in unet.named_modules()
                 if n.endswith(ATTN1_SUFFIX)]
    return sorted(sites, key=_flow_order)


def self_attention_layers(unet: torch.nn.Module) -> list[str]:
    """attn1 layer names (= sites) in the UNet's data-flow order."""
    return point_sites(unet, None, "attn1")


def _roots(model) -> dict[str, torch.nn.Module]:
    """Pipeline components by module-path prefix; a bare module is taken as the UNet."""
    if isinstance(model, torch.nn.Module):
        return {"unet": model}
    return {"unet": model.unet, "vae": model.vae}


def get_module(model: LoadedModel | torch.nn.Module, module_path: str) -> torch.nn.Module:
    root, _, rest = module_path.partition(".")
    roots = _roots(model)
    if root not in roots:
        raise ActstoreError(f"capture point module {module_path!r}: the model given has no "
                            f"{root!r} component (pass the LoadedModel, not only its UNet)")
    try:
        return roots[root].get_submodule(rest)
    except AttributeError:
        raise ActstoreError(f"capture point module {module_path!r}: no such module in this "
                            "model; is it an SD v1.x pipeline?") from None


def _primary(output):
    """(tensor, rebuild) for a module output that is a tensor, a tuple, or a diffusers
    output object with ``.sample`` (Transformer2DModel returns either of the last two)."""
    if isinstance(output, torch.Tensor):
        return output, lambda t: t
    if isinstance(output, tuple):
        return output[0], lambda t: (t,) + tuple(output[1:])
    if hasattr(output, "sample"):
        return output.sample, lambda t: type(output)(sample=t)
    raise TypeError(f"capture hook: unexpected module output {type(output).__name__}")


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, T, C) as is; (B, C, H, W) → a (B, H·W, C) view (no copy)."""
    return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x


def from_tokens(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`as_tokens` for a replacement of the same token shape."""
    if like.dim() == 4:
        b, c, h, w = like.shape
        return tokens.transpose(1, 2).reshape(b, c, h, w).contiguous()
    return tokens


@contextmanager
def hooks(model: LoadedModel | torch.nn.Module, points: Iterable[CapturePoint | str],
          fn: Callable[[str, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call ``fn(name, tokens)`` on every listed point's output at each forward pass.

    ``model`` is a :class:`~actstore.generation.models.LoadedModel` (or a bare UNet for
    UNet points); ``points`` are capture points or their store names. ``tokens`` is the
    output as (batch, height·width, channels), a view of the module's own tensor: copy it
    to keep it. A returned tensor of that shape replaces the output; ``None`` leaves it.
    For UNet points the batch is the CFG batch ``[unconditional..., conditional...]``.
    """
    handles = []
    try:
        for point in points:
            name = point if isinstance(point, str) else point.name
            module = get_module(model, module_of(name))

            def hook(_module, _args, output, _name=name):
                x, rebuild = _primary(output)
                new = fn(_name, as_tokens(x))
                return None if new is None else rebuild(from_tokens(new, x))
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def token_grid(n_tokens: int, latent_h: int, latent_w: int) -> tuple[int, int]:
    """Recover the (h, w) token grid from a token count, given the latent aspect ratio."""
    factor = math.sqrt(latent_h * latent_w / n_tokens)
    h, w = round(latent_h / factor), round(latent_w / factor)
    if h * w != n_tokens:
        raise ValueError(f"{n_tokens} tokens do not tile a {latent_h}x{latent_w} latent")
    return h, w


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted output is seen."""


@torch.no_grad()
def decode_until(model: LoadedModel, latents: torch.Tensor, names: list[str],
                 fn: Callable[[str, torch.Tensor], None]) -> None:
    """Run the VAE decoder on ``latents`` (UNet latent space) only as far as the last of
    ``names`` (vae points), calling ``fn(name, tokens)`` on each: the up-sampling blocks,
    most of a decode's cost, never run. Same arithmetic as a full decode up to there."""
    last = names[-1]

    def seen(name: str, tokens: torch.Tensor):
        fn(name, tokens)
        if name == last:
            raise _Stop
        return None

    with hooks(model, names, seen):
        try:
            model.vae.decode(latents.to(model.dtype) / model.vae.config.scaling_factor)
        except _Stop:
            return
    raise RuntimeError(f"VAE decode never reached {last}")


@torch.no_grad()
def capture_points(model: LoadedModel | torch.nn.Module, kinds: Iterable[str] = DEFAULT_KINDS,
                   *, latent_h: int | None = None,
                   latent_w: int | None = None) -> list[CapturePoint]:
    """Every capture point of ``kinds`` with its token grid and channels at this latent size.

    One UNet call on zeros (and, for vae, one truncated VAE decode) measures the shapes:
    cheaper to trust than arithmetic on block configs, and right for any SD-like topology.
    Ordered by kind (as :data:`KINDS`), then data flow. ``latent_h/w`` default to the
    UNet's native sample size.
    """
    kinds = parse_kinds(kinds)
    unet, vae = _roots(model)["unet"], _roots(model).get("vae")
    lh = latent_h or int(unet.config.sample_size)
    lw = latent_w or int(unet.config.sample_size)
    names = [name_of(k, s) for k in kinds for s in point_sites(unet, vae, k)]
    if "vae" in kinds and not any(kind_of(n) == "vae" for n in names):
        raise ActstoreError("--capture vae: this model's VAE decoder has no mid-block "
                            "self-attention; drop vae from --capture")
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str, tokens: torch.Tensor) -> None:
        shapes[name] = tuple(tokens.shape[1:])

    p = next(unet.parameters())
    unet_names = [n for n in names if kind_of(n) != "vae"]
    if unet_names:
        sample = torch.zeros(1, unet.config.in_channels, lh, lw, device=p.device, dtype=p.dtype)
        cross = int(unet.config.cross_attention_dim)
        context = torch.zeros(1, 1, cross, device=p.device, dtype=p.dtype)
        with hooks(unet, unet_names, record):
            unet(sample, torch.tensor(1, device=p.device), encoder_hidden_states=context)
    vae_names = [n for n in names if kind_of(n) == "vae"]
    if vae_names:
        decode_until(model, torch.zeros(1, unet.config.in_channels, lh, lw, device=p.device),
                     vae_names, record)
    out = []
    for name in names:
        n_tokens, channels = shapes[name]
        h, w = token_grid(n_tokens, lh, lw)
        out.append(CapturePoint(name, kind_of(name), module_of(name), block_of(site_of(name)),
                                h, w, channels))
    return out
