"""Label providers: the models (or files) that say what each pixel of an image *is*.

Probes need per-pixel targets computed from the generated image itself, as in the paper
(MiDaS depth, TRACER salient object), because a generated picture matches no ground
truth. Everything that can make such targets fits one small interface, so the label
writer never needs to know whether the labels came from a U-Net, a Hugging Face model or
a file the user made elsewhere.

Specs (``get_provider``)::

    toyworld[:<folder>]         the toy world's label model (default models/toy-labeler)
    hf-depth:<local folder>     transformers depth estimation (DPT/MiDaS, Depth Anything)
    hf-segmentation:<folder>    transformers semantic segmentation → salient = not background
    array:<path>                user labels: .npz or Zarr group with image_id + (N,H,W) arrays

Hugging Face folders: :mod:`actstore.label.hfmodels` (never with remote code).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from actstore.errors import ActstoreError
from actstore.runtime import configure_cpu_threads
from actstore.gpus import check_device
from actstore.kinds import BINARY, CONTINUOUS, KINDS
from actstore.npyfiles import check_numeric, load_plain

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_FORMS = ("toyworld[:<folder>]", "hf-depth:<folder>", "hf-segmentation:<folder>",
              "array:<.npz or zarr group>")
_LOADS: list[str] = []     # every label model this process made, for the tests' count


@runtime_checkable
class LabelProvider(Protocol):
    """Images in, per-pixel maps out.

    ``targets`` maps each target the provider makes to ``"binary"`` or ``"continuous"``.
    ``__call__`` takes uint8 images ``(N, H, W, 3)`` and returns ``{target: float32 (N, H, W)}``
    at the input resolution, binary targets as 0/1.

    Optional members the label writer uses when present: ``spec`` (how to recreate it),
    ``provenance`` (a JSON-able dict stored with the labels), ``by_ids(ids)`` (labels looked
    up by image id instead of computed from images: preferred when present, and such a
    provider is not run on the intermediate x0 images) and ``check(ids, image_hw)`` (raise
    an :class:`ActstoreError` before anything is written if these images can't be labelled).
    """

    name: str
    targets: dict[str, str]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


def get_provider(spec: str, device: str = "cpu", *, load: bool = True) -> LabelProvider:
    """Resolve a provider spec (see the module docstring) to a ready provider (``load``
    False: a label model's folder checked and described, not loaded, and ``device``
    checked by name only: :func:`describe_provider`)."""
    kind, _, arg = str(spec).partition(":")
    if load and kind in ("toyworld", "hf-depth", "hf-segmentation"):
        _LOADS.append(spec)
    if kind != "array":   # a bad name refused in one line, as for generation; the device
        # itself only where the model loads (a --cluster's workers, not its command)
        device = ready_device(device) if load else check_device(str(device), available=False)
    if kind == "toyworld":
        from actstore.label.toyfolder import ToyFolder

        folder = ToyFolder(Path(arg or REPO_ROOT / "models" / "toy-labeler"), spec, device)
        return folder.load() if load else folder
    if kind in ("hf-depth", "hf-segmentation") and arg:
        from actstore.label.hfmodels import HFDepth, HFSegmentation

        model = (HFDepth if kind == "hf-depth" else HFSegmentation)(arg, device=device)
        return model.load() if load else model
    if kind == "array" and arg:
        return ArrayLabels(arg)
    raise ActstoreError(f"label provider {spec!r} is not known; use one of "
                        f"{', '.join(SPEC_FORMS)}")


def provider_loads() -> int:
    """How many label models this process made (``Client.run`` asks each worker): a
    worker should keep one for every task it runs, as it keeps the store's model."""
    return len(_LOADS)


def folder_sha256(path: str | Path,
                  patterns: Iterable[str] = ("*.safetensors", "*.bin")) -> str:
    """One hash over a model folder's weight files, so stored labels name their weights."""
    h = hashlib.sha256()
    for f in sorted(p for pat in patterns for p in Path(path).glob(pat)):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def ready_device(device: str) -> str:
    """``device`` resolved where a label model loads ('auto'; a GPU this machine lacks is
    refused in one line, as for generation), with torch's CPU threads set by the policy
    generation uses: torch's conv sums depend on the thread count, so labels written by
    the command line, the library and cluster workers agree bit for bit only under one."""
    from actstore.generation.models import resolve_device

    device = str(resolve_device(str(device)))
    if device.startswith("cpu"):
        configure_cpu_threads()
    return device


def describe_provider(spec: str, device: str = "cpu") -> LabelProvider:
    """What a process that labels nothing itself needs of ``spec`` (its name, targets,
    provenance, input check), checked as :func:`get_provider` checks it: the fan-out's
    command, whose workers label, and the main job's look before its labels. A label
    model's folder is read, not loaded (:class:`~actstore.label.toyfolder.ToyFolder`,
    :mod:`actstore.label.hfmodels`): before, that process held a model beside its
    workers' only to read these. The device is checked by name only: with ``--cluster``
    the workers load the model, and may have the GPU this process lacks."""
    return get_provider(spec, device, load=False)


class ArrayLabels:
    """User-supplied labels, looked up by image id (they can't be computed from pixels).

    A ``.npz`` (read with ``allow_pickle=False``, so ids must be a fixed-width string
    array: ``np.array(ids, dtype=str)``) or a Zarr group, holding ``image_id`` (N,) and one
    float array (N, H, W) per target. A target is binary if all its values are 0/1 (a Zarr
    array's ``kind`` attribute overrides this). Rows may be in any order and the file may
    hold extra images; ``.npz`` arrays are read whole, so use Zarr for large label sets.
    """

    name = "array"

    def __init__(self, path: str):
        self.path = str(path)
        self.spec = f"array:{self.path}"
        self._arrays, kinds = self._open()
        ids = self._arrays.pop("image_id", None)
        if ids is None:
            raise ActstoreError(f"labels {self.path}: no 'image_id' array; save the image ids "
                                "alongside the label arrays")
        raw = np.asarray(ids[...])
        self._numeric_ids = raw.dtype.kind in "biuf"
        self.image_ids = np.array([str(v) for v in raw.tolist()])
        dup = _duplicates(self.image_ids)
        if dup:
            raise ActstoreError(f"labels {self.path}: image ids repeated ({', '.join(dup[:3])})"
                                "; keep one row per image")
        self._row = {v: i for i, v in enumerate(self.image_ids)}
        for name, arr in self._arrays.items():
            if arr.ndim != 3 or arr.shape[0] != len(self.image_ids):
                raise ActstoreError(f"labels {self.path}: array {name!r} has shape {arr.shape}, "
                                    f"expected (N, H, W) with N = {len(self.image_ids)} image ids")
            check_numeric(arr, f"labels {self.path}: array {name!r}")
        self.targets = {t: kinds.get(t) or _infer_kind(a) for t, a in self._arrays.items()}
        bad = {t: k for t, k in self.targets.items() if k not in KINDS}
        if bad:
            raise ActstoreError(f"labels {self.path}: kind attribute {bad} is not one of {KINDS}")
        self.provenance = {"path": self.path, "n_rows": len(self.image_ids)}

    def _open(self) -> tuple[dict, dict]:
        if self.path.endswith(".npz"):
            if not Path(self.path).is_file():
                raise ActstoreError(f"labels {self.path}: file not found")
            return load_plain(self.path, f"labels {self.path}"), {}
        import zarr

        try:
            group = zarr.open_group(self.path, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as exc:
            raise ActstoreError(f"labels {self.path}: not a .npz file or Zarr group "
                                f"({type(exc).__name__})") from None
        arrays = dict(group.arrays())
        return arrays, {k: a.attrs.get("kind") for k, a in arrays.items()}

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        raise ActstoreError(f"labels {self.path}: user labels are looked up by image id, not "
                            "computed from images; use by_ids()")

    def check(self, ids: Sequence[str], image_hw: tuple[int, int]) -> None:
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise ActstoreError(f"labels {self.path}: {len(missing)} of the store's {len(ids)} "
                                f"image ids are missing (e.g. {', '.join(missing[:3])}); label "
                                f"every image of the store{self._id_hint()}")
        for name, arr in self._arrays.items():
            if tuple(arr.shape[1:]) != tuple(image_hw):
                raise ActstoreError(f"labels {self.path}: {name!r} is {arr.shape[1]}x"
                                    f"{arr.shape[2]} but the store's images are {image_hw[0]}x"
                                    f"{image_hw[1]}; resize the labels to the image size")

    def _id_hint(self) -> str:
        # ids saved as row numbers match none of the store's string ids: say so
        shown = ", ".join(self.image_ids[:3])
        if self._numeric_ids:
            return (f" (this file's image_id holds numbers, {shown} ...: save the store's "
                    "image ids, as strings)")
        return f" (this file's ids begin {shown})"

    def by_ids(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Rows for ``ids`` in that order; a missing id is an error naming it."""
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise ActstoreError(f"labels {self.path}: image ids {', '.join(missing[:3])} "
                                "missing; label every image of the store")
        rows = np.array([self._row[i] for i in ids], dtype=np.int64)
        order = np.argsort(rows)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        out = {}
        for name, arr in self._arrays.items():
            data = arr[rows] if isinstance(arr, np.ndarray) else arr.oindex[rows[order]][inverse]
            out[name] = np.asarray(data, dtype=np.float32)
        return out


def _duplicates(values: np.ndarray) -> list[str]:
    uniq, counts = np.unique(values, return_counts=True)
    return [str(v) for v in uniq[counts > 1]]


def _infer_kind(arr, rows: int = 64) -> str:
    """Binary iff every value is 0 or 1 (read in row blocks so Zarr labels stream)."""
    for a in range(0, arr.shape[0], rows):
        block = np.asarray(arr[a:a + rows])
        if not np.isin(block, (0, 1)).all():
            return CONTINUOUS
    return BINARY
