"""``actstore intervene``: the argparse parser and handler, for ``flows.cli`` to register.

Kept out of ``cli.py`` so the interventions feature ships as one unit; ``cli.py`` needs
``add_intervene_parser(sub, common)`` in ``build_parser`` and ``"intervene":
intervene_command`` in ``COMMANDS``.
"""

from __future__ import annotations

from actstore.intervene.edits import GRADIENT_ITERATIONS, GRADIENT_LR, METHODS
from actstore.intervene.targets import DEFAULT_MARGIN
from flows.cli_checks import check_url, index, positive_float, positive_int


def add_intervene_parser(sub, common=None) -> None:
    """``common``: the options every subcommand also accepts after its name."""
    p = sub.add_parser("intervene", parents=[common] if common else [],
                       help="edit activations with a stored probe run during generation and "
                       "score whether the image follows (resumable)")
    p.add_argument("--store", required=True, help="store URI or catalog store name")
    p.add_argument("--probe-run", required=True, help="probe run id (see probes/ in the store)")
    p.add_argument("--target", help="label target, e.g. salient or depth (default: the run's)")
    p.add_argument("--method", default="projection", choices=list(METHODS))
    p.add_argument("--layers", nargs="+", help="default: salient → up_blocks.* layers, "
                   "depth → all layers")
    p.add_argument("--steps", nargs="+", type=index, help="default: salient 0-4, depth 0-2")
    p.add_argument("--images", nargs="+", help="image ids or one START:STOP (default: the "
                   "test split)")
    p.add_argument("--n-targets", type=positive_int, default=5,
                   help="targets per image (shift/insert)")
    p.add_argument("--seed", type=index, default=0, help="seed of the target offsets")
    p.add_argument("--targets", default="shift", help="shift (paper), insert (Appendix E, "
                   "depth), or a .npz keyed by image id / folder of <image_id>.npy|.png")
    p.add_argument("--target-units", default="normalized", choices=["normalized", "raw"],
                   help="units of user depth arrays (raw = provider units, z-scored here)")
    p.add_argument("--provider", help="label provider reading the outputs (default: the one "
                   "that made the labels)")
    p.add_argument("--margin", type=positive_float, default=DEFAULT_MARGIN,
                   help="target logit magnitude for logistic (mask) probes")
    p.add_argument("--lr", type=positive_float, default=GRADIENT_LR,
                   help="gradient method: Adam lr")
    p.add_argument("--iterations", type=positive_int, default=GRADIENT_ITERATIONS,
                   help="gradient method: Adam iterations")
    p.add_argument("--model-variant", default="trained", help="trained or randomized")
    p.add_argument("--experiment", help="experiment id (default: a hash of the settings, so "
                   "rerunning a command resumes it)")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--figure", help="write the original/target/intervened/new-label PNG here")


def _params(args, catalog) -> dict:
    from actstore.catalog import resolve_store

    store = resolve_store(catalog, args.store)["uri"]
    check_url(store, "--store")
    images = args.images
    if images and len(images) == 1:
        images = images[0]
    return {"store": store, "probe_run": args.probe_run,
            "target": args.target, "method": args.method, "layers": args.layers,
            "steps": args.steps, "images": images, "n_targets": args.n_targets,
            "seed": args.seed, "provider": args.provider, "targets": args.targets,
            "target_units": args.target_units, "margin": args.margin, "lr": args.lr,
            "iterations": args.iterations, "model_variant": args.model_variant,
            "experiment_id": args.experiment, "device": args.device}


def intervene_command(args, catalog) -> dict:
    """Run the experiment through the Prefect flow, or directly with ``--no-prefect``."""
    from actstore.intervene.results import format_interventions

    summary = _run(args, _params(args, catalog))
    return {**summary, "table": format_interventions([summary])} if summary["complete"] \
        else summary


def _run(args, params: dict) -> dict:
    if args.no_prefect:
        from actstore.plots.interventions import intervention_grid
        from actstore.intervene.run import run_interventions

        summary = run_interventions(progress=not args.quiet, **params)
        if args.figure and summary["complete"]:
            summary["figure"] = intervention_grid(params["store"], summary["experiment_id"],
                                                  args.figure)
        return summary
    from flows.cli import flow_mode
    from flows.intervene import intervene_flow

    with flow_mode(args):
        return intervene_flow(figure=args.figure, **params)
