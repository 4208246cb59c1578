"""``actstore`` command line: argument parsing and error reporting, nothing else.

Every subcommand resolves catalog names, then calls a Prefect flow (or, with
``--no-prefect``, the same library function directly, e.g. inside a batch job that has no
Prefect API). Any :class:`ActstoreError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from actstore.errors import ActstoreError

REPO_CATALOG = Path(__file__).resolve().parent.parent / "catalog.yaml"
EXIT_USER_ERROR = 2


def _catalog(path: str | None):
    from actstore.catalog import load_catalog

    if path:
        return load_catalog(path)
    if Path("catalog.yaml").is_file():
        return load_catalog("catalog.yaml")
    return load_catalog(REPO_CATALOG) if REPO_CATALOG.is_file() else None


def _add_materialize(sub) -> None:
    p = sub.add_parser("materialize", help="generate images and store every self-attention "
                       "activation (resumable; several workers may fill disjoint --images)")
    p.add_argument("--store", required=True, help="store URI or catalog store name")
    p.add_argument("--model", help="catalog model name, diffusers folder, cached HF id, or "
                   "tiny-random (default: the catalog store's model)")
    p.add_argument("--prompts", help="CSV/Parquet table (image_id, prompt, seed[, split]) or "
                   "catalog prompt set (default: the catalog store's prompts)")
    p.add_argument("--images", help="region START:STOP of the prompt table (block-aligned)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, help="images per storage shard (new stores only;"
                   " default 4)")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float, help="default: the store entry's, else the "
                   "model's catalog guidance (toy-ldm: 3), else 7.5")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto")
    p.add_argument("--dtype", help="model dtype: float32 (default) or float16")
    p.add_argument("--store-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--codec", default="zstd", help="zstd (default), zstd5, lz4, "
                   "zstd-bitround8 (lossy), none")
    p.add_argument("--control", choices=["randomized"], help="materialize the randomized-"
                   "weights control instead of the trained model")
    p.add_argument("--keep-uncond", action="store_true", help="also store the unconditional "
                   "half of the CFG batch")
    p.add_argument("--no-x0", action="store_true", help="skip decoding x0 at every step")
    p.add_argument("--grid", help="write a PNG sample grid here when done")


def _add_label_probe(sub) -> None:
    p = sub.add_parser("label", help="write a probe target (labels) into a store; never "
                       "touches activations")
    p.add_argument("--store", required=True)
    p.add_argument("--provider", required=True, help="toyworld | hf-depth:FOLDER | "
                   "hf-segmentation:FOLDER | array:FILE(.npz|.zarr)")
    p.add_argument("--target", required=True, nargs="+", help="name(s) of the target(s) in "
                   "the store; several are labelled in one pass of the provider")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-x0", action="store_true", help="skip labelling the per-step x0 images")
    p.add_argument("--device", default="cpu")
    q = sub.add_parser("probe", help="fit a linear probe per (model, layer, step) for a target")
    q.add_argument("--store", required=True)
    q.add_argument("--target", required=True)
    q.add_argument("--models", nargs="+", help="default: every model variant in the store")
    q.add_argument("--layers", nargs="+")
    q.add_argument("--steps", nargs="+", type=int)
    q.add_argument("--scheduler", help="Dask scheduler address (default: a local cluster)")
    q.add_argument("--figures", help="folder for the PNG figures")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actstore", description=__doc__.split("\n")[0])
    parser.add_argument("--catalog", help="catalog.yaml to resolve names (default: ./catalog."
                        "yaml, else the repository's)")
    parser.add_argument("--no-prefect", action="store_true", help="call the library directly "
                        "instead of running a Prefect flow")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: one core "
                        "fewer than the machine has; also $ACTSTORE_THREADS)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_materialize(sub)
    _add_label_probe(sub)
    from flows.cli_intervene import add_intervene_parser
    add_intervene_parser(sub)
    m = sub.add_parser("main", help="the main job on the embedded default model: materialize,"
                       " figures (always a Prefect flow)")
    m.add_argument("--model", help="default: toy-ldm if its folder exists, else tiny-random")
    m.add_argument("--prompts", help="default: toyworld for toy-ldm, demo for tiny-random")
    m.add_argument("--out", default="runs/main", help="folder for the store and figures")
    m.add_argument("--images", help="region START:STOP of the prompt table")
    m.add_argument("--steps", type=int, default=15)
    m.add_argument("--guidance", type=float,
                   help="default: the model's catalog guidance (toy-ldm: 3), else 7.5")
    m.add_argument("--device", default="auto")
    return parser


def _materialize(args, catalog) -> dict:
    from actstore.catalog import (resolve_guidance, resolve_model, resolve_prompts,
                                  resolve_store)

    entry = resolve_store(catalog, args.store)
    model_name = args.model or entry["model"]
    prompts_name = args.prompts or entry["prompts"]
    if not model_name or not prompts_name:
        raise ActstoreError(f"--store {args.store}: not a catalog store with a model and "
                            "prompts, so --model and --prompts are required")
    model = resolve_model(catalog, model_name)
    params = {
        "model": model["ref"], "prompts": resolve_prompts(catalog, prompts_name),
        "store": entry["uri"], "images": args.images, "batch_size": args.batch_size,
        "steps": args.steps or entry["steps"] or 15,
        "guidance": resolve_guidance(args.guidance, entry, model),
        "height": args.height or entry["height"], "width": args.width or entry["width"],
        "device": args.device, "dtype": args.dtype or model["dtype"] or "float32",
        "control": args.control, "codec": args.codec, "store_dtype": args.store_dtype,
        "keep_uncond": args.keep_uncond, "x0": not args.no_x0, "block_size": args.block_size,
        "grid_png": args.grid}
    if args.no_prefect:
        from actstore.generation.sampling import GenerationConfig
        from actstore.generation.materialize import CaptureConfig, materialize
        from actstore.plots.figures import sample_grid

        summary = materialize(
            params["model"], params["prompts"], params["store"], images=params["images"],
            batch_size=params["batch_size"],
            gen=GenerationConfig(params["steps"], params["guidance"], params["height"],
                                 params["width"]),
            cap=CaptureConfig(params["store_dtype"], params["codec"], params["keep_uncond"],
                              params["x0"]),
            dtype=params["dtype"], device=params["device"], control=params["control"],
            block_size=params["block_size"], progress=not args.quiet)
        if args.grid:
            summary["grid_png"] = sample_grid(params["store"], summary["model"], args.grid)
        return summary
    from flows.materialize import materialize_flow

    return materialize_flow(**params)


def _label(args, catalog) -> dict:
    from actstore.catalog import resolve_store

    store = resolve_store(catalog, args.store)["uri"]
    # One --target keeps the one-target summary its users already read; several, a dict.
    target = args.target[0] if len(args.target) == 1 else args.target
    if args.no_prefect:
        from actstore.label.labels import write_labels
        return write_labels(store, args.provider, target, overwrite=args.overwrite,
                            on_x0=not args.no_x0, device=args.device, progress=not args.quiet)
    from flows.probe import label_task
    from prefect import flow

    return flow(name="label")(label_task)(store, args.provider, target, args.overwrite,
                                         not args.no_x0, args.device)


def _probe(args, catalog) -> dict:
    from actstore.catalog import resolve_store

    store = resolve_store(catalog, args.store)["uri"]
    if args.no_prefect:
        from actstore.cluster import dask_scheduler
        from actstore.plots.figures import probe_figures
        from actstore.probe.runs import run_probes

        with dask_scheduler(args.scheduler) as sched:
            run_id = run_probes(store, args.target, models=args.models, layers=args.layers,
                                steps=args.steps, scheduler=sched, progress=not args.quiet)
        out = {"store": store, "target": args.target, "run_id": run_id}
        if args.figures:
            out["figures"] = probe_figures(store, args.target, args.figures)
        return out
    from flows.probe import probe_flow

    return probe_flow(store, args.target, args.models, args.layers, args.steps,
                      args.scheduler, args.figures)


def _main_job(args, catalog) -> dict:
    from actstore.catalog import resolve_guidance, resolve_model, resolve_prompts

    toy = catalog is not None and "toy-ldm" in catalog.models and \
        Path(resolve_model(catalog, "toy-ldm")["ref"], "model_index.json").is_file()
    model = resolve_model(catalog, args.model or ("toy-ldm" if toy else "tiny-random"))
    prompts = args.prompts or ("toyworld" if model["name"] == "toy-ldm" else "demo")
    from flows.main import main_flow

    return main_flow(model=model["ref"], prompts=resolve_prompts(catalog, prompts),
                     out=args.out, images=args.images, steps=args.steps,
                     guidance=resolve_guidance(args.guidance, {}, model), device=args.device)


def _quiet_libraries() -> None:
    """diffusers/transformers chatter (load bars, deprecation notes) hides actstore's output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def _intervene(args, catalog) -> dict:
    from flows.cli_intervene import intervene_command
    return intervene_command(args, catalog)


COMMANDS = {"materialize": _materialize, "label": _label, "probe": _probe,
            "intervene": _intervene, "main": _main_job}


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        catalog = _catalog(args.catalog)
        if args.quiet:
            os.environ["TQDM_DISABLE"] = "1"
        if args.threads:
            os.environ["ACTSTORE_THREADS"] = str(args.threads)
        result = COMMANDS[args.command](args, catalog)
    except ActstoreError as exc:
        print(f"actstore {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    if result is not None:
        table = result.pop("table", None) if isinstance(result, dict) else None
        print(json.dumps(result, indent=1, default=str))
        if table:
            print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
