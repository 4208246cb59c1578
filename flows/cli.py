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
CAPTURE_HELP = ("capture kinds, comma-separated (default: the store's, else attn1): attn1 "
                "self-attention, attn2 cross-attention, block Transformer2D output (residual "
                "stream), resnet ResNet block outputs, vae VAE-decoder mid-block attention; "
                "naming an absent kind adds it to a stored model after a regeneration check. "
                "Bytes per image (fp16, 15 steps): SD v1.4 at 512 px attn1, attn2, block 347 MB "
                "each, resnet 361 MB, vae 63 MB; toy model 2.0, 2.0, 2.0, 2.05, 0.49 MB")
EXIT_USER_ERROR = 2


def _catalog(path: str | None):
    from actstore.catalog import load_catalog

    if path:
        return load_catalog(path)
    if Path("catalog.yaml").is_file():
        return load_catalog("catalog.yaml")
    return load_catalog(REPO_CATALOG) if REPO_CATALOG.is_file() else None


def _add_materialize(sub) -> None:
    p = sub.add_parser("materialize", help="generate images and store the activations of "
                       "every capture point (resumable; several workers may fill disjoint "
                       "--images; --capture adds kinds to a stored model)")
    p.add_argument("--store", required=True, help="store URI or catalog store name")
    p.add_argument("--model", help="catalog model name, diffusers folder, cached HF id, or "
                   "tiny-random (default: the catalog store's model)")
    p.add_argument("--prompts", help="CSV/Parquet table (image_id, prompt, seed[, split]) or "
                   "catalog prompt set (default: the catalog store's prompts)")
    p.add_argument("--images", help="region START:STOP of the prompt table (block-aligned)")
    _add_settings_options(p)
    p.add_argument("--control", choices=["randomized"], help="materialize the randomized-"
                   "weights control instead of the trained model")
    p.add_argument("--keep-uncond", action="store_true", default=None, help="also store the "
                   "unconditional half of the CFG batch")
    p.add_argument("--no-x0", action="store_true", help="skip decoding x0 at every step")
    p.add_argument("--capture", help=CAPTURE_HELP)
    p.add_argument("--vae-source", choices=["latent", "x0"], help="what the vae kind decodes "
                   "at each step: the updated latent (default, the paper) or the x0 prediction")
    p.add_argument("--grid", help="write a PNG sample grid here when done")
    p.add_argument("--workers", type=int, help="fan out over a local Dask cluster of N "
                   "worker processes (each loads the model once)")
    p.add_argument("--cluster", help="fan out over a running Dask scheduler, e.g. "
                   "tcp://HOST:8786 (one `dask worker` per GPU)")


def _add_settings_options(p) -> None:
    """Options left unset keep MaterializeSettings' defaults (written there only)."""
    p.add_argument("--batch-size", type=int, help="images per UNet call")
    p.add_argument("--block-size", type=int, help="images per storage shard (new stores only)")
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--guidance", type=float, help="default: the store entry's, else the "
                   "model's catalog guidance (toy-ldm: 3), else 7.5")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--device", help="cpu, cuda[:N] or auto")
    p.add_argument("--dtype", help="model dtype: float32 or float16")
    p.add_argument("--store-dtype", choices=["float16", "float32"])
    p.add_argument("--codec", help="zstd, zstd5, lz4, zstd-bitround8 (lossy), none")


def _add_verify(sub) -> None:
    v = sub.add_parser("verify", help="regenerate stored images and report per image whether "
                       "the stored images and activations are reproduced (bitwise on CPU); "
                       "writes nothing, runs in-process")
    v.add_argument("--store", required=True)
    v.add_argument("--images", help="region START:STOP (block-aligned)")
    v.add_argument("--model", help="default: the model folder recorded in the store")
    v.add_argument("--models", nargs="+", help="variants (default: every one in the store)")
    v.add_argument("--device", default="auto")
    v.add_argument("--batch-size", type=int, default=4)


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
    q.add_argument("--label-spearman", action="store_true", help="also Spearman at label "
                   "resolution (ranks every upsampled map: costs several read passes)")


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
    _add_verify(sub)
    _add_label_probe(sub)
    from flows.cli_intervene import add_intervene_parser
    add_intervene_parser(sub)
    m = sub.add_parser("main", help="the main job on the embedded default model: materialize,"
                       " figures (always a Prefect flow)")
    m.add_argument("--model", help="default: toy-ldm if its folder exists, else tiny-random")
    m.add_argument("--prompts", help="default: toyworld for toy-ldm, demo for tiny-random")
    m.add_argument("--out", default="runs/main", help="folder for the store and figures")
    m.add_argument("--images", help="region START:STOP of the prompt table")
    m.add_argument("--steps", type=int, help="denoising steps")
    m.add_argument("--guidance", type=float,
                   help="default: the model's catalog guidance (toy-ldm: 3), else 7.5")
    m.add_argument("--device", help="cpu, cuda[:N] or auto")
    m.add_argument("--workers", type=int, help="materialize worker processes (default: one "
                   "per two cores on a CPU, one on a GPU)")
    m.add_argument("--capture", help="capture kinds (default attn1,block,vae; see materialize "
                   "--capture)")
    return parser


