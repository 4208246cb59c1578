"""Projection vs gradient interventions: cost and effect, side by side, in one run.

Both methods run the same experiment (same store, probe run, images, targets, layers,
steps); runs are interleaved (projection, gradient, projection, ...) so machine load hits
both alike, and each repeat is a fresh experiment. Reported per method:

* wall time of the whole experiment (generation + edits + label model + writes), and the
  time spent inside the edit hooks alone (what the method itself costs);
* effect: median score pre → post (Dice up / RMSE down is the image following the
  target), share of interventions that moved toward the target, the output scored against
  the image's *other* targets (the control: clutter raises Dice against every target) and
  the share scoring better on its own target, the probe RMS error left after the edit,
  and the relative size of the activation change ‖Δa‖/‖a‖.

    python benchmarks/bench_interventions.py                      # tiny-random store, built here
    python benchmarks/bench_interventions.py --store runs/main/store.zarr --target depth \\
        --provider toyworld --images 0:16
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actstore.intervene import edits as ed  # noqa: E402
from actstore.intervene.run import run_interventions  # noqa: E402
from actstore.intervene.settings import InterventionSettings  # noqa: E402
from actstore.probe.runs import latest_run  # noqa: E402

DEMO = str(Path(__file__).resolve().parent.parent / "prompts" / "demo.csv")
TINY_LAYERS = {"salient": ["up_blocks.2.attentions.0", "up_blocks.2.attentions.1",
                           "up_blocks.2.attentions.2", "up_blocks.3.attentions.0",
                           "up_blocks.3.attentions.1", "up_blocks.3.attentions.2"],
               "depth": None}


class PixelLabels:
    """Label model for the tiny-random store: brightness as depth, bright = salient."""

    name = "pixel"
    spec = "pixel-bench"
    targets = {"salient": "binary", "depth": "continuous"}

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        g = images.astype(np.float32).mean(-1) / 255
        return {"depth": g,
                "salient": (g > g.mean(axis=(1, 2), keepdims=True)).astype(np.float32)}


def tiny_store(folder: Path, steps: int) -> tuple[str, dict[str, str]]:
    """A tiny-random store with pixel labels and probes on the paper's default cells."""
    from actstore.generation.sampling import GenerationConfig
    from actstore.label.labels import write_labels
    from actstore.generation.materialize import MaterializeSettings, materialize
    from actstore.probe.runs import run_probes

    uri = str(folder / "bench.zarr")
    materialize("tiny-random", DEMO, uri,
                MaterializeSettings(gen=GenerationConfig(steps=steps), batch_size=4,
                                    device="cpu", block_size=4),
                progress=False)
    runs = {}
    for target, n_steps in (("salient", 5), ("depth", 3)):
        write_labels(uri, PixelLabels(), target, on_x0=False, progress=False)
        runs[target] = run_probes(uri, target, layers=TINY_LAYERS[target],
                                  steps=list(range(min(n_steps, steps))),
                                  scheduler="synchronous", progress=False)
    return uri, runs


