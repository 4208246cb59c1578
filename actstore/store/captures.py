"""Which capture points a model variant holds, and on which image blocks.

A variant is created with one set of capture kinds, its *creation kinds*: listed in its
fingerprint (``capture.kinds``; absent in stores made before capture kinds existed, whose
kind is attn1), complete on a block when the block's record ``_blocks/<a>-<b>`` exists.
A kind added to an existing variant gets its own group with its own records::

    models/<variant>/captures/<kind>/        marker attrs["actstore_capture"]: fingerprint of
                                             the kind's points (names, modules, shapes, options)
      _blocks/<start>-<stop>/                that kind's arrays are written for the block

Its arrays sit beside the others (``layers/<name>/activation``). Readers show an added
kind once its records cover every block whose images are complete, so a half-added kind is
invisible rather than half-filled.
"""

from __future__ import annotations

from actstore.generation.pointnames import CapturePoint, block_of, kind_of, module_of, site_of
from actstore.store import commit, io
from actstore.store import layout as lay

LEGACY_KINDS = ("attn1",)


def creation_kinds(fingerprint: dict) -> tuple[str, ...]:
    return tuple(fingerprint.get("capture", {}).get("kinds") or LEGACY_KINDS)


def points_of(fingerprint: dict) -> list[CapturePoint]:
    """The capture points a fingerprint describes (its ``layers`` and ``layer_shapes``)."""
    out = []
    for name in fingerprint["layers"]:
        h, w, c = (int(v) for v in fingerprint["layer_shapes"][name])
        out.append(CapturePoint(name, kind_of(name), module_of(name), block_of(site_of(name)),
                                h, w, c))
    return out


def points_fingerprint(points: list[CapturePoint]) -> dict:
    """How a fingerprint names its points: order, shapes, and each one's kind and module."""
    return {"layers": [p.name for p in points],
            "layer_shapes": {p.name: [p.height, p.width, p.channels] for p in points},
            "points": {p.name: {"kind": p.kind, "module": p.module} for p in points}}


def added_captures(uri: str, variant: str) -> dict[str, dict]:
    """Kinds added after creation: kind → their marker (fingerprint, provenance). A group
    without its marker is still being created and does not count."""
    markers = io.marked_children(uri, f"{lay.model_path(variant)}/{lay.CAPTURES}",
                                 lambda k: lay.capture_group(variant, k), lay.CAPTURE_KEY)
    return {kind: attrs[lay.CAPTURE_KEY] for kind, attrs in markers.items()}


def kind_blocks(uri: str, variant: str, kind: str, fingerprint: dict,
                base: set[tuple[int, int]] | None = None) -> set[tuple[int, int]]:
    """The blocks on which ``kind``'s arrays are complete."""
    if kind in creation_kinds(fingerprint):
        return commit.completed_blocks_at(uri, lay.model_path(variant)) if base is None else base
    return commit.completed_blocks_at(uri, lay.capture_group(variant, kind))


def create_capture(uri: str, variant: str, kind: str, marker: dict) -> None:
    """The group of a kind being added: its records' parent, then its marker (one PUT)."""
    group = lay.capture_group(variant, kind)
    io.put_group(uri, lay.blocks_path(group))
    io.put_group(uri, f"{lay.model_path(variant)}/{lay.CAPTURES}")
    io.put_group(uri, group, {lay.CAPTURE_KEY: marker})


def remove_capture(uri: str, variant: str, kind: str, points: list[CapturePoint],
                   blocks: list[tuple[int, int]] | None = None) -> None:
    """Take back a kind: only the given blocks' records, or (``blocks`` None) the whole
    kind, its group and arrays (a kill midway leaves it without marker or without records:
    invisible either way)."""
    group = lay.capture_group(variant, kind)
    if blocks is not None:
        for a, b in blocks:
            io.remove(uri, lay.block_record_path(group, a, b))
        return
    io.remove(uri, group)
    for p in points:
        io.remove(uri, lay.layer_group(variant, p.name))
    for parent in (f"{lay.model_path(variant)}/{lay.LAYERS}/{kind}",
                   f"{lay.model_path(variant)}/{lay.CAPTURES}"):
        if not [n for n in io.list_dir(uri, parent) if n != io.META]:
            io.remove(uri, parent)