def _materialize(args, catalog) -> dict:
    from actstore.catalog import (resolve_guidance, resolve_model, resolve_prompts,
                                  resolve_store)

    if args.cluster and not args.no_prefect:  # before torch loads: one line within seconds
        from actstore.cluster import check_scheduler
        check_scheduler(args.cluster)
    entry = resolve_store(catalog, args.store)
    model_name = args.model or entry["model"]
    prompts_name = args.prompts or entry["prompts"]
    if not model_name or not prompts_name:
        raise ActstoreError(f"--store {args.store}: not a catalog store with a model and "
                            "prompts, so --model and --prompts are required")
    model = resolve_model(catalog, model_name)
    from actstore.generation.materialize import MaterializeSettings

    settings = MaterializeSettings().with_options(
        steps=args.steps or entry["steps"], guidance=resolve_guidance(args.guidance, entry, model),
        height=args.height or entry["height"], width=args.width or entry["width"],
        batch_size=args.batch_size, block_size=args.block_size, device=args.device,
        dtype=args.dtype or model["dtype"], control=args.control, codec=args.codec,
        store_dtype=args.store_dtype, keep_uncond=args.keep_uncond,
        x0=False if args.no_x0 else None, kinds=args.capture or entry["capture"],
        vae_source=args.vae_source or entry["vae_source"])
    model_ref, prompts, store = model["ref"], resolve_prompts(catalog, prompts_name), entry["uri"]
    if args.no_prefect:
        if args.workers or args.cluster:
            raise ActstoreError("--workers/--cluster run regions as Prefect task runs on Dask;"
                                " drop --no-prefect")
        from actstore.generation.materialize import completion, format_completion, materialize
        from actstore.plots.figures import sample_grid

        summary = materialize(model_ref, prompts, store, settings, images=args.images,
                              progress=not args.quiet)
        if args.grid:
            summary["grid_png"] = sample_grid(store, summary["model"], args.grid)
        summary["complete"] = completion(store)
        summary["status"] = format_completion(store, summary["complete"])
        return summary
    from flows.materialize import materialize_flow

    return materialize_flow(model_ref, prompts, store, settings, images=args.images,
                            workers=args.workers, cluster=args.cluster, grid_png=args.grid,
                            progress=not args.quiet)


def _verify(args, catalog) -> dict:
    from actstore.catalog import resolve_model, resolve_store
    from actstore.generation.regenerate import verify

    model = resolve_model(catalog, args.model)["ref"] if args.model else None
    result = verify(resolve_store(catalog, args.store)["uri"], model=model, images=args.images,
                    variants=args.models, device=args.device, batch_size=args.batch_size,
                    progress=not args.quiet)
    if result["not_reproduced"]:
        print(result["table"])
        raise ActstoreError(f"{len(result['not_reproduced'])} of {result['images']} images not "
                            f"reproduced ({', '.join(result['not_reproduced'][:4])}); the store "
                            "and this machine's generation differ")
    result.pop("rows")
    return result


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
                                steps=args.steps, scheduler=sched, progress=not args.quiet,
                                label_spearman=args.label_spearman)
        out = {"store": store, "target": args.target, "run_id": run_id}
        if args.figures:
            out["figures"] = probe_figures(store, args.target, args.figures)
        return out
    from flows.probe import probe_flow

    return probe_flow(store, args.target, args.models, args.layers, args.steps,
                      args.scheduler, args.figures, args.label_spearman)


def _main_job(args, catalog) -> dict:
    from actstore.catalog import resolve_guidance, resolve_model, resolve_prompts

    toy = catalog is not None and "toy-ldm" in catalog.models and \
        Path(resolve_model(catalog, "toy-ldm")["ref"], "model_index.json").is_file()
    model = resolve_model(catalog, args.model or ("toy-ldm" if toy else "tiny-random"))
    prompts = args.prompts or ("toyworld" if model["name"] == "toy-ldm" else "demo")
    from flows.main import MAIN_MATERIALIZE, main_flow

    settings = MAIN_MATERIALIZE.with_options(
        steps=args.steps, guidance=resolve_guidance(args.guidance, {}, model),
        device=args.device, kinds=args.capture)
    return main_flow(model=model["ref"], prompts=resolve_prompts(catalog, prompts),
                     out=args.out, images=args.images, settings=settings,
                     workers=args.workers)


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


COMMANDS = {"materialize": _materialize, "verify": _verify, "label": _label, "probe": _probe,
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
        status = result.pop("status", None) if isinstance(result, dict) else None
        print(json.dumps(result, indent=1, default=str))
        if table:
            print("\n" + table)
        if status:
            print(status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
