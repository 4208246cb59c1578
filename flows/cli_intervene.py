"""``actstore intervene`` and ``actstore sweep``: the argparse parsers and handlers, for
``flows.cli`` to register.

Kept out of ``cli.py`` so the interventions feature ships as one unit; ``cli.py`` needs
``add_intervene_parser(sub, common)`` in ``build_parser`` and ``"intervene"``/``"sweep"``
in ``COMMANDS``. Defaults are quoted from the settings dataclasses, never written here:
an option left out is simply not passed on.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from actstore.cliargs import index, nonneg_float, positive_float, positive_int
from actstore.errors import InputError
from actstore.intervene.settings import (DIRECTIONS, HALVES, METHODS, TARGET_MODES,
                                         InterventionSettings, SweepSettings, defaults)
from flows.cli_checks import STORE_HELP, check_fan_out, store_uri

if TYPE_CHECKING:
    from actstore.catalog import Catalog

D = defaults(InterventionSettings)
SW = defaults(SweepSettings)


def _strength_help() -> str:
    return ("dose(s): strength s asks each probe for z + s·(target − z), z its current "
            "reading; 1 reaches the target, 0 is no edit (bitwise). projection: s times "
            "the minimal-norm change; gradient: the paper's Adam recipe (--lr, "
            "--iterations) toward that scaled target")


def _add_edit_options(p, sweep: bool = False) -> None:
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--method", choices=list(METHODS), help=f"default {D['method']}")
    p.add_argument("--direction", choices=list(DIRECTIONS), help="what projection moves "
                   "each token along: probe = the probe's weights w (the minimal-norm "
                   "change; default), pattern = its activation pattern Cov(a, probe)/Var(probe) "
                   "over the train images' tokens (Haufe et al. 2014): the same probe "
                   "reading, reached the way the activations vary with the target, by a "
                   "larger edit. Projection only: gradient moves where Adam takes it")
    p.add_argument("--halves", choices=list(HALVES), help="which half of the guidance "
                   "batch is edited: cond = the conditional half, as the paper and the "
                   "probes' fits (default); both = the unconditional half too, each half "
                   "toward the target from its own activations (the random control then "
                   "edits both halves at their own per-token norms)")
    if not sweep:
        p.add_argument("--strength", nargs="+", type=nonneg_float, dest="strengths",
                       help=_strength_help() + f" (default {D['strengths'][0]:g})")
    p.add_argument("--no-random-control", action="store_false", dest="random_control",
                   default=None, help="skip the equal-size random-direction edit (on by "
                   "default: each edit is repeated with a seeded random direction of the "
                   "same norm at every token)" + ("; refused: a sweep chooses by the margin "
                                                  "over it" if sweep else ""))
    n_default = f"{SweepSettings().base.n_targets}, at least 2" if sweep else str(D["n_targets"])
    p.add_argument("--n-targets", type=positive_int, help="targets made per image (shift, "
                   f"shift-x, insert; default {n_default}; the others are each output's "
                   "specificity control); not with a --targets file or folder, whose maps "
                   "per image are the targets")
    p.add_argument("--seed", type=index, help="seed of the target offsets and random "
                   f"directions (default {D['seed']}); not with a --targets file or folder "
                   "and --no-random-control, where nothing is random")
    p.add_argument("--provider", help="label provider reading the outputs (default: the one "
                   "that made the labels)")
    p.add_argument("--margin", type=positive_float, help="target logit magnitude for "
                   f"logistic (mask) probes; mask targets only (default {D['margin']:g})")
    p.add_argument("--lr", type=positive_float, help="Adam lr; --method gradient only "
                   f"(default {D['lr']:g})")
    p.add_argument("--iterations", type=positive_int, help="Adam iterations; --method "
                   f"gradient only (default {D['iterations']})")
    p.add_argument("--targets", help="shift (paper; default), shift-x (its horizontal offset "
                   "only: for a fixed camera), insert (Appendix E, depth), or a .npz keyed "
                   "by image id / folder of <image_id>.npy|.png")
    p.add_argument("--model-variant", help=f"trained or randomized (default {D['model_variant']})")
    p.add_argument("--batch-size", type=positive_int, help="interventions generated together "
                   f"(default {D['batch_size']})")
    p.add_argument("--device", help=f"cpu, cuda[:N] or auto (default {D['device']})")


def add_intervene_parser(sub: argparse._SubParsersAction,
                         common: argparse.ArgumentParser | None = None) -> None:
    """``common``: the options every subcommand also accepts after its name."""
    parents = [common] if common else []
    p = sub.add_parser("intervene", parents=parents, help="edit activations with a stored probe run during "
                       "generation and score whether the image follows, at one or more "
                       "strengths, beside an equal-size random control (resumable)")
    _add_edit_options(p)
    p.add_argument("--probe-run", required=True, help="probe run id (see probes/ in the store)")
    p.add_argument("--target", help="label target, e.g. salient or depth (default: the run's)")
    p.add_argument("--layers", nargs="+", help="capture points to edit, any array the probe "
                   "run has (default: salient → up_blocks.* attn1, depth → all attn1)")
    p.add_argument("--steps", nargs="+", type=index, help="default: salient 0-4, depth 0-2")
    p.add_argument("--images", nargs="+", help="image ids or one START:STOP (default: the "
                   "test split)")
    p.add_argument("--target-units", choices=["normalized", "raw"],
                   help="units of user depth arrays (raw = provider units, z-scored here); "
                   "a --targets file or folder of a continuous target only")
    p.add_argument("--experiment", dest="experiment_id", help="experiment id (default: a hash "
                   "of the settings, so rerunning a command resumes it)")
    p.add_argument("--figure", help="write the original/target/intervened/new-label PNG here")
    _add_fan_out_options(p, "image blocks")
    q = sub.add_parser("sweep", parents=parents, help="dose-response grid (capture kind × steps × strength) "
                       "on validation test images; the setting with the largest specific "
                       "effect is then run on other test images")
    _add_edit_options(q, sweep=True)
    q.add_argument("--probe-run", required=True, nargs="+", help="probe run id(s), one per "
                   "target")
    q.add_argument("--kinds", nargs="+", help=f"capture kinds to try (default "
                   f"{' '.join(SW['kinds'])})")
    q.add_argument("--sites", dest="layer_prefix", nargs="+", type=_sites, help="which points "
                   "of each kind a cell edits: 'decoder' (default: sites up_blocks.*), 'all' "
                   "(every point of the kind the probe run has, e.g. all 16 block points, as "
                   "the paper edits for depth), or site prefixes such as up_blocks.2. "
                   "up_blocks.3. (points matching any)")
    q.add_argument("--step-counts", nargs="+", type=positive_int, help="edit the first N steps, for "
                   f"each N, at most the probe run's (default "
                   f"{' '.join(map(str, SW['step_counts']))})")
    q.add_argument("--strength", nargs="+", type=nonneg_float, dest="strengths",
                   help=_strength_help() + " (default "
                   f"{' '.join(f'{s:g}' for s in SW['strengths'])})")
    q.add_argument("--validation", type=positive_int, help="test images the setting is chosen on "
                   f"(default {SW['validation']})")
    q.add_argument("--evaluation", type=positive_int, help="other test images it is reported on "
                   f"(default {SW['evaluation']})")
    q.add_argument("--max-edit-size", type=positive_float, help="largest median relative "
                   "edit size ||edit||/||activation|| a setting may have to be chosen; larger "
                   "ones are run and tabled, marked 'over cap', never chosen (default "
                   f"{SW['max_edit_size']:g}: larger edits degrade the toy model's images; "
                   "docs/results.md)")
    q.add_argument("--out", help="folder for the dose-response and grid figures")
    _add_fan_out_options(q, "each cell's image blocks", "; the cells, then the evaluation, "
                         "run one after another on it, as `intervene` runs one experiment")


def _add_fan_out_options(p, what: str, note: str = "") -> None:
    """``--workers``/``--cluster``: where ``what`` runs, the same for every command that
    runs intervention experiments."""
    p.add_argument("--workers", type=positive_int, help=f"fan {what} out over a local "
                   "Dask cluster of N worker processes (each loads the model once; on a GPU "
                   f"device, on a GPU of its own){note}")
    p.add_argument("--cluster", help=f"fan {what} out over a running Dask scheduler, "
                   f"e.g. tcp://HOST:8786{note}")


def _sites(value: str) -> str:
    """--sites → the sweep's site prefix: 'decoder' and 'all' are names for the two the
    paper uses (decoder for salient, every point for depth); anything else is a prefix."""
    return {"decoder": SW["layer_prefix"], "all": ""}.get(value, value)


EDIT_FIELDS = ("method", "direction", "halves", "random_control", "n_targets", "seed", "provider",
               "margin", "lr", "iterations", "model_variant", "batch_size", "device", "targets")


def _given(args, names) -> dict:
    """The options the user passed (None = not given: the dataclass default applies)."""
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def _n_targets_with_file(args) -> None:
    """``--n-targets`` counts the targets made per image; a targets file or folder holds
    its own (K maps per image), and a file of one map per image with ``--n-targets 3``
    ran one target without a word."""
    if args.n_targets is not None and args.targets is not None \
            and args.targets not in TARGET_MODES:
        raise InputError(f"--n-targets {args.n_targets}: counts the targets made per image "
                         f"(--targets {', '.join(TARGET_MODES)}), and --targets "
                         f"{args.targets} gives its own maps per image; drop --n-targets "
                         "(for K targets, give K maps per image in the file)")


def intervention_settings(args: argparse.Namespace) -> InterventionSettings:
    _n_targets_with_file(args)
    images = args.images
    if images and len(images) == 1:
        images = images[0]
    given = _given(args, EDIT_FIELDS + ("strengths", "target", "layers", "steps",
                                        "target_units", "experiment_id"))
    return InterventionSettings(images=images, **given)


def sweep_settings(args: argparse.Namespace) -> SweepSettings:
    _n_targets_with_file(args)
    base = _given(args, EDIT_FIELDS)
    base.setdefault("n_targets", SweepSettings().base.n_targets)
    grid = _given(args, ("kinds", "step_counts", "strengths", "validation", "evaluation",
                         "max_edit_size"))
    sites = getattr(args, "layer_prefix", None)
    if sites:   # one prefix stays a string, so the default sweeps keep their ids
        grid["layer_prefix"] = sites[0] if len(sites) == 1 else \
            ("" if "" in sites else tuple(sites))
    return SweepSettings(base=InterventionSettings(**base), **grid)


def intervene_command(args: argparse.Namespace, catalog: Catalog | None) -> dict:
    """Run the experiment through the Prefect flow, or directly with ``--no-prefect``."""
    from actstore.intervene.tables import format_interventions

    store, settings = store_uri(args, catalog), intervention_settings(args)
    check_fan_out(args, "experiment blocks", settings.device)
    from actstore.intervene.plan import check_request, unedited_note

    # a typo: before a Prefect server; points the edit will skip: said before it starts
    note = unedited_note(store, args.probe_run, check_request(store, args.probe_run, settings))
    if note:
        print(f"actstore intervene: note: {note}", file=sys.stderr)
    if args.no_prefect:
        from actstore.intervene.run import run_interventions
        from actstore.plots.interventions import intervention_grid

        summary = run_interventions(store, args.probe_run, settings, progress=not args.quiet)
        if args.figure and summary["complete"]:
            summary["figure"] = intervention_grid(store, summary["experiment_id"], args.figure)
    else:
        from flows.cli import flow_mode
        from flows.intervene import intervene_flow

        with flow_mode(args):
            summary = intervene_flow(store=store, probe_run=args.probe_run, settings=settings,
                                     figure=args.figure, workers=args.workers,
                                     cluster=args.cluster, progress=not args.quiet)
    return {**summary, "table": format_interventions(summary)} if summary["complete"] \
        else summary


def sweep_command(args: argparse.Namespace, catalog: Catalog | None) -> dict:
    from actstore.intervene.tables import format_cells, format_sweeps

    store, settings = store_uri(args, catalog), sweep_settings(args)
    check_fan_out(args, "sweep cells", settings.base.device)  # before its Prefect server starts
    typed = bool(args.step_counts)     # a count beyond a run's steps: refused (plan_sweep)
    if args.no_prefect:
        from actstore.intervene.sweep import run_sweep

        result = run_sweep(store, args.probe_run, settings, out_dir=args.out,
                           progress=not args.quiet, counts_given=typed)
    else:
        from actstore.intervene.sweep import plan_sweep
        from flows.cli import flow_mode
        from flows.intervene import sweep_flow

        # the flow plans again; here a probe run, image set or cell the store cannot give
        # is refused before the Prefect server and the flow run start (a few reads)
        plan_sweep(store, args.probe_run, settings, out_dir=args.out, counts_given=typed)
        with flow_mode(args):
            result = sweep_flow(store=store, probe_runs=args.probe_run, settings=settings,
                                out_dir=args.out, workers=args.workers,
                                cluster=args.cluster, progress=not args.quiet)
    return {**result, "table": format_cells(result["targets"]) + "\n\n"
            + format_sweeps(result["targets"])}
