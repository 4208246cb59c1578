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

Hugging Face folders are loaded with ``local_files_only=True`` and never with
``trust_remote_code``: labels become scientific data, so the code that makes them must be
code we have read (transformers itself), not code shipped with the weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from actstore.errors import ActstoreError, first_line
from actstore.runtime import configure_cpu_threads
from actstore.kinds import BINARY, CONTINUOUS, KINDS
from actstore.npyfiles import check_numeric, load_plain

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_FORMS = ("toyworld[:<folder>]", "hf-depth:<folder>", "hf-segmentation:<folder>",
              "array:<.npz or zarr group>")
# Class names that mean "not the object" in common segmentation label sets: VOC-style
# "background", binary foreground models, and the stuff classes of ADE20K/Cityscapes/COCO
# that fill the scene behind objects. If none appear, class 0 is taken as background.
BACKGROUND_NAMES = frozenset({
    "background", "__background__", "bg", "void", "unlabeled", "unlabelled", "other",
    "others", "sky", "wall", "floor", "ceiling", "road", "sidewalk", "ground", "earth",
    "grass", "field", "sea", "water", "sand", "terrain"})
# Models whose output is metric depth, not MiDaS-style relative inverse depth.
METRIC_DEPTH_TYPES = frozenset({"zoedepth", "glpn", "depth_pro"})


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
    False: the toy label model's folder checked and described, not loaded:
    :func:`describe_provider`).

    A label model on the CPU runs with the thread policy generation uses: torch's conv
    sums depend on the thread count, so labels written by the command line, the library
    and cluster workers agree bit for bit only under one policy."""
    kind, _, arg = str(spec).partition(":")
    if kind != "array":   # 'auto' and a bad name resolved as for generation, in one line
        from actstore.generation.models import resolve_device

        device = str(resolve_device(str(device)))
        if device.startswith("cpu"):
            configure_cpu_threads()
    if kind == "toyworld":
        from actstore.label.toyfolder import ToyFolder

        folder = ToyFolder(Path(arg or REPO_ROOT / "models" / "toy-labeler"), spec, device)
        return folder.load() if load else folder
    if kind in ("hf-depth", "hf-segmentation") and arg:
        cls = HFDepth if kind == "hf-depth" else HFSegmentation
        return cls(arg, device=device)
    if kind == "array" and arg:
        return ArrayLabels(arg)
    raise ActstoreError(f"label provider {spec!r} is not known; use one of "
                        f"{', '.join(SPEC_FORMS)}")


def folder_sha256(path: str | Path, patterns=("*.safetensors", "*.bin")) -> str:
    """One hash over a model folder's weight files, so stored labels name their weights."""
    h = hashlib.sha256()
    for f in sorted(p for pat in patterns for p in Path(path).glob(pat)):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def resize_maps(maps, size: tuple[int, int], mode: str = "bilinear"):
    """``(N, h, w)`` or ``(N, C, h, w)`` torch maps to ``size``, pixel centres aligned."""
    import torch.nn.functional as F

    x = maps[:, None] if maps.ndim == 3 else maps
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x.float(), size=tuple(size), mode=mode, align_corners=False)
    return x[:, 0] if maps.ndim == 3 else x


