"""An intervention experiment checked against the store before anything runs.

Everything a user can get wrong is found here, before the model loads and before any
byte is written: each check raises a one-line :class:`ActstoreError` saying what is wrong
and how to fix it. The result, a :class:`Plan`, also carries the experiment's record (what
a rerun must match) and its id, a hash of that record, so rerunning a command resumes it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields

import numpy as np

from actstore.errors import ActstoreError, InputError
from actstore.generation.pointnames import site_of
from actstore.intervene.inputs import (check_existing, provider_spec, resolve_provider,
                                       select_images)
from actstore.intervene.results import existing_settings
from actstore.intervene.pattern import patterns
from actstore.intervene.settings import (TARGET_MODES, InterventionSettings, defaults,
                                         without_later_defaults)
from actstore.intervene.targets import SHIFT_RANGE, load_user_targets
from actstore.label.labels import TARGET_NAME
from actstore.kinds import BINARY
from actstore.probe.runs import get_run, load_probe, missing_probe
from actstore.store import core as st, io, labelsets
from actstore.store import layout as lay
from actstore.store.view import StoreView

# The paper's defaults: salience → decoder self-attention, first 5 steps; depth → all 16
# layers, first 3 steps (Section 5.1, Appendix D).
DEFAULT_LAYERS = {BINARY: "up_blocks.", "continuous": ""}
DEFAULT_STEPS = {BINARY: 5, "continuous": 3}


@dataclass(frozen=True)
class Plan:
    """A validated experiment: everything but the model, nothing written yet.

    ``settings`` are the caller's with target, layers and steps resolved; ``record`` is
    what the store keeps of them (and what a rerun must match)."""

    store: str
    run_id: str
    settings: InterventionSettings
    kind: str
    view: StoreView
    probes: dict[str, dict]
    grids: dict[str, tuple[int, int]]
    image_ids: list[str]
    positions: np.ndarray
    prompts: list[str]
    seeds: list[int]
    mode: str | None                  # shift | insert | None (user targets)
    user_targets: np.ndarray | None
    n_targets: int
    object_target: str | None
    hw: tuple[int, int]
    label_attrs: dict
    provider: object
    record: dict
    experiment_id: str
    label_paths: dict[str, str] = field(default_factory=dict)   # target → version read
    # --direction pattern: per layer, per edited step, the vector to edit along; else None
    patterns: dict[str, dict[int, np.ndarray]] | None = None

    @property
    def target(self) -> str:
        return self.settings.target

    @property
    def layers(self) -> list[str]:
        return list(self.settings.layers)

    @property
    def steps(self) -> list[int]:
        return list(self.settings.steps)


@dataclass(frozen=True)
class Request:
    """What the user asked, checked against the store (no model, no label model, no
    probe weights read): settings with target, layers and steps resolved, and the store's
    facts the plan goes on from."""

    settings: InterventionSettings
    kind: str
    view: StoreView
    current: dict
    label_attrs: dict
    positions: np.ndarray


def check_request(store: str, probe_run: str, settings: InterventionSettings, *,
                  provenance: dict | None = None, named: bool = True) -> Request:
    """The checks of :func:`plan_interventions` that read only the store's small records:
    cheap enough for a fan-out's command to make before a cluster starts, so a typo there
    is refused in seconds and as the user's (an :class:`InputError`), not by the worker
    that plans (its address in the line sent the user to that worker's environment). An
    ``--experiment`` name the store has with other settings is refused here too
    (:func:`_check_named`) unless ``named`` is False: the planner checks the full record."""
    s = settings
    if s.experiment_id is not None and not TARGET_NAME.match(s.experiment_id):
        raise InputError(f"--experiment {s.experiment_id!r}: use letters, digits, '_', '.', "
                         "'-' (not starting with '_' or '.')")
    st.read_root_attrs(store)
    run = get_run(store, probe_run)
    target = s.target or run["target"]
    if target != run["target"]:
        raise InputError(f"probe run {probe_run} probes {run['target']!r}, not {target!r}; "
                         "pass a run of that target (or drop --target)")
    if s.model_variant not in run["models"]:
        raise InputError(f"probe run {probe_run}: has no probes for model "
                         f"{s.model_variant!r} (has {', '.join(run['models'])})")
    view = StoreView(store, model=s.model_variant, complete_only=False)
    kind = run["kind"]
    # one resolve, pinned for the whole run: every block reads this version (a relabel
    # meanwhile can't mix two versions into one experiment)
    current = labelsets.current(store)
    label_attrs = current.get(target)
    if label_attrs is None:
        raise ActstoreError(f"store {store}: no labels {target!r} any more, though probe run "
                            f"{probe_run} was fitted on them; rewrite them with `actstore label`")
    _check_fitted_on(store, probe_run, run, target, label_attrs)
    layers = _layers(s.layers, kind, view, run, probe_run)
    steps = _steps(s.steps, kind, view, run, probe_run)
    if s.targets == "insert" and kind == BINARY:
        raise InputError("--targets insert copies an object's depth, so it needs a "
                         "continuous target such as depth; use shift for masks")
    _check_unused_for(s, kind, target)
    positions = select_images(view, list(s.images) if isinstance(s.images, tuple) else s.images)
    req = Request(s.with_(target=target, layers=tuple(layers), steps=tuple(steps)), kind,
                  view, current, label_attrs, positions)
    if named and s.experiment_id is not None:
        _check_named(store, probe_run, req, provenance)
    return req


def _check_unused_for(s: InterventionSettings, kind: str, target: str) -> None:
    """An option the target's kind never reads, given at another value than its default,
    is refused (was accepted and ignored): a mask's targets are 0/1 whatever their units,
    and only a mask's logistic probes are asked for a logit of ``--margin``."""
    d = defaults(InterventionSettings)
    if kind == BINARY and s.target_units != d["target_units"]:
        raise InputError(f"--target-units {s.target_units}: {target!r} is a binary target "
                         "(a mask: nonzero is the object, in any units); drop --target-units")
    if kind != BINARY and s.margin != d["margin"]:
        raise InputError(f"--margin {s.margin:g}: the logit asked of a mask's logistic "
                         f"probes, and {target!r} is a {kind} target; drop --margin")


def _check_named(store: str, probe_run: str, req: Request, provenance: dict | None) -> None:
    """A named experiment the store has must be asked again with its settings: compared
    here on all of its record but what only the plan reads (a ``--direction pattern``'s
    vectors, made from the train images' activations; user targets' contents), from the
    probes' attributes, not their weights, and the label provider's name, not the model.
    Found only by the worker that plans, the line came after a cluster had started."""
    s = req.settings
    if existing_settings(store, s.experiment_id) is None:
        return
    mode = _mode(s)
    object_target, label_paths = _labels_read(req.current, s.target, mode)
    solvers = {}
    for layer, attrs in zip(s.layers, io.nodes_attrs(
            store, [lay.run_layer_path(probe_run, s.model_variant, la) for la in s.layers])):
        if not attrs or "solver" not in attrs:      # a damaged store: its group is gone
            raise missing_probe(store, probe_run, s.target, s.model_variant, layer)
        solvers[layer] = attrs["solver"]
    record = _record(s, probe_run, req.kind, solvers, req.view, _image_ids(req), s.n_targets,
                     mode, None, object_target,
                     provider_spec(s.provider, req.label_attrs, s.target), req.label_attrs,
                     label_paths, provenance)
    check_existing(store, s.experiment_id, record,
                   unknown=("pattern",) + (() if mode else ("targets", "n_targets")))


def plan_interventions(store: str, probe_run: str, settings: InterventionSettings, *,
                       provenance: dict | None = None) -> Plan:
    """Check ``settings`` against the store; raises a one-line ActstoreError, writes nothing.

    ``provenance`` joins the record (e.g. which sweep chose this setting, on which images)."""
    req = check_request(store, probe_run, settings, named=False)   # the full record, below
    s, kind, view, current, label_attrs = (req.settings, req.kind, req.view, req.current,
                                           req.label_attrs)
    target, layers, steps, positions = s.target, list(s.layers), list(s.steps), req.positions
    probes = {la: load_probe(store, probe_run, la, s.model_variant) for la in layers}
    _check_directions(probe_run, probes, steps)
    grids = {la: (int(view.layer_shapes[la][0]), int(view.layer_shapes[la][1]))
             for la in layers}
    table = view.images
    image_ids = _image_ids(req)
    hw = tuple(int(v) for v in label_attrs["image_size"])
    user, mode = user_targets(req), _mode(s)
    n_targets = s.n_targets if user is None else user.shape[1]
    object_target, label_paths = _labels_read(current, target, mode)
    label_attrs = {k: v for k, v in label_attrs.items() if k not in ("path", "commit",
                                                                      "version")}
    prov, spec = resolve_provider(s.provider, label_attrs, target, kind, s.device)
    record = _record(s, probe_run, kind, {la: p["solver"] for la, p in probes.items()}, view,
                     image_ids, n_targets, mode, user, object_target, spec, label_attrs,
                     label_paths, provenance)
    vectors = None
    if s.direction == "pattern":   # the vectors edited along are part of what is tested
        vectors, record["pattern"] = patterns(view, probes, steps)
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:10]
    named = "-".join([s.method] + [s.direction] * (s.direction != "probe")
                     + ["both-halves"] * (s.halves == "both"))
    experiment_id = s.experiment_id or f"{target}-{named}-{digest}"
    check_existing(store, experiment_id, record)
    return Plan(store, probe_run, s, kind, view, probes, grids, image_ids, positions,
                [str(p) for p in table["prompt"].values[positions]],
                [int(v) for v in table["seed"].values[positions]], mode, user, n_targets,
                object_target, hw, label_attrs, prov, record, experiment_id, label_paths,
                vectors)


