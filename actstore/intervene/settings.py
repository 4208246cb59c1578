"""Every choice an intervention experiment makes, with its default written once.

One frozen object travels whole from the command line through the flow to the library,
so a default can differ nowhere, and an experiment's record is these settings plus what
the store says (probe run, model, labels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from actstore.errors import ActstoreError
from actstore.options import named_once

METHODS = ("projection", "gradient")
DIRECTIONS = ("probe", "pattern")   # projection's edit direction: the filter w, or its pattern
HALVES = ("cond", "both")           # CFG halves edited: the conditional one (the paper's), or both
TARGET_MODES = ("shift", "shift-x", "insert")
ARMS = ("probe", "random")          # the edit, and its equal-size random-direction control


@dataclass(frozen=True, kw_only=True)
class InterventionSettings:
    """What to edit, how hard, on which images, and read by which label model.

    ``strengths``: the dose. Strength s asks each edited probe for z + s·(t − z), where z is
    its current reading and t the target: s = 1 is the target itself, s = 0 no edit at
    all (bitwise), s = 3 three times as far. ``projection`` gets there with the minimal-norm
    change (so its change is s times the s = 1 change); ``gradient`` runs the paper's Adam
    recipe (``lr``, ``iterations``) toward it. ``random_control`` adds, for every edit, a
    random-direction edit with the same norm at every token (seeded by image, target,
    layer, step and ``seed``, the same direction at every strength).

    ``direction`` (projection only): ``probe`` moves each token along the probe's weights w
    (the minimal-norm change); ``pattern`` along its activation pattern p = Σw/(wᵀΣw), Σ
    the train images' token covariance (:mod:`actstore.intervene.pattern`): the probe
    reads the same z + s·(t − z), but the activation moves the way it does when the
    target varies in the model's own images, at a larger size for the same reading.

    ``halves``: which half of the classifier-free-guidance batch is edited. ``cond`` (the
    paper's) edits the conditional half only, the one the probes were fitted on; ``both``
    edits the unconditional half too, each half by the same rule from its own activations
    (its probe reading moved to z + s·(t − z)), so that neither half keeps the original
    layout for the guidance to weigh against the edit; the random control then edits both
    halves at each half's own per-token norms.
    """

    target: str | None = None            # label target; None: the probe run's
    method: str = "projection"
    direction: str = "probe"             # projection: along w, or along its pattern
    halves: str = "cond"                 # CFG halves edited: cond (the paper's) or both
    layers: tuple[str, ...] = ()         # capture points; empty: the paper's per target kind
    steps: tuple[int, ...] = ()          # empty: the paper's per target kind
    strengths: tuple[float, ...] = (1.0,)
    random_control: bool = True
    images: str | tuple[str, ...] | None = None   # ids, "A:B" positions; None: test split
    n_targets: int = 5
    seed: int = 0                        # target offsets and random directions
    targets: str = "shift"               # shift | shift-x | insert | a path to user targets
    target_units: str = "normalized"     # of user depth targets: normalized | raw
    provider: Any = None                 # label provider spec or object; None: the labels'
    margin: float = 4.0                  # logit asked of logistic (mask) probes: sigmoid 0.982
    lr: float = 5e-3                     # gradient: the paper's Adam recipe
    iterations: int = 128
    model_variant: str = "trained"
    experiment_id: str | None = None     # None: a hash of the settings (a rerun resumes)
    # where the images are generated: a GPU if there is one, as materialize (before
    # 2026-12-06 cpu); no part of an experiment's id or a sweep's (made as if on cpu)
    device: str = "auto"
    batch_size: int = 16                 # interventions generated together

    def __post_init__(self) -> None:
        for name in ("layers", "steps", "strengths"):
            value = getattr(self, name)
            if value is None:
                value = ()
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        object.__setattr__(self, "strengths", tuple(float(s) for s in self.strengths))
        if isinstance(self.images, list):
            object.__setattr__(self, "images", tuple(str(i) for i in self.images))
        self.check()

    def check(self) -> None:
        """The checks that need no store; one line each, naming the option."""
        if self.method not in METHODS:
            raise ActstoreError(f"--method {self.method!r}: use {' or '.join(METHODS)}")
        if self.direction not in DIRECTIONS:
            raise ActstoreError(f"--direction {self.direction!r}: use "
                                f"{' or '.join(DIRECTIONS)}")
        if self.halves not in HALVES:
            raise ActstoreError(f"--halves {self.halves!r}: use {' or '.join(HALVES)}")
        if self.direction != "probe" and self.method != "projection":
            raise ActstoreError(f"--direction {self.direction} applies to --method projection "
                                f"only (gradient's Adam chooses its own direction)")
        if not self.strengths or any(not math.isfinite(s) or s < 0 for s in self.strengths):
            raise ActstoreError(f"--strength {' '.join(map(str, self.strengths)) or '(none)'}:"
                                " give one or more finite numbers >= 0 (1 = reach the target)")
        images = self.images or ()    # ids, or one "A:B" (no ids to repeat)
        if isinstance(images, str):
            images = () if ":" in images else images.split(",")
        for option, what, value in (("--layers", "layer", self.layers),
                                    ("--steps", "step", self.steps),
                                    ("--strength", "strength", self.strengths),
                                    ("--images", "image", images)):
            named_once(option, what, value)
        if self.n_targets < 1 or self.iterations < 1 or self.batch_size < 1:
            raise ActstoreError("--n-targets, --iterations and --batch-size must be at least 1")
        if not self.lr > 0 or not self.margin > 0:
            raise ActstoreError("--lr and --margin must be positive")
        if self.target_units not in ("normalized", "raw"):
            raise ActstoreError(f"--target-units {self.target_units!r}: use normalized or raw")
        self._check_unused()

    def _check_unused(self) -> None:
        """An option the chosen method or targets never read, given at another value than
        its default, is refused: it was accepted and silently ignored (`--lr 0.1
        --method projection` recorded lr null). Checks that need the target's kind are
        :func:`actstore.intervene.plan.check_request`'s."""
        d = defaults(type(self))
        if self.method != "gradient":
            for option, name in (("--lr", "lr"), ("--iterations", "iterations")):
                if getattr(self, name) != d[name]:
                    raise ActstoreError(f"{option} {getattr(self, name):g}: only --method "
                                        f"gradient runs Adam, --method {self.method} never "
                                        f"reads it; drop {option} or use --method gradient")
        if self.seed != d["seed"] and not self.reads_seed:
            raise ActstoreError(f"--seed {self.seed}: nothing here is random, the targets "
                                f"come from --targets {self.targets} and there is no random "
                                "control; drop --seed or --no-random-control")
        if self.target_units != d["target_units"] and self.targets in TARGET_MODES:
            raise ActstoreError(f"--target-units {self.target_units}: gives the units of "
                                f"targets read from a file, and --targets {self.targets} "
                                "makes them from the labels; drop --target-units")

    @property
    def arms(self) -> tuple[str, ...]:
        return ARMS if self.random_control else ARMS[:1]

    @property
    def reads_seed(self) -> bool:
        """The seed makes the shifted or inserted targets and the random directions; user
        targets without the random arm never read it (recorded as null)."""
        return self.targets in TARGET_MODES or self.random_control

    def without_random_arm(self) -> "InterventionSettings":
        """A copy with no random arm, its seed back at the default where nothing reads it
        then (so a diagnostic that drops the arm is not refused a seed the user gave)."""
        seed = self.seed if self.targets in TARGET_MODES else defaults(type(self))["seed"]
        return self.with_(random_control=False, seed=seed)

    def with_(self, **changes: Any) -> "InterventionSettings":
        """A checked copy with ``changes``, None included (a sweep clears
        ``experiment_id`` this way). Not the other stages' ``with_options``, where None keeps
        a value: the command line builds these settings whole, from the options given."""
        return replace(self, **changes)


# Fields added after experiments were first stored. At their default they are left out of
# experiment records and sweep settings, so the ids of what was stored before stay as they
# were (a rerun of an old command resumes its experiment); any other value is recorded.
LATER_DEFAULTS = {"direction": "probe", "halves": "cond"}


def without_later_defaults(record: dict) -> dict:
    """``record`` without the :data:`LATER_DEFAULTS` fields that hold their default."""
    return {k: v for k, v in record.items()
            if not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}


def defaults(cls=InterventionSettings) -> dict[str, Any]:
    """Field → default, for help texts that must quote the one written above."""
    return {f.name: f.default for f in fields(cls)}


@dataclass(frozen=True, kw_only=True)
class SweepSettings:
    """The grid a sweep tries on validation images, and how many images each side gets.

    ``kinds`` are capture kinds (attn1, attn2, block, resnet): each cell edits every
    decoder-side point of its kind (``layer_prefix``) that the probe run has, at the first
    ``n`` steps for each ``n`` in ``step_counts``, at every strength. The setting with the
    largest specific effect on the ``validation`` images is then run on ``evaluation``
    other test images, never the ones it was chosen on.

    ``max_edit_size``: the largest edit a setting may make and still be chosen, as the
    median over its validation interventions of the overall relative size ‖Δh‖/‖h‖ each
    intervention records. Larger settings are still run and tabled (marked), never
    chosen: an effect bought by pushing activations off the images the model makes says
    nothing about whether the model uses the probe's direction. 0.3 from the step-5,250
    toy model (9 decoder block points, 22 interventions per size; docs/results.md, "Edit
    size"): up to 0.25 the edited images keep the world's horizon, ground and objects and
    the prompt reader still names their light side in 73-100%; from 0.30 the horizon
    smears and clutter grows, at 0.37-0.43 the light side is at chance (45-59%), from
    0.55 the images are blobs.
    """

    kinds: tuple[str, ...] = ("attn1", "block")
    step_counts: tuple[int, ...] = (3, 5, 7)
    strengths: tuple[float, ...] = (1.0, 3.0, 10.0)
    layer_prefix: str | tuple[str, ...] = "up_blocks."
    validation: int = 4
    evaluation: int = 8
    max_edit_size: float = 0.3
    base: InterventionSettings = field(default_factory=lambda: InterventionSettings(n_targets=2))

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "step_counts", tuple(int(n) for n in self.step_counts))
        object.__setattr__(self, "strengths", tuple(float(s) for s in self.strengths))
        if self.validation < 1 or self.evaluation < 1:
            raise ActstoreError("--validation and --evaluation must be at least 1 image each")
        if not self.kinds or not self.step_counts or any(n < 1 for n in self.step_counts):
            raise ActstoreError("a sweep needs at least one capture kind and step counts >= 1")
        if not (isinstance(self.max_edit_size, (int, float))
                and not isinstance(self.max_edit_size, bool)
                and math.isfinite(self.max_edit_size) and self.max_edit_size > 0):
            raise ActstoreError(f"--max-edit-size {self.max_edit_size}: give a finite number "
                                "> 0 (the largest median ||edit||/||activation|| chosen)")
        object.__setattr__(self, "max_edit_size", float(self.max_edit_size))
        if self.base.n_targets < 2 and self.base.targets in TARGET_MODES:
            raise ActstoreError(f"--n-targets {self.base.n_targets}: a sweep picks the "
                                "largest specific effect, the least of the gain and the "
                                "margins over the random edit and over the other targets, "
                                "and one target per image has no other; give --n-targets 2 "
                                "or more (default 2)")
        if not self.base.random_control:
            raise ActstoreError("--no-random-control: a sweep chooses by the margin over an "
                                "equal-size random edit (the specific effect is the least of "
                                "the gain and the margins over it and over the other "
                                "targets), which needs the random arm; use `actstore "
                                "intervene --no-random-control` for an uncontrolled run")
        self.base.with_(strengths=self.strengths)   # the strengths' own checks