def _check_images(images: np.ndarray, who: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ActstoreError(f"{who}: expected uint8 images shaped (N, H, W, 3), got "
                            f"{images.dtype} {images.shape}")
    return images


def describe_provider(spec: str, device: str = "cpu") -> LabelProvider:
    """What a process that labels nothing itself needs of ``spec`` (its name, targets,
    provenance, input check), checked as :func:`get_provider` checks it: the fan-out's
    command, whose workers label, and the main job's look before its labels. The toy
    label model's folder is read, not loaded (:class:`~actstore.label.toyfolder.ToyFolder`):
    before, that process held a model beside its workers' only to read these. Other
    providers are loaded as by :func:`get_provider`."""
    return get_provider(spec, device, load=False)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _check_safetensors(folder: Path, spec: str) -> None:
    """Weights only as safetensors: a pickle can run code when loaded, so it is refused
    here, by name, before transformers or torch open anything."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    found = f" (found {', '.join(pickles)}: pickle files, never loaded)" if pickles else ""
    raise ActstoreError(f"label provider {spec}: no *.safetensors weights in {folder}{found}; "
                        "save the model with save_pretrained(..., safe_serialization=True)")


class _HFModel:
    """Shared loading and batching for transformers vision models in a local folder."""

    name = "hf"
    targets: dict[str, str] = {}
    prefix = ""

    def __init__(self, folder: str, device: str = "cpu"):
        import torch
        import transformers

        self.folder = Path(folder).expanduser()
        self.spec = f"{self.prefix}:{folder}"
        self.device = device
        for needed in ("config.json", "preprocessor_config.json"):
            if not (self.folder / needed).is_file():
                raise ActstoreError(f"label provider {self.spec}: no {needed} in {self.folder}; "
                                    "give a local folder saved with save_pretrained (nothing "
                                    "is downloaded)")
        kw = {"local_files_only": True, "trust_remote_code": False}
        try:
            self.config = transformers.AutoConfig.from_pretrained(self.folder, **kw)
            self.processor = transformers.AutoImageProcessor.from_pretrained(self.folder, **kw)
        except (ValueError, OSError, KeyError) as exc:
            raise ActstoreError(f"label provider {self.spec}: transformers can't load it "
                                "without remote code, which actstore never runs "
                                f"({first_line(exc, 120)}); use a model type "
                                "transformers ships") from None
        _check_safetensors(self.folder, self.spec)
        # float32 whatever the checkpoint: transformers loads a folder in the dtype it was
        # saved in (dtype="auto" since 5.0), and a float16 checkpoint fed the processor's
        # float32 pixels raised; labels are targets, made at full precision on any device
        self.model = self._load_model(transformers, kw).to(device, torch.float32).eval()
        self.provenance = {"folder": str(self.folder), "model_type": self.config.model_type,
                           "model_class": type(self.model).__name__,
                           "transformers": transformers.__version__,
                           "weights_sha256": folder_sha256(self.folder)}

    def _load_model(self, transformers, kw):
        tried = []
        for auto in self.auto_classes:
            cls = getattr(transformers, auto)
            try:
                return cls.from_pretrained(self.folder, use_safetensors=True, **kw)
            except ValueError:
                tried.append(auto)
        raise ActstoreError(f"label provider {self.spec}: model type "
                            f"{self.config.model_type!r} is not a {' or '.join(tried)}; use "
                            f"a {self.prefix.removeprefix('hf-')} model")

    def _forward(self, images: np.ndarray):
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if hasattr(v, "to")}
        with torch.no_grad():
            return self.model(**inputs)

    def __call__(self, images: np.ndarray, batch_size: int = 16) -> dict[str, np.ndarray]:
        images = _check_images(images, f"label provider {self.spec}")
        n, h, w, _ = images.shape
        outs = [self._maps(images[i:i + batch_size], (h, w)) for i in range(0, n, batch_size)]
        target = next(iter(self.targets))
        maps = np.concatenate(outs) if outs else np.zeros((0, h, w), np.float32)
        return {target: maps.astype(np.float32)}


class HFDepth(_HFModel):
    """Relative inverse depth (MiDaS convention, as the paper) at the image's size.

    DPT/MiDaS and relative Depth Anything already predict inverse depth; a metric-depth
    model's output is inverted so the target means the same thing whatever the model.
    Resized bicubically, as the DPT reference code does.
    """

    name = "hf-depth"
    prefix = "hf-depth"
    targets = {"depth": CONTINUOUS}
    auto_classes = ("AutoModelForDepthEstimation",)

    def __init__(self, folder: str, device: str = "cpu"):
        super().__init__(folder, device)
        self.metric = (getattr(self.config, "depth_estimation_type", None) == "metric"
                       or self.config.model_type in METRIC_DEPTH_TYPES)
        self.provenance["output"] = ("1/metric depth" if self.metric
                                     else "relative inverse depth")

    def _maps(self, images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        depth = self._forward(images).predicted_depth.float()
        if self.metric:
            depth = 1.0 / depth.clamp(min=1e-6)
        return resize_maps(depth, size, mode="bicubic").cpu().numpy()


def background_ids(id2label: dict) -> list[int]:
    """Classes that are not the salient object: named background/stuff classes, else 0."""
    named = sorted(int(i) for i, label in id2label.items()
                   if str(label).strip().lower().replace("_", " ") in BACKGROUND_NAMES)
    return named or [0]


class HFSegmentation(_HFModel):
    """Salient object as "not background" from a semantic segmentation model, 0/1.

    Logits are upsampled to the image size before the argmax (as transformers'
    ``post_process_semantic_segmentation``), so mask edges aren't blocky. A one-channel
    model (foreground logit, as background-removal models) is thresholded at logit 0.
    """

    name = "hf-segmentation"
    prefix = "hf-segmentation"
    targets = {"salient": BINARY}
    auto_classes = ("AutoModelForSemanticSegmentation", "AutoModelForImageSegmentation")

    def __init__(self, folder: str, device: str = "cpu"):
        super().__init__(folder, device)
        self.background = background_ids(self.config.id2label)
        self.provenance["background_ids"] = self.background
        self.provenance["background_labels"] = [str(self.config.id2label.get(i, i))
                                                for i in self.background]

    def _maps(self, images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        import torch

        logits = getattr(self._forward(images), "logits", None)
        if logits is None or logits.ndim != 4:
            raise ActstoreError(f"label provider {self.spec}: model type "
                                f"{self.config.model_type!r} gives no per-pixel class "
                                "logits (N, classes, h, w); use a semantic segmentation model")
        background = torch.tensor(self.background, device=logits.device)
        masks = []
        for one in logits.float():  # one image at a time: 150 classes at 512² is 150 MB
            up = resize_maps(one[None], size)[0]
            fg = up[0] > 0 if up.shape[0] == 1 else ~torch.isin(up.argmax(0), background)
            masks.append(fg.float().cpu().numpy())
        return np.stack(masks)


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