def _image_ids(req: Request) -> list[str]:
    return [str(v) for v in req.view.images["image"].values[req.positions]]


def user_targets(req: Request) -> np.ndarray | None:
    """The user's targets (N, K, H, W) for the request's images, from its ``--targets``
    file or folder; None when the targets are made here (shift, shift-x, insert)."""
    s, attrs = req.settings, req.label_attrs
    if _mode(s) is not None:
        return None
    hw = tuple(int(v) for v in attrs["image_size"])
    return load_user_targets(s.targets, _image_ids(req), hw, kind=req.kind,
                             mean=attrs.get("mean"), std=attrs.get("std"), units=s.target_units)


def _mode(s: InterventionSettings) -> str | None:
    """shift, shift-x or insert: targets made here; None: the user's, read from a file."""
    return s.targets if s.targets in TARGET_MODES else None


def _labels_read(current: dict, target: str, mode: str | None) -> tuple[str | None, dict]:
    """The object an insert copies (if any), and the label version each target reads."""
    object_target = _object_target(current, target) if mode == "insert" else None
    return object_target, {t: current[t]["path"] for t in (target, object_target) if t}


def _record(s: InterventionSettings, probe_run, kind, solvers, view, image_ids, n_targets,
            mode, user, object_target, spec, label_attrs, label_paths, provenance) -> dict:
    """What shapes the results, as JSON: the settings that apply, and the store's facts.

    ``user`` None with user targets: their hash left None (a check made before reading
    them leaves the field out)."""
    skip = ("images", "provider", "experiment_id", "device", "targets", "target_units")
    keep = {f.name: getattr(s, f.name) for f in fields(s) if f.name not in skip}
    keep.update(
        probe_run=probe_run, kind=kind, solvers=solvers, layers=list(s.layers),
        steps=list(s.steps), strengths=list(s.strengths), arms=list(s.arms),
        weights_sha256=view.attrs["fingerprint"]["weights_sha256"],
        generation=view.attrs["fingerprint"]["generation"], images=image_ids,
        n_targets=n_targets,
        targets=mode or {"path": str(s.targets), "sha256": None if user is None else
                         hashlib.sha256(np.ascontiguousarray(user).tobytes()).hexdigest()},
        seed=s.seed if s.reads_seed else None,
        shift_range=list(SHIFT_RANGE) if mode else None, object_target=object_target,
        margin=s.margin if kind == BINARY and "logistic" in solvers.values() else None,
        lr=s.lr if s.method == "gradient" else None,
        iterations=s.iterations if s.method == "gradient" else None,
        provider=spec, label_mean=label_attrs.get("mean"), label_std=label_attrs.get("std"))
    if provenance:
        keep["provenance"] = provenance
    # the label versions read: a relabelled target makes another experiment, so a rerun or
    # a worker planning after a relabel never adds blocks from other labels to this one
    keep["labels"] = dict(sorted(label_paths.items()))
    # as stored: tuples become lists; an experiment along the probe (as every one before
    # --direction) keeps its id
    return json.loads(json.dumps(without_later_defaults(keep)))


