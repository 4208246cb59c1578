"""``actstore`` command line: argument parsing and error reporting, nothing else.

Every subcommand resolves catalog names, checks its input, then calls a Prefect flow (or,
with ``--no-prefect``, the same library function directly, e.g. inside a batch job that has
no Prefect API). It prints a short summary (``--json``: the full result as JSON); any
failure is one line on stderr (``--debug`` adds the traceback) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import sys
import traceback
from contextlib import AbstractContextManager
from pathlib import Path

from actstore.cliargs import OneLineParser, nonneg_float, positive_int
from actstore.errors import ActstoreError
from flows.cli_checks import (STORE_HELP, check_fan_out, check_figure_outputs,
                              check_table_and_region, store_under_out, store_uri)
from flows.cli_env import (command_environment, one_interrupt, quiet_libraries,
                           use_storage_options)
from flows.cli_report import as_json, failure_line, main_job_files, summary

TARGETS = ("salient", "depth", "shading")
DESCRIPTION = ("Store a latent diffusion model's activations (every self-attention layer, "
               "image and denoising step) in Zarr, label probe targets, fit probes over "
               "layers x steps and edit generations with them (README.md, docs/).")


def _common(top: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the subcommand (`actstore main --quiet`)."""
    p = OneLineParser(add_help=False)
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    p.add_argument("--catalog", default=default(None), help="catalog.yaml to resolve names "
                   "(default: ./catalog.yaml, else the repository's)")
    p.add_argument("--no-prefect", action="store_true", default=default(False),
                   help="call the library directly instead of running a Prefect flow")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--quiet", action="store_true", default=default(False),
                     help="no progress bars")
    out.add_argument("--verbose", action="store_true", default=default(False),
                     help="also Prefect's and Dask's INFO logs")
    p.add_argument("--json", action="store_true", default=default(False),
                   help="print the full result as JSON instead of a short summary")
    p.add_argument("--debug", action="store_true", default=default(False),
                   help="on failure, print the traceback before the one-line error")
    p.add_argument("--threads", type=positive_int, default=default(None),
                   help="torch CPU threads (default: one core fewer than the machine has; "
                   "also $ACTSTORE_THREADS)")
    p.add_argument("--storage-options", metavar="JSON|@FILE", default=default(None),
                   help="fsspec options for an object store (endpoint, credentials, ...), e.g. "
                   "'{\"client_kwargs\": {\"endpoint_url\": \"http://HOST:9000\"}}'; @FILE "
                   "reads them from a file (keeps secrets off the command line); default: "
                   "the environment (AWS_*, FSSPEC_S3)")
    return p


def _add_show(sub, common) -> None:
    s = sub.add_parser("show", parents=[common], help="what a store holds: images, model "
                       "variants and capture kinds, label targets and versions, probe runs, "
                       "experiments, sweeps (ids to pass to the other commands); reads "
                       "records only, writes nothing")
    s.add_argument("--store", required=True, help=STORE_HELP)


def _add_main(sub, common) -> None:
    m = sub.add_parser("main", parents=[common], help="the main job on the embedded default "
                       "model: materialize, label, probe, figures, interventions (a Prefect "
                       "flow; prints the summary tables and the files written)")
    m.add_argument("--model", help="default: toy-ldm if its folder exists, else tiny-random")
    m.add_argument("--prompts", help="default: toyworld for toy-ldm, demo for tiny-random")
    m.add_argument("--out", default="runs/main", help="folder for the store and figures")
    m.add_argument("--images", help="region START:STOP of the prompt table: only materializes "
                   "it (labels, probes and interventions need the whole table; for a small "
                   "job, pass a small --prompts table)")
    m.add_argument("--steps", type=positive_int, help="denoising steps")
    m.add_argument("--guidance", type=nonneg_float,
                   help="default: the model's catalog guidance (toy-ldm: 3), else 7.5")
    m.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS),
                   help="label targets to probe, each once (default: all three)")
    m.add_argument("--device", help="cpu, cuda[:N] or auto (default auto)")
    m.add_argument("--workers", type=positive_int, help="local Dask worker processes for "
                   "the whole job, more than one: one cluster runs materialize's regions, "
                   "the label block groups, the probe grid and every sweep experiment's "
                   "block groups (default: one per two cores on a CPU, one per visible GPU "
                   "on GPUs, a GPU each; one, or cuda:N with N > 0: all in this process)")
    m.add_argument("--cluster", help="run the same stages on a running Dask scheduler, e.g. "
                   "tcp://HOST:8786 (not with --workers)")
    m.add_argument("--capture", help="capture kinds (default attn1,block,vae; see materialize "
                   "--capture)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="actstore", description=DESCRIPTION,
                     parents=[_common(top=True)],
                     epilog="Output: a short summary on stdout (--json: the full result), "
                     "progress bars on stderr (--quiet: none); a failure is one line on "
                     "stderr with exit code 2 (bad input, an option given twice, full disk, "
                     "read-only store), 130 (Ctrl-C; rerun to resume), 143 (SIGTERM, "
                     "stopped as Ctrl-C) or 1 (unexpected; --debug shows the traceback).")
    common = _common(top=False)
    sub = parser.add_subparsers(dest="command", required=True)
    from flows.cli_materialize import add_materialize_verify_parsers
    add_materialize_verify_parsers(sub, common)
    _add_show(sub, common)
    from flows.cli_label import add_label_probe_parsers
    add_label_probe_parsers(sub, common)
    from flows.cli_intervene import add_intervene_parser
    add_intervene_parser(sub, common)
    _add_main(sub, common)
    for listed in sub._choices_actions:     # `actstore X --help` opens with what X does
        sub.choices[listed.dest].description = listed.help
    return parser


