"""What a command prints: a short summary for people, JSON for programs, one line on failure.

stdout carries the result (human summary, or ``--json``); stderr carries progress bars and
errors. A failure is one line, ``actstore <command>: error: ...``, whatever raised it: an
:class:`ActstoreError` (bad input, exit 2), an operating-system error such as a full disk
or a read-only store (exit 2, with what to do), or anything else (exit 1, with a pointer
to ``--debug``, which adds the traceback). Ctrl-C is one line too (exit 130): what a
command writes is resumable, so it says so instead of showing where it was stopped.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

from actstore.cluster import worker_note
from actstore.errors import ActstoreError
from flows.cli_env import Terminated

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130      # 128 + SIGINT, as a shell reports a command Ctrl-C stopped
EXIT_TERMINATED = 143       # 128 + SIGTERM
_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def _os_error(exc: BaseException) -> OSError | None:
    """The first operating-system error in the chain: writers and zarr re-raise them."""
    return next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno is not None),
                None)


def failure_line(command: str, exc: BaseException, store: str | None = None
                 ) -> tuple[str, int]:
    """``(one line, exit code)`` for any exception a command raised; an operating-system
    error names its file, else a full or read-only disk names ``store`` (what the command
    writes to), since zarr and fsspec often raise those without the file's name; so does
    an object store's refusal (credentials that may read but not write). An error a Dask
    task met names its worker (:func:`actstore.cluster.worker_note`)."""
    if isinstance(exc, KeyboardInterrupt):
        term = isinstance(exc, Terminated)
        return (f"actstore {command}: {'terminated (SIGTERM)' if term else 'interrupted'}; "
                "completed blocks are kept, rerun the same command to resume",
                EXIT_TERMINATED if term else EXIT_INTERRUPTED)
    where = f"actstore {command}: error: "
    if isinstance(exc, ActstoreError):
        return where + _one_line(str(exc)), EXIT_USER_ERROR
    worker = worker_note(exc)        # met by a Dask task: that worker's environment
    on = f" ({worker})" if worker else ""
    refused = _object_store_refusal(exc, store) or _prefect_unreachable(exc, command)
    if refused:
        return where + _one_line(refused + on), EXIT_USER_ERROR
    os_exc = _os_error(exc)
    if os_exc is not None:
        disk = os_exc.errno in _FULL + _READ_ONLY
        name = f": {os_exc.filename}" if os_exc.filename else \
            f" writing to {store}" if store and disk else ""
        what = os_exc.strerror or str(os_exc)
        if os_exc.errno in _FULL:
            hint = "free space, then rerun the same command (completed blocks are kept)"
        elif os_exc.errno in _READ_ONLY:
            hint = "the store or output folder is not writable; check its permissions or mount"
        else:
            hint = "check the path and rerun"
        return where + _one_line(f"{what}{name}{on}; {hint}"), EXIT_USER_ERROR
    text = _one_line(str(exc)) or "(no message)"
    return (where + f"unexpected {type(exc).__name__}: {text}{on}; rerun with --debug for "
            "the traceback", EXIT_INTERNAL_ERROR)


def _object_store_refusal(exc: BaseException, store: str | None) -> str | None:
    """An object store's refusal met after the store opened (read-only credentials meeting
    the first write), said as the refusals met on opening it are (``actstore.store.access``)."""
    from actstore.store.access import describe_refusal

    said = describe_refusal(exc, store or "")
    return f"store {store}: {said}" if said and store else said


def _prefect_unreachable(exc: BaseException, command: str) -> str | None:
    """The Prefect API the command reports to, not answering (or its temporary server
    gone mid-run, :class:`flows.prefect_api.PrefectApiLost`): said with its URL and the
    ways out. Before (2026-12-06) a ``PREFECT_API_URL`` nothing listened on was the bare
    'Connection refused; check the path and rerun' of any refused socket. Told from an
    object store's or a scheduler's refusal by the failed request's URL, which is under
    the API's (neither of those goes through httpx to it)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    no_prefect = "" if command == "main" else \
        f", or run without Prefect (actstore --no-prefect {command} ...)"
    flows_api = sys.modules.get("flows.prefect_api")    # not imported: no temporary server
    lost = flows_api and next((e for e in _chain(exc)
                               if isinstance(e, flows_api.PrefectApiLost)), None)
    if lost is not None:
        return (f"{lost.args[0]} (the temporary server this command started has ended); "
                "what the run recorded is kept: rerun the same command to resume"
                f"{no_prefect}")
    api = PREFECT_API_URL.value()
    err = next((e for e in _chain(exc) if isinstance(e, httpx.TransportError)), None)
    request = _request_of(err)
    if not api or request is None or \
            not f"{str(request.url).rstrip('/')}/".startswith(f"{api.rstrip('/')}/"):
        return None
    os_exc = _os_error(exc)
    why = os_exc.strerror if os_exc is not None and os_exc.strerror else type(err).__name__
    return (f"the Prefect API at {api} (PREFECT_API_URL) cannot be reached ({why}); start "
            "it (prefect server start) or point PREFECT_API_URL at one that runs, unset "
            f"PREFECT_API_URL to use a temporary local server{no_prefect}")


