"""``actstore label`` and ``actstore probe``: the argparse parsers and handlers, for
``flows.cli`` to register. Options left out are not passed on, so their defaults are the
ones written in :class:`LabelSettings` / :class:`ProbeSettings`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from actstore.label.settings import LabelSettings
from actstore.probe.settings import ProbeSettings
from actstore.cliargs import index, positive_int
from flows.cli_checks import STORE_HELP, check_fan_out, check_scheduler, store_uri

if TYPE_CHECKING:
    from actstore.catalog import Catalog


def add_label_probe_parsers(sub: argparse._SubParsersAction,
                            common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("label", parents=[common], help="write a probe target (labels) into a "
                       "store; never touches activations")
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--provider", required=True, help="toyworld | hf-depth:FOLDER | "
                   "hf-segmentation:FOLDER | array:FILE(.npz|.zarr): your own labels, an "
                   "'image_id' array of the store's image ids (strings) and one (N, H, W) "
                   "array per target, named as the target, at the store's image size; a "
                   "target whose values are all 0/1 is binary (logistic probes, Dice), any "
                   "other continuous (z-scored, ridge probes, RMSE); either is refused "
                   "if constant over the train images (a mask of one class)")
    p.add_argument("--target", required=True, nargs="+", help="name(s) of the target(s) in "
                   "the store, each once; several are labelled in one pass of the provider")
    p.add_argument("--overwrite", action="store_true", help="replace a target the store "
                   "already has (default: refuse)")
    p.add_argument("--no-x0", action="store_true", help="skip labelling the per-step x0 images")
    p.add_argument("--device", help="where the label model runs: cpu, cuda[:N] or auto "
                   f"(default {LabelSettings.device})")
    p.add_argument("--workers", type=positive_int, help="fan image blocks out over a local "
                   "Dask cluster of N worker processes (each loads the label model once; on "
                   "a GPU device, on a GPU of its own)")
    p.add_argument("--cluster", help="fan image blocks out over a running Dask scheduler, "
                   "e.g. tcp://HOST:8786")
    q = sub.add_parser("probe", parents=[common], help="fit a linear probe per (model, layer, "
                       "step) for a target")
    q.add_argument("--store", required=True, help=STORE_HELP)
    q.add_argument("--target", required=True, help="a target the store has labels for "
                   "(actstore label)")
    q.add_argument("--models", nargs="+", help="default: every model variant in the store")
    q.add_argument("--layers", nargs="+", help="capture points by store name, e.g. "
                   "up_blocks.3.attentions.0 block/mid_block.attentions.0 (default: all; "
                   "refused if the models differ in their points)")
    q.add_argument("--steps", nargs="+", type=index, help="step indices (default: all)")
    q.add_argument("--scheduler", "--cluster", dest="scheduler", help="a running Dask "
                   "scheduler's address, as --cluster of the other commands (also 'threads' "
                   "or 'sync' for one process; default: a local cluster)")
    q.add_argument("--figures", help="folder for the PNG figures")
    q.add_argument("--label-spearman", action="store_true", default=None, help="also "
                   "Spearman at label resolution (ranks every upsampled map: costs several "
                   "read passes)")


def label_command(args: argparse.Namespace, catalog: Catalog | None) -> dict:
    store = store_uri(args, catalog)
    # One --target keeps the one-target summary its users already read; several, a dict.
    target = args.target[0] if len(args.target) == 1 else args.target
    # A flag left out is None, so the default is LabelSettings' own.
    settings = LabelSettings().with_options(overwrite=args.overwrite or None,
                                            on_x0=False if args.no_x0 else None,
                                            device=args.device)
    check_fan_out(args, "image blocks", settings.device)
    if args.no_prefect:
        from actstore.label.labels import write_labels

        return write_labels(store, args.provider, target, settings, progress=not args.quiet)
    from flows.cli import flow_mode
    from flows.label import label_flow

    with flow_mode(args):
        return label_flow(store, args.provider, target, settings, workers=args.workers,
                          cluster=args.cluster, progress=not args.quiet)


def probe_command(args: argparse.Namespace, catalog: Catalog | None) -> dict:
    store = store_uri(args, catalog)
    check_scheduler(args.scheduler)
    settings = ProbeSettings().with_options(models=args.models, layers=args.layers,
                                            steps=args.steps,
                                            label_spearman=args.label_spearman)
    if args.no_prefect:
        from actstore.cluster import dask_scheduler
        from actstore.plots.figures import probe_figures
        from actstore.probe.runs import run_probes

        with dask_scheduler(args.scheduler) as sched:
            run_id = run_probes(store, args.target, settings, scheduler=sched,
                                progress=not args.quiet)
        out = {"store": store, "target": args.target, "run_id": run_id}
        if args.figures:
            out["figures"] = probe_figures(store, args.target, args.figures)
    else:
        from flows.cli import flow_mode
        from flows.probe import probe_flow

        with flow_mode(args):
            out = probe_flow(store, args.target, settings, scheduler=args.scheduler,
                             figures=args.figures)
    from actstore.probe.emergence import format_table, summary_table
    from actstore.probe.runs import open_emergence

    rows = [r for r in summary_table(open_emergence(store)) if r["target"] == args.target]
    return {**out, "summary": rows, "table": format_table(rows)}