def _materialize(args, catalog) -> dict:
    from flows.cli_materialize import materialize_command
    return materialize_command(args, catalog)


def _verify(args, catalog) -> dict:
    from flows.cli_materialize import verify_command
    return verify_command(args, catalog)


def _label(args, catalog) -> dict:
    from flows.cli_label import label_command
    return label_command(args, catalog)


def _probe(args, catalog) -> dict:
    from flows.cli_label import probe_command
    return probe_command(args, catalog)


def _main_job(args, catalog) -> dict:
    from actstore.catalog import resolve_guidance, resolve_model, resolve_prompts
    from actstore.generation.models import check_model

    if args.no_prefect:
        raise ActstoreError("main runs as one Prefect flow (its stages are tasks); drop "
                            "--no-prefect, or run materialize, label, probe and intervene "
                            "with --no-prefect one by one")
    # first (its default is MaterializeSettings' auto); more than one worker is a local
    # cluster, a GPU each (one runs in this process); with --cluster only the name here,
    # the flow asks the cluster's workers
    check_fan_out(args, "the main job's stages", args.device, in_process=1)
    from actstore.options import named_once
    named_once("--targets", "target", args.targets)   # labelled and probed twice, before
    toy = catalog is not None and "toy-ldm" in catalog.models and \
        Path(resolve_model(catalog, "toy-ldm")["ref"], "model_index.json").is_file()
    model = resolve_model(catalog, args.model or ("toy-ldm" if toy else "tiny-random"))
    prompts = args.prompts or ("toyworld" if model["name"] == "toy-ldm" else "demo")
    from flows.main import MAIN_MATERIALIZE, check_rerun, main_flow, main_store

    settings = MAIN_MATERIALIZE.with_options(
        steps=args.steps, guidance=resolve_guidance(args.guidance, {}, model),
        device=args.device, kinds=args.capture)
    params = {"model": model["ref"], "prompts": resolve_prompts(catalog, prompts),
              "out": args.out, "images": args.images, "settings": settings,
              "workers": args.workers, "cluster": args.cluster,
              "targets": tuple(args.targets)}
    check_model(model["ref"])    # before the flow creates --out
    with store_under_out(args.out):   # --images against the blocks of the store under --out
        check_table_and_region(params["prompts"], args.images, main_store(args.out),
                               settings.block_size)
        check_rerun(args.out, model["ref"], settings)
    with flow_mode(args), store_under_out(args.out):
        result = main_flow(**params)
    return {**result, "files": main_job_files(result, args.out)}


def _intervene(args, catalog) -> dict:
    from flows.cli_intervene import intervene_command
    return intervene_command(args, catalog)


def _show(args, catalog) -> dict:
    from actstore.inventory import describe
    return describe(store_uri(args, catalog))


def _sweep(args, catalog) -> dict:
    from flows.cli_intervene import sweep_command
    return sweep_command(args, catalog)


COMMANDS = {"materialize": _materialize, "verify": _verify, "label": _label, "probe": _probe,
            "intervene": _intervene, "sweep": _sweep, "main": _main_job, "show": _show}


def flow_mode(args: argparse.Namespace) -> AbstractContextManager[None]:
    """Where flows run (see :func:`flows.prefect_api.flow_mode`); entered only after a
    command's own checks, so bad input fails before a server starts."""
    from flows.prefect_api import flow_mode as mode

    return mode(verbose=args.verbose, debug=args.debug)


def _run(args) -> dict:
    if args.no_prefect and args.verbose:
        logging.basicConfig(level=logging.INFO)
    check_figure_outputs(args)
    from actstore.runtime import env_threads
    env_threads()       # a bad ACTSTORE_THREADS fails here, before workers read it
    from actstore.catalog import find_catalog

    catalog = find_catalog(args.catalog)
    if args.storage_options is not None:
        use_storage_options(args, catalog)
    return COMMANDS[args.command](args, catalog)


def _exit_promptly() -> None:
    """After Ctrl-C, the interpreter's exit skips its last garbage collections: they walk
    every object torch, Prefect and Dask made (600,000), and took 4.5 of the 6-7 s a
    terminal's Ctrl-C of `materialize --workers 2` took at load 7.5 (0.3 s frozen,
    2026-12-05). Nothing is left to them: the command has stopped its workers and its
    server, and a store never depends on finalizers (blocks are committed explicitly).
    At exit, not now, so a caller that runs :func:`main` in its own process keeps its
    collector."""
    atexit.register(gc.freeze)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    # run from the console (no argv), the process exits next: later signals stay ignored
    with command_environment(args), one_interrupt(keep_ignoring=argv is None) as ctrl_c:
        try:
            result = _run(args)
        except (Exception, KeyboardInterrupt) as exc:  # one line; --debug adds the traceback
            if args.debug:
                traceback.print_exc()
            exc = ctrl_c.reported(exc)     # whatever a library made of a signal
            line, code = failure_line(args.command, exc,
                                      getattr(args, "store", None) or getattr(args, "out", None))
            print(line, file=sys.stderr)
            if isinstance(exc, KeyboardInterrupt):
                _exit_promptly()
            return code
    if result is not None:
        write_out(as_json(result) if args.json else summary(args.command, result))
    return 0


def write_out(text: str) -> None:
    """A reader that stops early (`actstore show ... | head -1`) closes the pipe once it has
    what it wanted: the command's work is done, so that is no failure and no traceback.
    Standard output then goes to /dev/null, or the interpreter's flush at exit would meet
    the closed pipe again."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
