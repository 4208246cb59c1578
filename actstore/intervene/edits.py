"""Editing capture-point outputs during generation so a frozen linear probe reads a target.

Two ways to make probe(a') = t for a probe z = a·w + b applied to every token:

* ``projection``: the closed-form minimal-norm change, a' = a + (t − z)/‖w‖² · w. It moves
  each token only along w, so everything the probe can't see (w's null space, C−1 of C
  directions) is left exactly as the model made it, and it costs one matrix-vector product.
  Given another direction d per (layer, step), here the probe's activation pattern
  (:mod:`actstore.intervene.pattern`), it moves along d instead: a' = a + (t − z)/(w·d) · d,
  which the probe reads as t just the same (d = w is the minimal-norm change, bit for bit).
* ``gradient``: the paper's procedure, Adam (lr 5e-3, 128 iterations, fp32) on the
  activation against the probe's loss (BCE-with-logits for a logistic probe, Huber for a
  ridge probe, as the probes' training losses). Adam normalises each coordinate's step, so
  the change is spread over *all* channels (roughly along sign(w)), not along w.

Both work on the conditional half of the CFG batch (the half the probes were fitted on;
``halves="both"``: on the unconditional half too, by the same rule from its own
activations), in float32, and hand the result back in the model's dtype. Targets are in the probe's
output units (logits for a logistic probe), so "target = the probe's current output" is an
exact no-op for both methods: projection adds 0·w, and Adam never moves a parameter whose
gradient is exactly zero. A strength scales the way to the target (see
:class:`~actstore.intervene.settings.InterventionSettings`); strength 0 leaves the
activation untouched bit for bit. The random control replaces each token's edit by a
seeded random direction of exactly the same norm, so "any edit this large" and "this edit"
are told apart at equal size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from actstore.generation.points import hooks
from actstore.generation.models import LoadedModel
from actstore.generation.sampling import GenerationConfig, generate
from actstore.intervene.settings import InterventionSettings
from actstore.kinds import BINARY
from actstore.store.layout import SIZE_MEASURES, STAT_NAMES  # noqa: F401 - run's, scores'


def float32_math(like: torch.Tensor) -> torch.autocast:
    """A context in which torch computes in the tensors' own dtypes (the callers upcast to
    float32): the edit math runs inside the UNet's forward pass, so under a caller's
    ``torch.autocast`` (SD v1.x's early examples ran the pipeline in ``autocast("cuda")``)
    every ``a @ w`` would otherwise be made in float16 or bfloat16, and an edit would miss
    its target by thousands of times its float32 error (bfloat16 on the CPU: 0.028 vs
    1.5e-6 in probe units)."""
    return torch.autocast(like.device.type, enabled=False)


def probe_predict(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The probe's output per token, (..., T, C) → (..., T), in float32 whatever ``a``'s
    dtype (float16 activations of a float16 model meet float32 stored probes); one code
    path for edits and for whoever builds an identity target, so both get the same bits."""
    with float32_math(a):
        return a.float() @ w.float() + b.float()


def project(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Minimal-norm edit of each token so that ``probe_predict`` gives ``t`` exactly,
    computed and returned in float32 (rounding it to float16 is the caller's choice)."""
    with float32_math(a):
        a, w = a.float(), w.float()
        z = probe_predict(a, w, b)
        return a + ((t.float() - z) / (w @ w)).unsqueeze(-1) * w


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
                  kind: str, solver: str, *, lr: float,
                  iterations: int) -> tuple[torch.Tensor, np.ndarray]:
    """Adam on the activation; returns it and the mean per-image loss at each iteration
    (``iterations + 1`` values, the last after the final update)."""
    x = a.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    losses = np.empty(iterations + 1)
    with torch.enable_grad(), float32_math(a):
        for i in range(iterations):
            opt.zero_grad(set_to_none=True)
            per = probe_loss(probe_predict(x, w, b), t, kind, solver)
            losses[i] = float(per.detach().mean())
            per.sum().backward()    # images are independent: each sees only its own loss
            opt.step()
        losses[-1] = float(probe_loss(probe_predict(x.detach(), w, b), t, kind, solver).mean())
    return x.detach(), losses


def direction_key(image_id: str, k: int, seed: int) -> int:
    """The random control's seed for one (image, target): never the batch, the row order or
    the strength, so a resumed or re-batched run draws the same directions, and every
    strength scales the same direction (a dose-response of one control, not of many)."""
    digest = hashlib.sha256(f"{image_id}\x00{int(k)}\x00{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def random_directions(keys: list[int], layer: str, step: int, shape: tuple[int, int],
                      device: torch.device) -> torch.Tensor:
    """(len(keys), T, C) standard normal draws, one generator per (key, layer, step)."""
    out = torch.empty((len(keys), *shape))
    for r, key in enumerate(keys):
        digest = hashlib.sha256(f"{key}\x00{layer}\x00{int(step)}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        out[r] = torch.randn(shape, generator=g)
    return out.to(device)


def equal_norm(delta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``u`` rescaled so that every token has exactly ``delta``'s norm: the same edit size,
    token by token, in a direction the probe did not choose."""
    with float32_math(u):   # norms of float16 tokens: float32 sums of squares
        u, delta = u.float(), delta.float()
        unit = u / u.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
        return unit * delta.norm(dim=-1, keepdim=True)


def edit_sizes(a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(B, 3): ‖Δ‖/‖a‖ over all tokens, and the median and max over tokens of ‖Δₜ‖/‖aₜ‖,
    in float32 (a float16 sum of squares overflows past 65504)."""
    with float32_math(a):
        a, delta = a.float(), delta.float()
        tiny = torch.finfo(a.dtype).tiny
        overall = delta.flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(tiny)
        token = delta.norm(dim=-1) / a.norm(dim=-1).clamp_min(tiny)
        return torch.stack([overall, token.median(dim=1).values, token.max(dim=1).values], 1)


@dataclass
class EditHook:
    """A capture-point hook callback editing the conditional half (``halves="both"``: both
    halves) at planned (layer, step)s.

    The batch holds B rows, each an (image, target, strength, arm): ``targets[layer]`` is
    (B, T) in probe units (or ``{step: (B, T)}``), ``strengths`` (B,), ``random`` (B,) marks
    the rows of the random-direction control, whose directions come from ``keys`` (B,)
    (:func:`direction_key`). ``directions[layer][step]``: what projection moves along
    instead of the probe's w (None: w). Keeps per row the probe error before/after and,
    per (layer, step), the size of the change relative to the activation, both of the
    conditional half (with ``both``, the unconditional half's edit is made by the same
    rule from its own activations, so its relative size is of the same kind).
    """

    method: str
    kind: str
    solvers: dict[str, str]
    probes: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]
    targets: dict[str, torch.Tensor | dict[int, torch.Tensor]]
    n_images: int
    strengths: torch.Tensor | None = None
    random: torch.Tensor | None = None
    keys: list[int] | None = None
    directions: dict[str, dict[int, torch.Tensor]] | None = None
    lr: float = InterventionSettings.lr
    iterations: int = InterventionSettings.iterations
    halves: str = InterventionSettings.halves
    step: int = -1
    errors: np.ndarray = field(init=False)
    sizes: dict[tuple[str, int], np.ndarray] = field(init=False, default_factory=dict)
    count: int = field(init=False, default=0)
    curves: list[tuple[str, int, np.ndarray]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        n = self.n_images
        self.errors = np.zeros((n, 2))
        if self.strengths is None:
            self.strengths = torch.ones(n)
        if self.random is None:
            self.random = torch.zeros(n, dtype=torch.bool)
        if bool(self.random.any()) and (self.keys is None or len(self.keys) != n):
            raise ValueError("random-control rows need one direction key per row")

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
        with float32_math(out):
            return self._edit(layer, out, probe)

    def _edit(self, layer: str, out: torch.Tensor, probe) -> torch.Tensor:
        """The edit in float32 on ``out``'s device, whatever the dtype and device the probe,
        targets and directions were given in; handed back in ``out``'s dtype."""
        n = self.n_images
        lo = 0 if self.halves == "both" else n       # the rows edited: [uncond,] cond
        reps = (out.shape[0] - lo) // n              # each half's rows are the B rows
        a = out[lo:].float().contiguous()
        w, b = (v.to(a.device, torch.float32) for v in probe)
        t = self.targets[layer]
        t = (t[self.step] if isinstance(t, dict) else t).to(a.device, torch.float32)
        t = t.repeat(reps, 1)
        s = self.strengths.to(a.device, torch.float32)[:, None].repeat(reps, 1)
        z = probe_predict(a, w, b)
        if self.method == "projection":
            d = w if self.directions is None else \
                self.directions[layer][self.step].to(a.device, torch.float32)
            reach = w @ d       # 0 (pattern: NaN) for a probe fitted on one class: w = 0
            ok = torch.isfinite(reach) & (reach != 0)   # on the device: no sync per edit
            delta = torch.where(ok, (s * (t - z) / reach).unsqueeze(-1) * d, 0.0)
        else:
            new, curve = gradient_edit(a, w, b, z + s * (t - z), self.kind, self.solvers[layer],
                                       lr=self.lr, iterations=self.iterations)
            self.curves.append((layer, self.step, curve))
            delta = new - a
        rnd = self.random.to(a.device).repeat(reps)
        if bool(rnd.any()):   # one direction per row, in both halves at each half's norms
            rows = torch.nonzero(rnd).flatten()
            u = random_directions([self.keys[int(r) % n] for r in rows], layer, self.step,
                                  tuple(a.shape[1:]), a.device)
            delta[rows] = equal_norm(delta[rows], u)
        new = torch.where(s[..., None] == 0, a, a + delta).to(out.dtype)
        c = slice(len(a) - n, None)                  # the conditional half's rows
        a, t, z, seen = a[c], t[c], z[c], new[c].float()
        before = (t - z).pow(2).mean(-1).sqrt()
        after = (t - probe_predict(seen, w, b)).pow(2).mean(-1).sqrt()
        self.errors += torch.stack([before, after], 1).double().cpu().numpy()
        self.sizes[(layer, self.step)] = edit_sizes(a, seen - a).double().cpu().numpy()
        self.count += 1
        return torch.cat([out[:lo], new])

    def stats(self) -> np.ndarray:
        """(B, 4) means over every edit made: probe RMS error to the target before and after,
        ‖Δa‖/‖a‖ over all tokens, and the median over tokens of ‖Δaₜ‖/‖aₜ‖."""
        sizes = np.mean(list(self.sizes.values()), axis=0) if self.sizes else \
            np.zeros((self.n_images, len(SIZE_MEASURES)))
        return np.concatenate([self.errors / max(self.count, 1), sizes[:, :2]], axis=1)

    def size_grid(self, layers: list[str], steps: list[int]) -> np.ndarray:
        """(B, layer, step, measure) edit sizes (:data:`SIZE_MEASURES`); NaN where no edit
        was planned, 0 where a probe with weights 0 left its point as it was."""
        out = np.full((self.n_images, len(layers), len(steps), len(SIZE_MEASURES)), np.nan)
        for (layer, step), v in self.sizes.items():
            if layer in layers and step in steps:
                out[:, layers.index(layer), steps.index(step)] = v
        return out


def generate_edited(model: LoadedModel, prompts: list[str], seeds: list[int],
                    gen: GenerationConfig, *, hook: EditHook | None,
                    on_step_end: Callable | None = None) -> np.ndarray:
    """``generate`` with the edits applied; ``hook=None`` is the plain generation."""
    if hook is None:
        return generate(model, prompts, seeds, gen, on_step_end=on_step_end)

    def start(i: int) -> None:
        hook.step = i

    with hooks(model, hook.layers, hook):
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


def torch_directions(vectors: dict[str, dict[int, np.ndarray]] | None,
                     device: torch.device) -> dict[str, dict[int, torch.Tensor]] | None:
    """A plan's edit directions (``Plan.patterns``) as fp32 tensors; None stays None."""
    if vectors is None:
        return None
    return {la: {s: torch.as_tensor(v, dtype=torch.float32, device=device)
                 for s, v in per.items()} for la, per in vectors.items()}
