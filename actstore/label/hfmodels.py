"""Hugging Face label models (``hf-depth:<folder>``, ``hf-segmentation:<folder>``): a
transformers vision model in a local folder, as a label provider.

A folder is described from its files before any weights load: its config and image
processor, the model class transformers makes of the config (found as ``from_pretrained``
finds it), the weights' hash. A fan-out's command (``label --workers/--cluster``), whose
workers label, needs only that description, its provenance and the job key made of it;
before, it loaded the model beside its workers just to read them. The weights load on
:meth:`_HFModel.load` or a first call.

Folders are loaded with ``local_files_only=True`` and never with ``trust_remote_code``:
labels become scientific data, so the code that makes them must be code we have read
(transformers itself), not code shipped with the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from actstore.errors import ActstoreError, first_line
from actstore.kinds import BINARY, CONTINUOUS

if TYPE_CHECKING:
    import torch

# Class names that mean "not the object" in common segmentation label sets: VOC-style
# "background", binary foreground models, and the stuff classes of ADE20K/Cityscapes/COCO
# that fill the scene behind objects. If none appear, class 0 is taken as background.
BACKGROUND_NAMES = frozenset({
    "background", "__background__", "bg", "void", "unlabeled", "unlabelled", "other",
    "others", "sky", "wall", "floor", "ceiling", "road", "sidewalk", "ground", "earth",
    "grass", "field", "sea", "water", "sand", "terrain"})
# Models whose output is metric depth, not MiDaS-style relative inverse depth.
METRIC_DEPTH_TYPES = frozenset({"zoedepth", "glpn", "depth_pro"})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
LOAD_OPTIONS = {"local_files_only": True, "trust_remote_code": False}


def resize_maps(maps: torch.Tensor, size: tuple[int, int],
                mode: str = "bilinear") -> torch.Tensor:
    """``(N, h, w)`` or ``(N, C, h, w)`` torch maps to ``size``, pixel centres aligned."""
    import torch.nn.functional as F

    x = maps[:, None] if maps.ndim == 3 else maps
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x.float(), size=tuple(size), mode=mode, align_corners=False)
    return x[:, 0] if maps.ndim == 3 else x


def check_images(images: np.ndarray, who: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ActstoreError(f"{who}: expected uint8 images shaped (N, H, W, 3), got "
                            f"{images.dtype} {images.shape}")
    return images


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
    """Shared description, loading and batching for transformers vision models in a
    local folder."""

    name = "hf"
    targets: dict[str, str] = {}
    prefix = ""
    auto_classes: dict[str, str] = {}   # auto class → the mapping transformers exports

    def __init__(self, folder: str, device: str = "cpu"):
        import transformers

        from actstore.label.providers import folder_sha256

        self.folder = Path(folder).expanduser()
        self.spec = f"{self.prefix}:{folder}"
        self.device = device
        for needed in ("config.json", "preprocessor_config.json"):
            if not (self.folder / needed).is_file():
                raise ActstoreError(f"label provider {self.spec}: no {needed} in {self.folder}; "
                                    "give a local folder saved with save_pretrained (nothing "
                                    "is downloaded)")
        try:
            self.config = transformers.AutoConfig.from_pretrained(self.folder, **LOAD_OPTIONS)
            self.processor = transformers.AutoImageProcessor.from_pretrained(self.folder,
                                                                             **LOAD_OPTIONS)
        except (ValueError, OSError, KeyError) as exc:
            raise ActstoreError(f"label provider {self.spec}: transformers can't load it "
                                "without remote code, which actstore never runs "
                                f"({first_line(exc, 120)}); use a model type "
                                "transformers ships") from None
        _check_safetensors(self.folder, self.spec)
        self._auto, model_class = self._model_class(transformers)
        self.model = None
        self.provenance = {"folder": str(self.folder), "model_type": self.config.model_type,
                           "model_class": model_class.__name__,
                           "transformers": transformers.__version__,
                           "weights_sha256": folder_sha256(self.folder)}

    def _model_class(self, transformers) -> tuple[str, type]:
        """The auto class that takes this config and the model class it makes of it, as
        its ``from_pretrained`` picks them, no weights read: from the config-to-class
        mapping transformers exports for each auto class (``MODEL_FOR_..._MAPPING``), the
        class the config's ``architectures`` names where the mapping offers several, else
        the first. Public names only: a private helper can go in any release."""
        for auto, mapping_name in self.auto_classes.items():
            mapping = getattr(transformers, mapping_name)
            if type(self.config) in mapping:
                offered = mapping[type(self.config)]
                if not isinstance(offered, (list, tuple)):
                    return auto, offered
                named = {c.__name__: c for c in offered}
                return auto, next((named[a] for a in self.config.architectures or ()
                                   if a in named), offered[0])
        raise ActstoreError(f"label provider {self.spec}: model type "
                            f"{self.config.model_type!r} is not a "
                            f"{' or '.join(self.auto_classes)}; use a "
                            f"{self.prefix.removeprefix('hf-')} model")

    def load(self) -> "_HFModel":
        """The weights on this provider's device (once; the provider itself returned)."""
        import torch
        import transformers

        from actstore.label.providers import ready_device

        if self.model is None:
            self.device = ready_device(self.device)
            auto = getattr(transformers, self._auto)
            # float32 whatever the checkpoint: transformers loads a folder in the dtype it
            # was saved in (dtype="auto" since 5.0), and a float16 checkpoint fed the
            # processor's float32 pixels raised; labels are targets, made at full precision
            model = auto.from_pretrained(self.folder, use_safetensors=True, **LOAD_OPTIONS)
            self.model = model.to(self.device, torch.float32).eval()
        return self

    def _forward(self, images: np.ndarray):
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if hasattr(v, "to")}
        with torch.no_grad():
            return self.load().model(**inputs)

    def __call__(self, images: np.ndarray, batch_size: int = 16) -> dict[str, np.ndarray]:
        images = check_images(images, f"label provider {self.spec}")
        self.load()
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
    auto_classes = {"AutoModelForDepthEstimation": "MODEL_FOR_DEPTH_ESTIMATION_MAPPING"}

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
    auto_classes = {
        "AutoModelForSemanticSegmentation": "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING",
        "AutoModelForImageSegmentation": "MODEL_FOR_IMAGE_SEGMENTATION_MAPPING"}

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
