"""One self-contained HTML page of a job's results: the tables, then every figure it drew.

Built only from what the job already wrote (PNGs in its out folder, tables in its store),
so it can be rebuilt at any time and shows whatever part of the job ran: a section with
nothing to show (a job on ``--images``, a model without labels) is listed as absent rather
than failing the job. Figures are embedded as base64 PNG so the page can be mailed or
attached as one file.

A new figure is one more line in ``SECTIONS``: a title, one sentence on what it shows,
and the glob of the PNGs the job writes for it.
"""

from __future__ import annotations

import base64
import html
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from actstore.errors import ActstoreError

Rows = list[dict]


@dataclass(frozen=True)
class Section:
    """A heading of the page: ``says`` is the sentence a reader needs to read the figures;
    ``figures`` are glob patterns in the out folder (embedded in name order); ``table``
    builds rows from the store, or returns None when it has nothing to show."""

    title: str
    says: str
    figures: tuple[str, ...] = ()
    table: Callable[[str], Rows | None] | None = None


def emergence_rows(store: str) -> Rows | None:
    """Per target and capture kind: best layer, last-step score trained vs randomized,
    emergence step."""
    from actstore.probe.emergence import summary_table
    from actstore.probe.runs import open_emergence

    try:
        rows = summary_table(open_emergence(store))
    except (FileNotFoundError, KeyError, ActstoreError):
        return None
    return [{"target": r["target"], "kind": r["kind"], "metric": r["metric"],
             "best layer": r["best_layer"],
             "trained": r.get("trained"), "randomized": r.get("randomized"),
             "emerges at step": r["emergence_step"]} for r in rows] or None


def intervention_rows(store: str) -> Rows | None:
    """The causal test: per sweep, the setting chosen on validation images and what it did
    on the evaluation images beside both controls; without sweeps, every complete
    experiment at each strength."""
    from actstore.intervene.results import list_interventions
    from actstore.intervene.sweep import list_sweeps

    try:
        sweeps, experiments = list_sweeps(store), list_interventions(store)
    except (FileNotFoundError, KeyError, ActstoreError):
        return None
    if sweeps:
        return [_sweep_row(rec) for rec in sweeps.values()]
    return [{"experiment": name, "target": s["target"], "method": s["method"],
             "metric": s["metric"], "n": s["interventions"], "strength": row["strength"],
             "pre": s["pre"].get("median"), "post": row["probe"]["post"].get("median"),
             "random edit": row.get("random", {}).get("post", {}).get("median"),
             "other targets": row["probe"]["other_targets"].get("median"),
             "toward target": (row["probe"]["improved"] or {}).get("share"),
             "non-finite": row["probe"]["non_finite"]}
            for name, s in experiments.items() for row in s["dose"]] or None


def _sweep_row(rec: dict) -> dict:
    c, r = rec["chosen"], rec["result"] or {}
    return {"target": rec["target"], "chosen on": f"{len(rec['validation_images'])} images",
            "setting": c and f"{c['kind']} ×{len(c['layers'])}, steps {c['steps'][0]}-"
                             f"{c['steps'][-1]}, strength {c['strength']:g}",
            "reported on": f"{len(rec['evaluation_images'])} other images",
            "n": r.get("interventions"), "edit size": r.get("relative_change"),
            "edit size cap": rec.get("max_edit_size"),
            "pre": r.get("pre"), "post": r.get("post"), "random edit": r.get("random"),
            "other targets": r.get("other"), "toward target": r.get("improved"),
            "beats random": r.get("beats_random"), "beats other targets": r.get("specific"),
            "note": rec.get("note")}


