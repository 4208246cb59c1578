"""Does an edit stay? The probes' reading at every step of an edited generation.

An edit made at the first steps reaches the image only through the latent those steps
leave behind. If, at the first step that is no longer edited, the probes read the original
map again, the model has undone the edit: the edited direction is one the network reads
(the probe sees it) but does not write back into the latent. This is what tells an edit
that is too weak from one in a direction the image does not depend on; the dose-response
of :mod:`actstore.intervene.run` cannot, since both leave the image where it was.

For each strength (0 = the unedited generation, bit for bit), every edited point's probe
is read *before* that point's edit at every step the probe run covers; the error to the
target (probe units: RMSE for a continuous target, the share of tokens on the wrong side
for a mask) is averaged over the points, and the median over interventions is reported
per step, beside the label model's score of the final image. Nothing is written.

``python -m actstore.intervene.persistence --store S --probe-run R --layers … --steps 0 1 2
--strength 3 10 --images ID …`` prints the table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from actstore.catalog import find_catalog, resolve_store
from actstore.cliargs import OneLineParser, index, nonneg_float, positive_int
from actstore.errors import ActstoreError
from actstore.generation.points import hooks
from actstore.generation.sampling import GenerationConfig, generate
from actstore.intervene.edits import EditHook, probe_predict, torch_directions, torch_probes
from actstore.intervene.inputs import load_store_model
from actstore.intervene.plan import plan_interventions
from actstore.intervene.run import _block_targets, _label
from actstore.intervene.scores import metric_of, score
from actstore.intervene.settings import InterventionSettings
from actstore.intervene.targets import token_targets
from actstore.kinds import BINARY

if TYPE_CHECKING:
    from actstore.generation.models import LoadedModel


def _error(z: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    """Per row: RMSE in probe units, or for a mask the share of tokens on the wrong side."""
    if kind == BINARY:
        return ((z > 0) != (t > 0)).float().mean(-1)
    return (z - t).pow(2).mean(-1).sqrt()


def persistence(store: str, probe_run: str, settings: InterventionSettings, *,
                model: LoadedModel | None = None) -> dict:
    """Probe error to the target per step, with the edits of ``settings`` (projection or
    gradient, every strength and 0) at its layers and steps; no random arm, nothing stored.

    Returns ``steps`` (read), ``edited_steps``, ``strengths`` (0 first), ``error``
    (strength × step, median over interventions; NaN where no probe), ``per_row`` (strength
    × row × step), ``final`` (median label score of the final image per strength) and
    ``metric``."""
    s = settings.without_random_arm().with_(
        strengths=tuple(dict.fromkeys((0.0, *settings.strengths))))
    plan = plan_interventions(store, probe_run, s)
    model = load_store_model(plan.view, model, s.device)
    gen = GenerationConfig(**plan.view.attrs["fingerprint"]["generation"])
    n, K = len(plan.image_ids), plan.n_targets
    tgt, _ = _block_targets(plan, 0, n)
    B = n * K
    solvers = {la: p["solver"] for la, p in plan.probes.items()}
    read_steps = sorted(set.intersection(*(set(p["steps"]) for p in plan.probes.values())))
    reads = torch_probes(plan.probes, read_steps, model.device)
    edits = torch_probes(plan.probes, plan.steps, model.device)
    tok = {la: torch.from_numpy(token_targets(tgt.reshape(B, *plan.hw), plan.grids[la],
                                              plan.kind, solvers[la], s.margin)).to(model.device)
           for la in plan.layers}
    rows = [(i, k) for i in range(n) for k in range(K)]
    prompts = [plan.prompts[i] for i, _ in rows]
    seeds = [plan.seeds[i] for i, _ in rows]
    per_row = np.full((len(s.strengths), B, len(read_steps)), np.nan)
    final = []
    for si, strength in enumerate(s.strengths):
        hook = EditHook(s.method, plan.kind, solvers, edits, tok, B,
                        strengths=torch.full((B,), strength), lr=s.lr, iterations=s.iterations,
                        halves=s.halves,
                        directions=torch_directions(plan.patterns, model.device))
        sums, counts = np.zeros((B, len(read_steps))), np.zeros(len(read_steps))

        def read_then_edit(layer: str, out: torch.Tensor, hook=hook, sums=sums, counts=counts):
            if hook.step in read_steps:
                j = read_steps.index(hook.step)
                w, b = reads[layer][hook.step]
                z = probe_predict(out[B:].float(), w, b)
                sums[:, j] += _error(z, tok[layer], plan.kind).double().cpu().numpy()
                counts[j] += 1
            return hook(layer, out) if hook.step in plan.steps else None

        def start(i: int, hook=hook) -> None:
            hook.step = i

        with hooks(model, plan.layers, read_then_edit):
            images = generate(model, prompts, seeds, gen, on_step_start=start)
        per_row[si] = sums / np.maximum(counts, 1)
        labels = _label(plan, images, [f"row {r}" for r in range(B)])
        final.append(float(np.nanmedian(score(labels, tgt.reshape(B, *plan.hw), plan.kind))))
    return {"steps": read_steps, "edited_steps": plan.steps, "strengths": list(s.strengths),
            "error": np.median(per_row, axis=1), "per_row": per_row, "final": final,
            "metric": metric_of(plan.kind), "layers": plan.layers, "images": plan.image_ids}


def format_persistence(res: dict) -> str:
    """One row per strength: the probe error per step (edited steps starred), final score."""
    head = " ".join(f"{s}{'*' if s in res['edited_steps'] else ' '}".rjust(6)
                    for s in res["steps"])
    lines = [f"strength {head}  final {res['metric']}"]
    for s, row, fin in zip(res["strengths"], res["error"], res["final"]):
        lines.append(f"{s:8g} " + " ".join(f"{v:6.3f}" for v in row) + f"  {fin:.3f}")
    return "\n".join(lines)


def build_parser() -> OneLineParser:
    """The options say what they take, as `actstore intervene --help` does: a diagnostic
    is run by hand, from its --help."""
    p = OneLineParser(prog="python -m actstore.intervene.persistence",
                      description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True,
                   help="store URI (a folder, s3://...) or catalog store name")
    p.add_argument("--catalog", help="catalog.yaml to resolve --store (default: "
                   "./catalog.yaml, else the repository's)")
    p.add_argument("--probe-run", required=True,
                   help="probe run id whose probes edit and read (see `actstore show`)")
    p.add_argument("--layers", nargs="+", default=(),
                   help="capture points to edit, any the probe run has (default: as actstore "
                        "intervene: salient → up_blocks.* attn1, depth → all attn1)")
    p.add_argument("--steps", nargs="+", type=index, default=(),
                   help="steps to edit (default: salient 0-4, depth 0-2); every step the run "
                        "covers is read")
    p.add_argument("--strength", nargs="+", type=nonneg_float, default=(3.0,),
                   dest="strengths", help="edit strength(s) beside the unedited 0 (default 3)")
    p.add_argument("--images", nargs="+", default=None,
                   help="image ids or one START:STOP (default: the test split)")
    p.add_argument("--method", default="projection", help="projection (default) or gradient")
    p.add_argument("--direction", default="probe", help="projection along the probe's "
                   "weights or its activation pattern (as actstore intervene)")
    p.add_argument("--halves", default="cond", help="guidance halves edited: cond (default) "
                   "or both (as actstore intervene); the conditional half is read")
    p.add_argument("--targets", default="shift",
                   help="shift (default), shift-x, insert, or a .npz / folder of targets "
                        "keyed by image id (as actstore intervene)")
    p.add_argument("--n-targets", type=positive_int, default=2,
                   help="targets per image (default 2)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    a = p.parse_args(argv)
    images = a.images[0] if a.images and len(a.images) == 1 and ":" in a.images[0] else a.images
    try:
        settings = InterventionSettings(layers=tuple(a.layers), steps=tuple(a.steps),
                                        strengths=tuple(a.strengths), images=images,
                                        method=a.method, direction=a.direction,
                                        halves=a.halves,
                                        targets=a.targets,
                                        n_targets=a.n_targets)
        store = resolve_store(find_catalog(a.catalog), a.store)["uri"]
        print(format_persistence(persistence(store, a.probe_run, settings)))
    except ActstoreError as exc:
        p.fail(exc)


if __name__ == "__main__":
    main()
