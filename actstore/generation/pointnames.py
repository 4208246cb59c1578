"""Capture-point names and kinds, without torch: the store's reader needs them too.

See :mod:`actstore.generation.points` for what each kind captures and how it is hooked.
A name is the captured module's path with the kind in front (attn1 keeps the bare site,
``<block>.attentions.<j>``, the name stores have always used), so name ↔ module is a
bijection and :func:`module_of` needs no model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from actstore.errors import ActstoreError
from actstore.options import named_once

KINDS = ("attn1", "attn2", "block", "resnet", "vae")
DEFAULT_KINDS = ("attn1",)
UNET_KINDS = ("attn1", "attn2", "block", "resnet")   # hooked during denoising (CFG batch)
VAE_SOURCES = ("latent", "x0")   # what the vae kind decodes: the step's latent (the paper) or x0
ATTN1_SUFFIX = ".transformer_blocks.0.attn1"
ATTN2_SUFFIX = ".transformer_blocks.0.attn2"
VAE_SUFFIX = ".to_out.0"


@dataclass(frozen=True)
class CapturePoint:
    """One stored module output: name in the store, kind, module path and token grid."""

    name: str
    kind: str
    module: str
    block: str
    height: int
    width: int
    channels: int

    @property
    def resolution(self) -> int:
        return self.height

    @property
    def cfg(self) -> bool:
        """Does its output carry the [unconditional, conditional] CFG batch?"""
        return self.kind in UNET_KINDS

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    def attrs(self) -> dict:
        """What each stored array says about itself."""
        return {"layer": self.name, **asdict(self), "resolution": self.height}


def parse_kinds(kinds: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"attn1,block"`` or a list → kinds in canonical order; a one-line error otherwise."""
    if kinds is None:
        return DEFAULT_KINDS
    items = [k.strip() for k in (kinds.split(",") if isinstance(kinds, str) else kinds)]
    items = [k for k in items if k]
    bad = [k for k in items if k not in KINDS]
    if bad or not items:
        raise ActstoreError(f"--capture {','.join(items) or repr(kinds)}: "
                            f"{'unknown kind ' + repr(bad[0]) if bad else 'no kind given'}; "
                            f"use a comma-separated subset of {','.join(KINDS)}")
    named_once("--capture", "kind", items, sep=",")   # was dropped without a word
    return tuple(k for k in KINDS if k in items)


def kind_of(name: str) -> str:
    """The capture kind a store name stands for (bare names are attn1)."""
    head, _, rest = name.partition("/")
    if not rest:
        return "attn1"
    if head not in KINDS or head == "attn1":
        raise ActstoreError(f"capture point {name!r}: not a capture point name (use "
                            f"<site> for attn1 or <kind>/<module> with kind in {KINDS[1:]})")
    return head


def site_of(name: str) -> str:
    """The name without its kind: the UNet/VAE module path it is anchored at."""
    return name.partition("/")[2] or name


def module_of(name: str) -> str:
    """The full module path (from ``unet.`` or ``vae.``) whose output a name stores."""
    kind, site = kind_of(name), site_of(name)
    return {"attn1": f"unet.{site}{ATTN1_SUFFIX}", "attn2": f"unet.{site}{ATTN2_SUFFIX}",
            "block": f"unet.{site}", "resnet": f"unet.{site}",
            "vae": f"vae.{site}{VAE_SUFFIX}"}[kind]


def name_of(kind: str, site: str) -> str:
    return site if kind == "attn1" else f"{kind}/{site}"


def block_of(site: str) -> str:
    match = re.match(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block|decoder\.mid_block)", site)
    return match.group(1) if match else site.split(".")[0]
