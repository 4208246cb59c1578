"""``actstore materialize`` and ``actstore verify``: the argparse parsers and handlers, for
``flows.cli`` to register. Options left out are not passed on, so their defaults are the
ones written in :class:`MaterializeSettings`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from actstore.cliargs import nonneg_float, positive_int
from actstore.errors import ActstoreError
from flows.cli_checks import (STORE_HELP, catalog_vae_source, check_fan_out,
                              check_table_and_region, check_url, store_uri)

if TYPE_CHECKING:
    from actstore.catalog import Catalog

CAPTURE_HELP = ("capture kinds, comma-separated, each once (default: the kinds the model "
                "variant has; a new model variant (the first, or --control randomized) takes "
                "attn1 only, so give the control the trained model's kinds to probe both "
                "alike): attn1 self-attention, attn2 cross-attention, block Transformer2D "
                "output (residual stream), resnet ResNet block outputs, vae VAE-decoder "
                "mid-block attention; naming an absent kind adds it to a stored model after "
                "a regeneration check. Bytes per image (fp16, 15 steps): SD v1.4 at 512 px "
                "attn1, attn2, block 347 MB each, resnet 361 MB, vae 63 MB; toy model 2.0, "
                "2.0, 2.0, 2.05, 0.49 MB")


def add_materialize_verify_parsers(sub: argparse._SubParsersAction,
                                   common: argparse.ArgumentParser) -> None:
    _add_materialize(sub, common)
    _add_verify(sub, common)


def _add_materialize(sub, common) -> None:
    p = sub.add_parser("materialize", parents=[common], help="generate images and store the "
                       "activations of every capture point (resumable; several workers may "
                       "fill disjoint --images; --capture adds kinds to a stored model)")
    p.add_argument("--store", required=True, help=STORE_HELP)
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
    p.add_argument("--workers", type=positive_int, help="fan out over a local Dask cluster "
                   "of N worker processes (each loads the model once; on a GPU device, each "
                   "gets a GPU of its own: N at most the GPUs in CUDA_VISIBLE_DEVICES)")
    p.add_argument("--cluster", help="fan out over a running Dask scheduler, e.g. "
                   "tcp://HOST:8786 (one `dask worker` per GPU)")


def _add_settings_options(p) -> None:
    """Options left unset keep MaterializeSettings' defaults (written there only)."""
    p.add_argument("--batch-size", type=positive_int, help="images per UNet call")
    p.add_argument("--block-size", type=positive_int, help="images per storage shard (new "
                   "stores only)")
    p.add_argument("--steps", type=positive_int, help="denoising steps")
    p.add_argument("--guidance", type=nonneg_float, help="default: the store entry's, else "
                   "the model's catalog guidance (toy-ldm: 3), else 7.5")
    p.add_argument("--height", type=positive_int, help="image height in pixels (default: the "
                   "model's native size)")
    p.add_argument("--width", type=positive_int, help="image width in pixels (default: the "
                   "model's native size)")
    p.add_argument("--device", help="cpu, cuda[:N] or auto (default auto)")
    p.add_argument("--dtype", choices=["float32", "float16"],
                   help="model dtype (default: the catalog model's, else float32)")
    p.add_argument("--store-dtype", choices=["float16", "float32"], help="dtype of the stored "
                   "activations (default float16)")
    p.add_argument("--codec", help="zstd, zstd5, lz4, zstd-bitround8 (lossy), none")


def _add_verify(sub, common) -> None:
    v = sub.add_parser("verify", parents=[common], help="regenerate stored images and report "
                       "per image whether the stored images and activations are reproduced "
                       "(bitwise on CPU); writes nothing, runs in-process")
    v.add_argument("--store", required=True, help=STORE_HELP)
    v.add_argument("--images", help="region START:STOP (block-aligned)")
    v.add_argument("--model", help="default: the model folder recorded in the store")
    v.add_argument("--models", nargs="+", help="variants (default: every one in the store)")
    v.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto (default auto)")
    v.add_argument("--batch-size", type=positive_int, help="images per UNet call (default: "
                   "the one each block was made with, recorded since 2026-12-05, else 4; "
                   "another batch size may round differently, depending on the CPU, so it "
                   "may not be bitwise)")