SECTIONS: tuple[Section, ...] = (
    Section("Summary", "For each target, the layer whose probe scores best at the last step, "
            "that score for the trained model and for the randomized-weights control (what a "
            "probe finds without learning), and the first step reaching 90% of it.",
            table=emergence_rows),
    Section("Capture kinds", "Per target, the best score among each capture kind's layers "
            "at every step, trained solid, randomized dashed: which part of the network "
            "carries the property, and from which step.",
            figures=("capture-kinds.png", "*-kinds.png")),
    Section("Samples", "The decoded x0 prediction at a few denoising steps and the final "
            "image: what each model has settled on by each step.",
            figures=("samples-*.png",)),
    Section("Emergence curves", "Test score of each (layer, step) probe against the denoising "
            "step, one panel per layer: trained solid, randomized control dashed; beside it "
            "(naming.png), when a classifier on each step's decoded x0 image names what the "
            "prompt asked for.", figures=("*-curves.png", "naming.png")),
    Section("Layer × step heatmaps", "The headline metric for every layer and step, trained "
            "beside randomized: where and how early the property is linearly decodable.",
            figures=("*-heatmap.png",)),
    Section("Figure 4: probe predictions per step", "Per step, the decoded x0 image, the best "
            "layer's probe prediction and the label model on x0: the probe sees the scene "
            "before the image shows it.", figures=("*-figure4.png",)),
    Section("Interventions", "Each edit asks the probe for a shifted target during generation; "
            "Dice up / RMSE down from pre to post means the image followed. It counts only "
            "if it beats an equal-size random-direction edit and the same output scored "
            "against the image's other targets; the setting is chosen on validation images "
            "and reported on others (dose-response: effect against edit size).",
            figures=("dose-response.png", "intervention-*.png"), table=intervention_rows),
)


def write_report(out_dir: str | Path, store: str | None = None, *,
                 sections: Sequence[Section] = SECTIONS, notes: Sequence[str] = (),
                 title: str = "actstore report", path: str | Path | None = None) -> str:
    """Write ``report.html`` (or ``path``) from ``out_dir``'s figures and ``store``'s tables
    (default ``out_dir/store.zarr``); returns the page's path.

    A path holding no store is refused before anything is written: a mistyped folder got
    a new folder and an empty page, as if the job had drawn nothing."""
    from actstore.store.core import read_root_attrs

    out = Path(out_dir)
    store = store or str(out / "store.zarr")
    try:
        read_root_attrs(store)
    except ActstoreError as exc:
        raise ActstoreError(f"no report for {out}: {exc}, or pass store= where the job's "
                            "store is") from None
    parts, absent = [], []
    for section in sections:
        body = _section_body(section, out, store)
        if body:
            parts.append(f'<section><h2>{_e(section.title)}</h2>\n<p class="says">'
                         f'{_e(section.says)}</p>\n{body}</section>')
        else:
            absent.append(section.title)
    foot = [f"<p>Not in this run: {_e(', '.join(absent))}.</p>"] if absent else []
    page = _PAGE.format(
        title=_e(title), store=_e(store),
        when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        notes="".join(f'<p class="note">{_e(n)}</p>' for n in notes),
        body="\n".join(parts + foot))
    target = Path(path) if path else out / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return str(target)


def _section_body(section: Section, out: Path, store: str) -> str:
    html_parts = []
    rows = section.table(store) if section.table else None
    if rows:
        html_parts.append(_table(rows))
    for png in _figures(out, section.figures):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        html_parts.append(f'<figure><img alt="{_e(png.name)}" src="data:image/png;base64,'
                          f'{data}"><figcaption>{_e(png.name)}</figcaption></figure>')
    return "\n".join(html_parts)


def _figures(out: Path, patterns: Sequence[str]) -> list[Path]:
    found = {p for pattern in patterns for p in out.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: ("randomized" in p.name, p.name))  # control after


def _table(rows: Rows) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_e(_cell(r.get(c)))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
figcaption, .meta {{ color: #666; font-size: 0.85em; }}
.note {{ background: #fff6d6; padding: 0.5em; }}
</style></head><body>
<h1>{title}</h1>
<p class="meta">store {store} · written {when}</p>
{notes}
{body}
</body></html>
"""