class HookTimer:
    """Adds up wall time spent inside EditHook calls (the method's own cost)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._call = ed.EditHook.__call__

    def __enter__(self):
        timer = self

        def timed(hook, layer, out):
            t = time.perf_counter()
            try:
                return timer._call(hook, layer, out)
            finally:
                timer.seconds += time.perf_counter() - t

        ed.EditHook.__call__ = timed
        return self

    def __exit__(self, *exc) -> None:
        ed.EditHook.__call__ = self._call


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", help="default: build a tiny-random store in a temp folder")
    ap.add_argument("--target", default="salient")
    ap.add_argument("--probe-run", help="default: the target's latest run")
    ap.add_argument("--provider", help="label provider spec (default: the labels' own; "
                    "pixel labels for the built tiny store)")
    ap.add_argument("--images", help="ids (comma-separated) or START:STOP; default test split")
    ap.add_argument("--layers", nargs="+", help="default: every UNet layer of the probe run")
    ap.add_argument("--steps", nargs="+", type=int, help="default: every step of the run")
    ap.add_argument("--n-targets", type=int, default=InterventionSettings.n_targets)
    ap.add_argument("--margin", type=float, default=InterventionSettings.margin,
                    help="target logit for mask probes")
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--gen-steps", type=int, default=15, help="tiny store only")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    return ap


def main() -> None:
    args = build_parser().parse_args()

    tmp = None
    provider = args.provider
    if args.store:
        store = args.store
        run = args.probe_run or latest_run(store, args.target)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench-iv-"))
        t = time.perf_counter()
        store, runs = tiny_store(tmp, args.gen_steps)
        run = runs[args.target]
        provider = provider or PixelLabels()
        print(f"built tiny-random store in {time.perf_counter() - t:.1f} s: {store}")
    from actstore.probe.runs import get_run
    layers, steps = args.layers, args.steps
    if layers is None or steps is None:   # default: every cell the run has probes for
        from actstore.generation.points import module_of

        attrs = get_run(store, run)   # that an edit reaches: the VAE decoder does not denoise
        unet = [la for la in attrs["layers"] if module_of(la).startswith("unet.")]
        layers, steps = layers or unet, steps or attrs["steps"]
    results: dict[str, list[dict]] = {"projection": [], "gradient": []}
    try:
        for r in range(args.repeats):
            for method in results:
                with HookTimer() as timer:
                    settings = InterventionSettings(
                        target=args.target, method=method, layers=layers, steps=steps,
                        images=args.images, n_targets=args.n_targets, provider=provider,
                        device=args.device, margin=args.margin, strengths=(args.strength,),
                        experiment_id=f"bench-{method}-{int(time.time())}-{r}")
                    out = run_interventions(store, run, settings, progress=False)
                out["edit_seconds"] = timer.seconds
                results[method].append(out)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    report(results)


def report(results: dict[str, list[dict]]) -> None:
    first = results["projection"][0]
    metric = first["metric"]
    print(f"\n{first['target']} ({metric}), probe run {first['probe_run']}: "
          f"{first['interventions']} interventions on {first['images']} images, "
          f"{len(first['layers'])} layers × steps {first['steps']}\n")
    nan = float("nan")

    def num(v):  # None / missing (every intervention blew up) print as nan
        return nan if v is None else v

    rows = {}
    for method, outs in results.items():
        o = outs[-1]
        d = o["dose"][0]["probe"]
        rows[method] = {
            "wall_s": statistics.median(x["seconds"] for x in outs),
            "edit_s": statistics.median(x["edit_seconds"] for x in outs),
            "pre": o["pre"]["median"], "post": d["post"].get("median", nan),
            "random": o["dose"][0]["random"]["post"].get("median", nan),
            "improved": num((d["improved"] or {}).get("share")),
            "non_finite": d["non_finite"],
            "vs_other_tgts": d["other_targets"].get("median", nan),
            "specific": num((d["specific"] or {}).get("share")),
            "probe_err_before": num(d["edit"]["probe_error_before"]),
            "probe_err_after": num(d["edit"]["probe_error_after"]),
            "rel_change": num(d["edit"]["relative_change"])}
    head = f"{'method':<11}" + "".join(f"{k:>17}" for k in rows["projection"])
    print(head)
    for method, row in rows.items():
        print(f"{method:<11}" + "".join(f"{v:>17.4g}" for v in row.values()))
    p, g = rows["projection"], rows["gradient"]
    gain = (lambda r: r["post"] - r["pre"]) if metric == "dice" else \
        (lambda r: r["pre"] - r["post"])
    print(f"\ngradient/projection: wall {g['wall_s'] / p['wall_s']:.2f}x, edits "
          f"{g['edit_s'] / max(p['edit_s'], 1e-9):.1f}x; effect (median {metric} "
          f"{'gain' if metric == 'dice' else 'reduction'}): projection {gain(p):+.4f}, "
          f"gradient {gain(g):+.4f}")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