def materialize_command(args: argparse.Namespace, catalog: Catalog | None) -> dict:
    from actstore.catalog import (resolve_guidance, resolve_model, resolve_prompts,
                                  resolve_store)
    from actstore.generation.materialize import MaterializeSettings

    entry = resolve_store(catalog, args.store)
    model_name = args.model or entry["model"]
    prompts_name = args.prompts or entry["prompts"]
    if not model_name or not prompts_name:
        raise ActstoreError(f"--store {args.store}: not a catalog store with a model and "
                            "prompts, so --model and --prompts are required")
    model = resolve_model(catalog, model_name)
    settings = MaterializeSettings().with_options(
        steps=args.steps or entry["steps"],
        guidance=resolve_guidance(args.guidance, entry, model),
        height=args.height or entry["height"], width=args.width or entry["width"],
        batch_size=args.batch_size, block_size=args.block_size, device=args.device,
        dtype=args.dtype or model["dtype"], control=args.control, codec=args.codec,
        store_dtype=args.store_dtype, keep_uncond=args.keep_uncond,
        x0=False if args.no_x0 else None, kinds=args.capture or entry["capture"],
        vae_source=args.vae_source or entry["vae_source"])
    model_ref, prompts, store = model["ref"], resolve_prompts(catalog, prompts_name), \
        entry["uri"]
    check_url(store, "--store")
    check_url(prompts, "--prompts")
    check_table_and_region(prompts, args.images, store, settings.block_size)
    check_fan_out(args, "regions", settings.device)
    if not args.vae_source and settings.cap.vae_source != "latent":
        catalog_vae_source(args.store, store, settings)
    from actstore.generation.fingerprint import check_stored_settings
    check_stored_settings(store, model_ref, settings)   # before a cluster loads the model
    if args.no_prefect:
        from actstore.generation.materialize import completion, format_completion, materialize
        from actstore.plots.figures import sample_grid

        summary = materialize(model_ref, prompts, store, settings, images=args.images,
                              progress=not args.quiet)
        if args.grid:
            summary["grid_png"] = sample_grid(store, summary["model"], args.grid)
        summary["complete"] = completion(store)
        summary["status"] = format_completion(store, summary["complete"])
        return summary
    from flows.cli import flow_mode
    from flows.materialize import materialize_flow

    with flow_mode(args):
        return materialize_flow(model_ref, prompts, store, settings, images=args.images,
                                workers=args.workers, cluster=args.cluster,
                                grid_png=args.grid, progress=not args.quiet)


def verify_command(args: argparse.Namespace, catalog: Catalog | None) -> dict:
    from actstore.catalog import resolve_model
    from actstore.generation.regenerate import verify

    model = resolve_model(catalog, args.model)["ref"] if args.model else None
    result = verify(store_uri(args, catalog), model=model, images=args.images,
                    variants=args.models, device=args.device, batch_size=args.batch_size,
                    progress=not args.quiet)
    if result["not_reproduced"]:
        from flows.cli import write_out
        write_out(result["table"])
        hint = (f"; {result['blocks_without_batch_size']} blocks record no batch size (made "
                "before 2026-12-05) and were regenerated 4 images per call: pass the store's "
                "--batch-size (the main job's is 8)" if result["blocks_without_batch_size"]
                else "")
        cause = "the store and this machine's generation differ"
        if result["recorded_batch_sizes_overridden"]:
            made = " or ".join(map(str, result["recorded_batch_sizes_overridden"]))
            cause = (f"its blocks were made {made} images per UNet call, not --batch-size "
                     f"{args.batch_size}, which may round differently: drop --batch-size to "
                     "regenerate each block with its own")
        raise ActstoreError(f"{len(result['not_reproduced'])} of {result['images']} images not "
                            f"reproduced ({', '.join(result['not_reproduced'][:4])}); "
                            f"{cause}{hint}")
    result.pop("rows")
    return result