def _check_fitted_on(store: str, probe_run: str, run: dict, target: str,
                     current: dict) -> None:
    """A run fitted on labels relabelled since is refused: its probes answer in the units
    (provider, mean, std) of the version they were fitted on, while targets, scores and the
    reader of the edited images come from the current one. The old version is no way out:
    it is removed a day after the relabel, and a resumed experiment would then fail."""
    fitted = run.get("labels", {})
    if "version" not in fitted:     # runs that predate recording it: nothing to compare
        return
    now = labelsets.version_of(current["path"])
    if fitted["version"] != now:
        raise ActstoreError(f"store {store}: probe run {probe_run} was fitted on labels "
                            f"{target!r} version {fitted['version'] or '(unversioned)'}, "
                            f"relabelled since (now version {now or '(unversioned)'}); run "
                            f"`actstore probe --target {target}` and use that run")


def _layers(layers, kind, view, run, probe_run) -> list[str]:
    if not layers:      # the paper's: self-attention (attn1), else the store's first kind
        prefix = DEFAULT_LAYERS[kind]
        first = "attn1" if "attn1" in view.kinds else view.kinds[0]
        layers = [la for la in view.layers if view.points[la].kind == first
                  and site_of(la).startswith(prefix)]
    bad = [la for la in layers if la not in view.layers]
    if bad:
        raise InputError(f"layer {bad[0]!r}: the store has no such capture point; it has "
                         f"{', '.join(view.layers)}")
    vae = [la for la in layers if not view.points[la].cfg]
    if vae:
        raise InputError(f"layer {vae[0]!r}: the VAE decoder takes no part in denoising, so "
                         "an edit there cannot change the image; choose UNet layers")
    _probed(layers, run["layers"], "layer", probe_run)
    return list(dict.fromkeys(layers))