def _request_of(err):
    """The request an httpx transport error was raised for (None: no error, or none)."""
    try:
        return None if err is None else err.request
    except RuntimeError:    # raised without one
        return None


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and what caused it, outermost first."""
    seen: list[BaseException] = []
    while exc is not None and all(exc is not e for e in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def as_json(result: object) -> str:
    return json.dumps(result, indent=1, default=str)


def summary(command: str, result: dict) -> str:
    """A few lines a person reads; ``--json`` has everything."""
    return _SUMMARIES[command](result)


def _materialize(r: dict) -> str:
    """Blocks a run only added capture kinds to are said apart: their images were
    regenerated and checked against the stored ones, not generated anew."""
    regenerated = r.get("regenerated_and_checked", 0)
    added = (f", {regenerated} regenerated and checked to add capture kinds to "
             f"{r['blocks_added_to']} stored blocks" if r.get("blocks_added_to") else "")
    lines = [f"{r['store']}: {r['model']}: {r['images'] - regenerated} images generated in "
             f"{r['blocks_written']} blocks{added} ({r['blocks_skipped']} blocks already "
             f"stored), {r['bytes'] / 1e6:.1f} MB written in {r['seconds']:.1f} s"]
    if r.get("grid_png"):
        lines.append(f"sample grid: {r['grid_png']}")
    if r.get("status"):
        lines.append(r["status"])
    return "\n".join(lines)


def _verify(r: dict) -> str:
    return "\n".join([f"{r['store']}: {r['counted']} reproduced ({r['comparison']})", "",
                      r["table"]])


def _label(r: dict) -> str:
    per_target = [r] if "target" in r else list(r.values())
    lines = []
    for t in per_target:
        x0 = "" if t["x0"] else f"; no x0 labels ({t['x0_note']})" if t.get("x0_note") \
            else "; no x0 labels"
        lines.append(f"{t['store']}: labels '{t['target']}' ({t['kind']}, {t['provider']})"
                     f"{' replaced' if t['replaced'] else ''}: {t['images']} images at "
                     f"{', '.join(t['resolutions'])}{x0}")
    return "\n".join(lines)


def _probe(r: dict) -> str:
    lines = [f"{r['store']}: probe run {r['run_id']} ('{r['target']}')"]
    if r.get("table"):
        lines += ["", r["table"]]
    return "\n".join(lines + _files("figures", r.get("figures")))


def _intervene(r: dict) -> str:
    done = [f"{r['blocks_complete']}/{r['blocks']} blocks"] if "blocks" in r else []
    state = "complete" if r["complete"] else "incomplete"
    if not r["complete"]:
        done.append("rerun the command to resume")
    state += f" ({'; '.join(done)})" if done else ""
    by = f" by {r['workers']} workers" if r.get("workers") else ""
    lines = [f"{r['store']}: intervention experiment {r['experiment_id']} {state}: "
             f"{r['blocks_written']} blocks written{by}, {r['blocks_skipped']} already stored"]
    if r.get("table"):
        lines += ["", r["table"]]
    if r.get("figure"):
        lines.append(f"figure: {r['figure']}")
    return "\n".join(lines)


def _sweep(r: dict) -> str:
    by = f" (cells run by {r['workers']} workers)" if r.get("workers") else ""
    lines = [f"{r['store']}: sweeps "
             + ", ".join(rec["sweep_id"] for rec in r["targets"].values()) + by, "",
             r["table"]]
    return "\n".join(lines + _files("figures", r.get("figures")))


def _main(r: dict) -> str:
    lines = [r["note"]] if r.get("note") else []
    if r.get("table"):
        lines += [r["table"], ""]
    return "\n".join(lines + _files("files written", r.get("files")))


def _files(title: str, paths) -> list[str]:
    if not paths:
        return []
    return [f"{title}:", *(f"  {p}" for p in paths)]


def main_job_files(result: dict, out: str) -> list[str]:
    """Everything the main job wrote, store first; summary files only if they exist."""
    names = ("summary.txt", "summary.json", "naming.json", "causal.json", "report.html")
    extra = [str(Path(out, name)) for name in names if Path(out, name).is_file()]
    report = [result["report"]] if result.get("report") else []
    return list(dict.fromkeys([result["store"], *report, *result.get("figures", []), *extra]))


def _show(r: dict) -> str:
    split = ", ".join(f"{n} {s}" for s, n in sorted(r["split"].items()))
    steps = f", {r['steps']} steps" if r["steps"] else ""
    lines = [f"{r['store']}: {r['images']} images ({split}){steps}, blocks of "
             f"{r['block_size']}", "models:" if r["models"] else
             "models: none yet (actstore materialize)"]
    for name, m in r["models"].items():
        pending = f", adding {', '.join(m['pending_kinds'])}" if m["pending_kinds"] else ""
        lines.append(f"  {name:<12} {m['complete_images']}/{r['images']} images, kinds "
                     f"{', '.join(m['kinds'])} ({m['points']} points{pending}), guidance "
                     f"{m['guidance']}")
    lines.append("labels:" if r["labels"] else "labels: none (actstore label)")
    for t, a in r["labels"].items():
        lines.append(f"  {t:<12} {a['kind']:<10} {a['version'] or '-'}  {a['provider']}")
    lines.append("probe runs:" if r["probe_runs"] else "probe runs: none (actstore probe)")
    for p in r["probe_runs"]:
        lines.append(f"  {p['id']}  {_n(len(p['models']), 'model')} x {_n(p['layers'], 'point')}"
                     f" x {_n(p['steps'], 'step')}, labels {p['label_version'] or '-'}, "
                     f"{p['created']}")
    lines.append("experiments:" if r["experiments"] else "experiments: none")
    for e in r["experiments"]:
        role = f", {e['role']}" if e["role"] else ""
        lines.append(f"  {e['id']}  {e['method']}, {_n(e['interventions'], 'intervention')} "
                     f"on {_n(e['images'], 'image')}, probe run {e['probe_run']}{role}")
    lines.append("sweeps:" if r["sweeps"] else "sweeps: none")
    for w in r["sweeps"]:
        c = w["chosen"]
        chosen = "nothing chosen" if not c else (
            f"chosen {c['kind']} x{len(c['layers'])} steps {c['steps'][0]}-{c['steps'][-1]} "
            f"s={c['strength']:g} ({c['experiment_id']})")
        lines.append(f"  {w['id']}  {w['cells']} cells, {chosen}")
    return "\n".join(lines)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


_SUMMARIES = {"materialize": _materialize, "verify": _verify, "label": _label, "probe": _probe,
              "intervene": _intervene, "sweep": _sweep, "main": _main, "show": _show}
