"""Toy-world prompt reader: which objects are in a picture, how many, where the light is.

A person judging a sample grid asks of each image "is that a red sphere in front of a blue
cube, lit from the left?". This small classifier, trained on renders, asks the same of
every generated image, so "recognisable objects and lighting" becomes a number (agreement
with the prompt) next to the picture, with the reader's agreement on held-out renders as
its ceiling. It judges samples only; probing never uses it.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from actstore.errors import ActstoreError
from actstore.toyworld.ckpt import load_folder, save_folder
from actstore.toyworld.labeler import _block, _to_input
from actstore.toyworld.labeler_train import _augment, fit
from actstore.toyworld.render import SCENE_COLOURS, render_batch
from actstore.toyworld.vocab import LIGHTS, SHAPES

OBJECTS: tuple[tuple[str, str], ...] = tuple((c, s) for c in SCENE_COLOURS for s in SHAPES)
# The reader's own question, not the world's current setting: in a one-object world,
# "did the model draw two?" is exactly the clutter worth counting.
COUNTS: tuple[int, ...] = (1, 2)
TRAIN_SEED_OFFSET = 400_000
EVAL_SEED_OFFSET = 500_000
DEFAULT_CONFIG = {"widths": [16, 32, 64, 64], "size": 64, "objects": [list(o) for o in OBJECTS],
                  "lights": list(LIGHTS), "counts": list(COUNTS)}


class ReaderNet(nn.Module):
    """Conv blocks down to 4×4, flattened (position matters: a shadow's side is the
    light's), then one linear head per question: light, count, each (colour, shape)."""

    def __init__(self, widths=(16, 32, 64, 64), size: int = 64):
        super().__init__()
        w = list(widths)
        self.blocks = nn.ModuleList([_block(3, w[0])] + [_block(w[i], w[i + 1])
                                                         for i in range(len(w) - 1)])
        cells = (size // 2 ** len(w)) ** 2 * w[-1]
        self.light = nn.Linear(cells, len(LIGHTS))
        self.count = nn.Linear(cells, len(COUNTS))
        self.objects = nn.Linear(cells, len(OBJECTS))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for blk in self.blocks:
            x = F.avg_pool2d(blk(x), 2)
        x = x.flatten(1)
        return {"light": self.light(x), "count": self.count(x), "objects": self.objects(x)}


_OBJECT = re.compile(r"\ba (\w+) (" + "|".join(SHAPES) + r")\b")
_LIGHT = re.compile(r"light from (?:the )?(\w+)")


def attributes(prompts: list[str]) -> dict[str, np.ndarray]:
    """The answers each prompt implies (light index, count index, multi-hot objects), read
    from the words, so any prompt table of the toy vocabulary can be judged."""
    objects = np.zeros((len(prompts), len(OBJECTS)), np.float32)
    light, count = [], []
    for i, prompt in enumerate(prompts):
        found = _OBJECT.findall(prompt)
        side = _LIGHT.search(prompt)
        if not found or side is None or side.group(1) not in LIGHTS or any(
                o not in OBJECTS for o in found) or len(found) not in COUNTS:
            raise ActstoreError(
                f"prompt {prompt!r}: the reader knows {'/'.join(map(str, COUNTS))} "
                f"objects of colours {'/'.join(SCENE_COLOURS)} lit from {'/'.join(LIGHTS)}; "
                f"judge only prompts of the current toy world")
        for o in found:
            objects[i, OBJECTS.index(o)] = 1
        light.append(LIGHTS.index(side.group(1)))
        count.append(COUNTS.index(len(found)))
    return {"light": np.array(light), "count": np.array(count), "objects": objects}


def agreement(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Fractions of images whose reading matches the prompt: light side, object count, the
    exact set of (colour, shape) objects, and all three; plus the fraction of named objects
    found (recall) and of named colours found whatever the shape."""
    light = pred["light"] == truth["light"]
    count = pred["count"] == truth["count"]
    objects = (pred["objects"] == truth["objects"]).all(1)
    named = truth["objects"] > 0
    per_colour = len(SHAPES)  # OBJECTS runs colour-major: one row of shapes per colour
    pc = pred["objects"].reshape(len(light), -1, per_colour).max(2)
    tc = truth["objects"].reshape(len(light), -1, per_colour).max(2)
    return {"n": int(len(light)), "light": float(light.mean()), "count": float(count.mean()),
            "object_set": float(objects.mean()), "all": float((light & count & objects).mean()),
            "named_objects_found": float(pred["objects"][named].mean()),
            "named_colours_found": float(pc[tc > 0].mean())}


class ToyReader:
    """Reads light side, object count and (colour, shape) objects from uint8 images."""

    def __init__(self, net: ReaderNet, config: dict):
        self.net, self.config = net.eval(), config

    @classmethod
    def from_pretrained(cls, path: str | Path = "models/toy-reader") -> "ToyReader":
        state, cfg = load_folder(path)
        asked = {k: cfg[k] for k in ("objects", "lights", "counts")}
        if asked != {k: DEFAULT_CONFIG[k] for k in asked}:
            raise ActstoreError(f"reader {path}: trained for other questions ({asked}); "
                                f"retrain it with python -m actstore.toyworld.reader")
        net = ReaderNet(cfg["widths"], cfg["size"])
        net.load_state_dict(state)
        return cls(net, cfg)

    def save_pretrained(self, path: str | Path) -> None:
        save_folder(path, self.net, self.config)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 128) -> dict[str, np.ndarray]:
        outs = [self.net(_to_input(images[i:i + batch_size], self.config["size"]))
                for i in range(0, len(images), batch_size)]
        return {"light": torch.cat([o["light"] for o in outs]).argmax(1).numpy(),
                "count": torch.cat([o["count"] for o in outs]).argmax(1).numpy(),
                "objects": (torch.cat([o["objects"] for o in outs]) > 0).float().numpy()}


def train_reader(n_train: int = 8000, steps: int = 2000, batch: int = 64, lr: float = 2e-3,
                 seed: int = 0) -> ToyReader:
    """Fit on fresh renders (seeds disjoint from the LDM's data, the labeler's and the
    evaluation set), with the labeler's blur/noise augmentation for softer samples."""
    torch.manual_seed(seed)
    t0 = time.time()
    data = render_batch(range(TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + n_train))
    x_all = _to_input(data["rgb"], DEFAULT_CONFIG["size"])
    y_all = {k: torch.from_numpy(v) for k, v in attributes(data["prompt"]).items()}
    net = ReaderNet(DEFAULT_CONFIG["widths"], DEFAULT_CONFIG["size"])

    def batch_loss(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        out = net(_augment(x_all[idx], g))
        return (F.cross_entropy(out["light"], y_all["light"][idx])
                + F.cross_entropy(out["count"], y_all["count"][idx])
                + F.binary_cross_entropy_with_logits(out["objects"], y_all["objects"][idx]))

    avg = fit(net, batch_loss, n_train=n_train, steps=steps, batch=batch, lr=lr, seed=seed,
              tag="reader")
    cfg = dict(DEFAULT_CONFIG, train={"n_train": n_train, "steps": steps, "batch": batch,
                                      "lr": lr, "final_loss": avg,
                                      "wall_minutes": round((time.time() - t0) / 60, 1)})
    return ToyReader(net, cfg)


def evaluate(reader: ToyReader, n_eval: int = 500) -> dict[str, float]:
    data = render_batch(range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + n_eval))
    return agreement(reader(data["rgb"]), attributes(data["prompt"]))


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    p = argparse.ArgumentParser(description="Train the toy-world prompt reader on renders.")
    p.add_argument("--out", default="models/toy-reader")
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    reader = train_reader(a.n_train, a.steps)
    metrics = evaluate(reader)
    reader.save_pretrained(a.out)
    (Path(a.out) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
