"""Text tables of intervention results, for the command line and the main job.

Medians throughout (the paper's statistic); shares are of interventions. "toward" is the
share that moved toward their own target, ">rand" the share that beat their equal-size
random-direction edit, ">other" the share closer to their own target than to the image's
other targets. ``size`` is the median ‖Δa‖/‖a‖ of the probe edit.
"""

from __future__ import annotations


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def _share(d: dict | None):
    return None if d is None else d.get("share")


def format_interventions(summary: dict) -> str:
    """One experiment's dose table: per strength, the probe edit beside its controls."""
    along = "" if summary.get("direction", "probe") == "probe" else \
        f" along the {summary['direction']}"    # summaries before --direction: the probe
    along += " on both CFG halves" if summary.get("halves") == "both" else ""
    lines = [f"{summary['target']} {summary['method']}{along} ({summary['metric']}; "
             f"{summary['interventions']} interventions, pre {_num(summary['pre'].get('median'))})",
             f"{'strength':>8s} {'size':>6s} {'post':>6s} {'random':>6s} {'other':>6s} "
             f"{'toward':>6s} {'>rand':>6s} {'>other':>6s} {'non-finite':>10s}"]
    for row in summary["dose"]:
        probe, rnd = row["probe"], row.get("random", {})
        non_finite = probe["non_finite"] + rnd.get("non_finite", 0)
        lines.append(f"{row['strength']:8g} {_num(probe['edit']['relative_change']):>6s} "
                     f"{_num(probe['post'].get('median')):>6s} "
                     f"{_num(rnd.get('post', {}).get('median')):>6s} "
                     f"{_num(probe['other_targets'].get('median')):>6s} "
                     f"{_pct(_share(probe['improved'])):>6s} "
                     f"{_pct(_share(probe.get('beats_random'))):>6s} "
                     f"{_pct(_share(probe['specific'])):>6s} {non_finite:10d}")
    return "\n".join(lines)


def _setting(c: dict) -> str:
    return f"{c['kind']} x{len(c['layers'])} steps {c['steps'][0]}-{c['steps'][-1]} " \
           f"s={c['strength']:g}"


def _cap(rec: dict) -> float | None:
    """The record's edit-size cap (records made before there was one have none)."""
    return rec.get("max_edit_size")


def format_sweeps(found: dict[str, dict]) -> str:
    """Per causal target: the setting its sweep chose on validation images (among those
    whose edit size is within the cap), and what it did on other test images beside its
    controls."""
    head = (f"{'target':8s} {'targets':8s} {'chosen on':>9s} {'chosen setting':32s} "
            f"{'cap':>5s} {'n':>3s} {'size':>5s} {'pre':>6s} {'post':>6s} {'random':>6s} "
            f"{'other':>6s} {'toward':>6s} {'>rand':>6s} {'>other':>6s}")
    lines = ["causal test: each setting chosen on validation test images, reported on "
             "others (n interventions; size = median |edit|/|activation|, chosen only "
             "if <= cap)", head]
    for target, rec in found.items():
        c, r = rec["chosen"], rec["result"]
        mode = rec["settings"]["base"]["targets"]
        if r is None:
            lines.append(f"{target:8s} {mode:8s} {rec['note']}")
            continue
        lines.append(f"{target:8s} {mode:8s} {len(rec['validation_images']):9d} "
                     f"{_setting(c):32s} {_num(_cap(rec)):>5s} {r['interventions']:3d} "
                     f"{_num(r['relative_change']):>5s} "
                     f"{_num(r['pre']):>6s} {_num(r['post']):>6s} {_num(r['random']):>6s} "
                     f"{_num(r['other']):>6s} {_pct(r['improved']):>6s} "
                     f"{_pct(r['beats_random']):>6s} {_pct(r['specific']):>6s}")
    return "\n".join(lines)


def format_cells(found: dict[str, dict]) -> str:
    """Every setting each sweep tried on its validation images, with its edit size and
    specific effect; ``*`` marks the chosen one, ``over cap`` those too large to be chosen."""
    lines = ["sweep cells on validation images (specific = the smallest of gain, margin over "
             "random, margin over other targets)",
             f"{'target':8s} {'setting':32s} {'size':>6s} {'pre':>6s} {'post':>6s} "
             f"{'random':>6s} {'other':>6s} {'specific':>8s}"]
    for target, rec in found.items():
        c, cap = rec["chosen"] or {}, _cap(rec)
        for cell in rec["cells"]:
            hit = c and all(cell[k] == c[k] for k in ("kind", "steps", "strength"))
            mark = " *" if hit else (f" over cap {cap:g}" if cell.get("over_cap") else "")
            lines.append(f"{target:8s} {_setting(cell):32s} {_num(cell['relative_change']):>6s} "
                         f"{_num(cell['pre']):>6s} {_num(cell['post']):>6s} "
                         f"{_num(cell['random']):>6s} {_num(cell['other']):>6s} "
                         f"{_num(cell['effect']['specific']):>8s}{mark}")
    return "\n".join(lines)