def _steps(steps, kind, view, run, probe_run) -> list[int]:
    if not steps:
        steps = list(range(min(DEFAULT_STEPS[kind], view.n_steps)))
    steps = sorted({int(s) for s in steps})
    bad = [s for s in steps if not 0 <= s < view.n_steps]
    if bad:
        raise InputError(f"step {bad[0]}: the store's generation has steps 0..."
                         f"{view.n_steps - 1}")
    _probed(steps, run["steps"], "step", probe_run)
    return steps


def _probed(wanted: list, have: list, what: str, probe_run: str) -> None:
    lacking = [w for w in wanted if w not in have]
    if lacking:
        shown = repr(lacking[0]) if what == "layer" else str(lacking[0])
        raise InputError(f"probe run {probe_run}: has no probe for {what} {shown} (it "
                         f"has {what}s {', '.join(map(str, have))}); pass --{what}s "
                         f"among those or fit a run with that {what}")


def unedited_note(store: str, probe_run: str, req: Request) -> str | None:
    """Which of the request's points will be left unedited (probes of zero weights,
    :func:`_check_directions`), in one line for the command to print before it starts;
    found only per edit before (2026-12-07), so a result's unchanged layers went unsaid.
    None if every point has a direction; refused if none has."""
    s = req.settings
    probes = {la: load_probe(store, probe_run, la, s.model_variant) for la in s.layers}
    zero = _check_directions(probe_run, probes, list(s.steps))
    if not zero:
        return None
    steps = {la: [k for z, k in zero if z == la] for la in probes}
    return (f"probe run {probe_run}: zero weights (train labels of one class) at " +
            "; ".join(f"{la} step{'s' * (len(ks) > 1)} {', '.join(map(str, ks))}"
                      for la, ks in steps.items() if ks) +
            ": left unedited there")


def _check_directions(probe_run: str, probes: dict[str, dict], steps: list[int]
                      ) -> list[tuple[str, int]]:
    """A probe fitted where its train labels held one class (a mask too small for a coarse
    point's resolution) keeps the ridge fallback on constant labels: weights 0, no
    direction to edit along. The edit leaves such a (point, step) as it is (it divided by
    0 before 2026-12-06: every image non-finite); an experiment with nothing else to edit
    would measure nothing, so it is refused. Returns the (layer, step) points of zero
    weights."""
    zero = [(la, k) for la, p in probes.items() for k in steps
            if not np.any(p["weights"][p["steps"].index(k)])]
    if len(zero) == len(probes) * len(steps):
        raise InputError(f"probe run {probe_run}: every probe of the chosen layers "
                         f"({', '.join(probes)}) and steps ({', '.join(map(str, steps))}) "
                         "has zero weights (its train labels held one class there), so no "
                         "edit has a direction; pass --layers of finer points")
    return zero


def _object_target(current: dict[str, dict], target: str) -> str | None:
    """Appendix E needs the object to copy: the store's first binary target, if any."""
    for name, attrs in sorted(current.items()):
        if name != target and attrs["kind"] == BINARY:
            return name
    return None
