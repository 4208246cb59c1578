"""The toy label model's folder as a label provider (``toyworld[:<folder>]``).

The folder is read before torch loads anything (its config and the safetensors header, a
few hundred bytes), so each way it can fail is named for what it is: a file this process
may not read, a file cut short, another model's folder. Before, every error while loading
was read as 'holds no toy label model', a CUDA out-of-memory and a permission refused
alike, and a truncated file or an unreadable one (which safetensors reports as missing)
passed as an unexpected error.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from actstore.errors import ActstoreError, first_line

if TYPE_CHECKING:
    from actstore.toyworld.labeler import ToyLabeler

CONFIG, WEIGHTS = "config.json", "model.safetensors"
TRAIN = "python -m actstore.toyworld.labeler_train"
# safetensors' own bound on a header (its MAX_HEADER_SIZE), so a hostile length is refused
# before it is read, as the load would refuse it
MAX_HEADER = 100_000_000
MAX_CONFIG = 1_000_000     # a label network's config is a few lines; more is not one
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def check_folder(path: Path, spec: str) -> dict:
    """The folder's config, once its files are readable and its weights are, by name and
    shape, those of the label network the config describes."""
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ActstoreError(f"label provider {spec}: no toy label model in {path} (needs "
                            f"{CONFIG} + {WEIGHTS}); train it with `{TRAIN}` or pass "
                            "toyworld:<folder>")
    try:
        config = json.loads(_read(path / CONFIG, spec, MAX_CONFIG))
        expected = _expected_shapes(config["widths"])
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
        raise _not_toy(spec, path, f"its {CONFIG} describes none: {first_line(exc, 80)}")
    found = _header_shapes(path / WEIGHTS, spec)
    if found != expected:
        missing = sorted(set(expected) - set(found))
        other = sorted(k for k in found if expected.get(k, found[k]) != found[k])
        what = (f"missing {', '.join(missing[:3])}" if missing else
                f"{other[0]} is {list(found[other[0]])}, not {list(expected[other[0]])}"
                if other else f"unexpected {', '.join(sorted(set(found) - set(expected))[:3])}")
        raise _not_toy(spec, path, f"its weights are not the label network's: {what}")
    return config


class ToyFolder:
    """A checked toy label model folder: the provider's name, targets and provenance read
    from it, the model loaded only by :meth:`load` (or a first call)."""

    name = "toyworld"

    def __init__(self, path: Path, spec: str, device: str):
        from actstore.label.providers import folder_sha256
        from actstore.toyworld.labeler import TARGETS

        check_folder(path, spec)
        self.path, self.given, self.device = path, spec, device
        self.spec = spec if ":" in spec else f"toyworld:{path}"
        self.targets = dict(TARGETS)
        self.provenance = {"folder": str(path), "weights_sha256": folder_sha256(path)}
        self._model = None

    def load(self) -> ToyLabeler:
        """The model on this folder's device, as a provider with this folder's identity:
        what fails now is the load itself (out of memory, a device error), said as such."""
        from actstore.label.providers import ready_device
        from actstore.toyworld.labeler import ToyLabeler

        if self._model is None:
            self.device = ready_device(self.device)   # described by name only
            try:
                model = ToyLabeler.from_pretrained(self.path, device=self.device)
            except Exception as exc:    # noqa: BLE001 - any cause, named in the line
                memory = isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
                raise ActstoreError(
                    f"label provider {self.given}: loading {self.path / WEIGHTS} on "
                    f"{self.device} failed ({type(exc).__name__}: {first_line(exc, 120)}); "
                    + ("free memory on that device or pass another --device" if memory else
                       "check the folder, or retrain it with `" + TRAIN + "`")) from None
            model.spec, model.provenance = self.spec, self.provenance
            self._model = model
        return self._model

    def __call__(self, images):
        return self.load()(images)


def _read(file: Path, spec: str, size: int | None = None, at: int = 0) -> bytes:
    try:
        with open(file, "rb") as fh:
            fh.seek(at)
            return fh.read() if size is None else fh.read(size)
    except OSError as exc:
        raise ActstoreError(f"label provider {spec}: cannot read {file} "
                            f"({exc.strerror or first_line(exc, 80)}); check its permissions "
                            "and disk, or pass toyworld:<folder> of a readable copy") from None


def _header_shapes(file: Path, spec: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header, after checking that the file holds
    every byte the header names (a copy cut short fails here, not as a missing file) and
    that each tensor's bytes are where and as long as its shape and dtype say: a header
    that passed on names and shapes alone (offsets [-5, -1]) failed in the load as an
    'out of memory'-like line, and a nested or infinite number in it as a traceback."""
    size = file.stat().st_size
    head = _read(file, spec, 8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    try:
        if n < 2 or 8 + n > size or n > MAX_HEADER:
            raise ValueError(f"a header of {n} bytes in {size}")
        header = json.loads(_read(file, spec, n, at=8))
        header.pop("__metadata__", None)
        found = {k: _tensor_bytes(k, t) for k, t in header.items()}
        end = max((e for _, e in found.values()), default=0)
        if 8 + n + end > size:
            raise ValueError(f"{size} bytes, the header names {8 + n + end}")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError,
            RecursionError) as exc:
        raise ActstoreError(f"label provider {spec}: {file} is not a whole safetensors file "
                            f"({first_line(exc, 80)}); copy it again or retrain with "
                            f"`{TRAIN}`") from None
    return {k: shape for k, (shape, _) in found.items()}


def _tensor_bytes(name: str, entry: dict) -> tuple[tuple[int, ...], int]:
    """One header entry's shape and the end of its bytes, once those bytes are as many as
    its shape and dtype make, from an offset of 0 or more."""
    shape = tuple(int(d) for d in entry["shape"])
    begin, end = (int(x) for x in entry["data_offsets"])
    if entry["dtype"] not in ITEM_BYTES:
        raise ValueError(f"{name}: dtype {str(entry['dtype'])[:20]!r}, which no label "
                         "network holds")
    length = ITEM_BYTES[entry["dtype"]] * math.prod(shape)
    if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != length:
        raise ValueError(f"{name}: bytes [{begin}, {end}] for {entry['dtype']} {list(shape)}")
    return shape, end


def _expected_shapes(widths) -> dict[str, tuple[int, ...]]:
    """The label network's parameter shapes, built on torch's meta device (no memory)."""
    import torch

    from actstore.toyworld.labeler import LabelNet

    if not isinstance(widths, list) or not widths or \
            not all(isinstance(w, int) and 0 < w for w in widths):
        raise ValueError(f"widths {str(widths)[:40]} are not positive whole numbers")
    with torch.device("meta"):
        net = LabelNet(widths)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _not_toy(spec: str, path: Path, why: str) -> ActstoreError:
    return ActstoreError(f"label provider {spec}: {path} holds no toy label model ({why}); "
                         f"pass toyworld:<folder> of a model `{TRAIN}` wrote, e.g. "
                         "models/toy-labeler")
