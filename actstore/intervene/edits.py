"""Editing self-attention outputs during generation so a frozen linear probe reads a target.

Two ways to make probe(a') = t for a probe z = a·w + b applied to every token:

* ``projection``: the closed-form minimal-norm change, a' = a + (t − z)/‖w‖² · w. It moves
  each token only along w, so everything the probe can't see (w's null space, C−1 of C
  directions) is left exactly as the model made it, and it costs one matrix-vector product.
* ``gradient``: the paper's procedure, Adam (lr 5e-3, 128 iterations, fp32) on the
  activation against the probe's loss (BCE-with-logits for a logistic probe, Huber for a
  ridge probe, as the probes' training losses). Adam normalises each coordinate's step, so
  the change is spread over *all* channels (roughly along sign(w)), not along w.

Both work on the conditional half of the CFG batch only (the half the probes were fitted
on), in float32, and hand the result back in the model's dtype. Targets are in the probe's
output units (logits for a logistic probe), so "target = the probe's current output" is an
exact no-op for both methods: projection adds 0·w, and Adam never moves a parameter whose
gradient is exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from actstore.generation.capture import attn1_hooks
from actstore.generation.sampling import GenerationConfig, generate
from actstore.kinds import BINARY
from actstore.generation.models import LoadedModel

METHODS = ("projection", "gradient")
GRADIENT_LR = 5e-3
GRADIENT_ITERATIONS = 128
STAT_NAMES = ("probe_error_before", "probe_error_after", "relative_change")


def probe_predict(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The probe's output per token, (..., T, C) → (..., T); one code path for edits and
    for whoever builds an identity target, so both get the same bits."""
    return a @ w + b


def project(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Minimal-norm edit of each token so that ``probe_predict`` gives ``t`` exactly."""
    z = probe_predict(a, w, b)
    return a + ((t - z) / (w @ w)).unsqueeze(-1) * w


def probe_loss(z: torch.Tensor, t: torch.Tensor, kind: str, solver: str) -> torch.Tensor:
    """Per-image loss (n,) of outputs z against targets t (both (n, T), probe units).

    A logistic probe's target logit t becomes the soft label sigmoid(t): the loss is then
    minimal exactly at z = t, the same point projection jumps to.
    """
    if kind == BINARY and solver == "logistic":
        per = F.binary_cross_entropy_with_logits(z, torch.sigmoid(t), reduction="none")
    else:
        per = F.huber_loss(z, t, reduction="none", delta=1.0)
    return per.mean(dim=-1)


def gradient_edit(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, t: torch.Tensor,
                  kind: str, solver: str, lr: float = GRADIENT_LR,
                  iterations: int = GRADIENT_ITERATIONS) -> tuple[torch.Tensor, np.ndarray]:
    """Adam on the activation; returns it and the mean per-image loss at each iteration
    (``iterations + 1`` values, the last after the final update)."""
    x = a.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    losses = np.empty(iterations + 1)
    with torch.enable_grad():
        for i in range(iterations):
            opt.zero_grad(set_to_none=True)
            per = probe_loss(probe_predict(x, w, b), t, kind, solver)
            losses[i] = float(per.detach().mean())
            per.sum().backward()    # images are independent: each sees only its own loss
            opt.step()
        losses[-1] = float(probe_loss(probe_predict(x.detach(), w, b), t, kind, solver).mean())
    return x.detach(), losses


@dataclass
class EditHook:
    """An ``attn1_hooks`` callback editing the conditional half at planned (layer, step)s.

    ``probes[layer][step] = (w, b)``; ``targets[layer]`` is (n, T) in probe units for the
    n images of the batch, or ``{step: (n, T)}`` when the target changes with the step. Keeps, per image, running sums of the probe error before and
    after each edit and of the relative size of the change, and every gradient loss curve.
    """

    method: str
    kind: str
    solvers: dict[str, str]
    probes: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]
    targets: dict[str, torch.Tensor | dict[int, torch.Tensor]]
    n_images: int
    lr: float = GRADIENT_LR
    iterations: int = GRADIENT_ITERATIONS
    step: int = -1
    sums: np.ndarray = field(init=False)
    count: int = field(init=False, default=0)
    curves: list[tuple[str, int, np.ndarray]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.sums = np.zeros((self.n_images, len(STAT_NAMES)))

    @property
    def layers(self) -> list[str]:
        return list(self.probes)

    def __call__(self, layer: str, out: torch.Tensor) -> torch.Tensor | None:
        probe = self.probes.get(layer, {}).get(self.step)
        if probe is None:
            return None
        n = self.n_images
        if out.shape[0] != 2 * n:
            raise RuntimeError(f"edit hook planned for {n} images got a batch of {out.shape[0]}")
        w, b = probe
        t = self.targets[layer]
        t = t[self.step] if isinstance(t, dict) else t
        a = out[n:].float().contiguous()
        if self.method == "projection":
            new = project(a, w, b, t)
        else:
            new, curve = gradient_edit(a, w, b, t, self.kind, self.solvers[layer], self.lr,
                                       self.iterations)
            self.curves.append((layer, self.step, curve))
        new = new.to(out.dtype)
        seen = new.float()
        before = (t - probe_predict(a, w, b)).pow(2).mean(-1).sqrt()
        after = (t - probe_predict(seen, w, b)).pow(2).mean(-1).sqrt()
        change = (seen - a).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(1e-12)
        self.sums += torch.stack([before, after, change], 1).double().cpu().numpy()
        self.count += 1
        return torch.cat([out[:n], new])

    def stats(self) -> np.ndarray:
        """(n, 3) means over every edit made: probe RMS error before/after, ‖Δa‖/‖a‖."""
        return self.sums / max(self.count, 1)


def generate_edited(model: LoadedModel, prompts: list[str], seeds: list[int],
                    gen: GenerationConfig, hook: EditHook | None,
                    on_step_end: Callable | None = None) -> np.ndarray:
    """``generate`` with the edits applied; ``hook=None`` is the plain generation."""
    if hook is None:
        return generate(model, prompts, seeds, gen, on_step_end=on_step_end)

    def start(i: int) -> None:
        hook.step = i

    with attn1_hooks(model.unet, hook.layers, hook):
        return generate(model, prompts, seeds, gen, on_step_start=start,
                        on_step_end=on_step_end)


def torch_probes(probes: dict[str, dict], steps: list[int],
                 device: torch.device) -> dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Stored probes (``load_probe`` dicts) → per layer, per edited step, fp32 (w, b)."""
    out = {}
    for layer, p in probes.items():
        out[layer] = {s: (torch.as_tensor(p["weights"][p["steps"].index(s)], dtype=torch.float32,
                                          device=device),
                          torch.as_tensor(float(p["bias"][p["steps"].index(s)]),
                                          dtype=torch.float32, device=device))
                      for s in steps}
    return out
