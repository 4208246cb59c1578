"""The process a command runs in: quiet third-party chatter, per-command environment, and
the object store's options — set before any library loads a model or opens a store."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from actstore.errors import ActstoreError
from actstore.runtime import stopped_by_signal

if TYPE_CHECKING:
    from actstore.catalog import Catalog


def quiet_libraries() -> None:
    """diffusers/transformers chatter (load bars, deprecation notes) hides actstore's output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Local workers killed after Ctrl-C leave their queues' semaphores to multiprocessing's
    # resource tracker (a child process, so told by environment), which frees them and
    # says so on stderr after the command's last line.
    tracker = "ignore:resource_tracker:UserWarning"
    if tracker not in os.environ.get("PYTHONWARNINGS", ""):
        os.environ["PYTHONWARNINGS"] = ",".join(
            w for w in (os.environ.get("PYTHONWARNINGS"), tracker) if w)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    _quiet_imported_libraries()
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    # a local Dask cluster's HTTP server takes another port when 8787 is taken: no news
    warnings.filterwarnings("ignore", message="Port 8787 is already in use")


def _quiet_imported_libraries() -> None:
    """The variables above reach a library only if it is imported after them; a caller
    that runs :func:`main` in its own process (a notebook, a test) may have imported it
    already. With diffusers imported first, huggingface_hub had read its variable unset,
    transformers (imported later by the model load) took its bar setting from it, and an
    in-process `materialize --quiet` printed transformers' "Loading weights" bar for the
    text encoder (2026-12-06). Importing them here instead would cost every command 2-4 s."""
    if "huggingface_hub.constants" in sys.modules and \
            sys.modules["huggingface_hub.constants"].HF_HUB_DISABLE_PROGRESS_BARS is None:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()       # also what transformers reads when imported later
    for name in ("transformers", "diffusers"):
        if name in sys.modules:
            library = sys.modules[name].utils.logging
            library.disable_progress_bar()
            if os.environ.get(f"{name.upper()}_VERBOSITY") == "error":   # a user's own level stays
                library.set_verbosity_error()


@contextmanager
def command_environment(args: argparse.Namespace) -> Iterator[None]:
    """Process settings for this command only (restored after, for callers in-process)."""
    values = {"TQDM_DISABLE": "1" if args.quiet else None,
              "ACTSTORE_THREADS": str(args.threads) if args.threads else None}
    saved = {k: os.environ.get(k) for k, v in values.items() if v is not None}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Interrupt:
    """Whether Ctrl-C has been pressed (or SIGTERM sent) during the command
    (``one_interrupt``'s answer), and which of the two came first."""
    pressed: bool = False
    signum: int = signal.SIGINT

    def error(self) -> KeyboardInterrupt:
        """What the interrupt raises, and what the command reports whatever a library made
        of it: Terminated for SIGTERM (exit 143), KeyboardInterrupt for Ctrl-C (130)."""
        return Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()

    def reported(self, exc: BaseException) -> BaseException:
        """What the command reports for ``exc``: the interrupt, if one arrived, whatever a
        library made of it; a SIGTERM that arrived during a Prefect flow, which went to the
        flow engine's own handler instead of ours (:func:`stopped_by_signal`), as SIGTERM;
        else ``exc``."""
        if self.pressed:
            return self.error()
        if not isinstance(exc, KeyboardInterrupt) and stopped_by_signal(exc):
            return Terminated()
        return exc


class Terminated(KeyboardInterrupt):
    """The command was stopped by SIGTERM (``kill``, ``timeout``, a batch scheduler's
    cancel, ``docker stop``): stopped as a Ctrl-C is, said and exited (143) as SIGTERM."""


@contextmanager
def one_interrupt(keep_ignoring: bool = True) -> Iterator[Interrupt]:
    """Ctrl-C stops the command once: the first raises KeyboardInterrupt, and every later
    one is ignored, so the clean-up it started always completes: local workers killed and
    waited for, the temporary Prefect server stopped, one line, exit 130.

    Users press Ctrl-C twice, and a terminal sends each press to the whole process group.
    Raised again in the middle of that clean-up, KeyboardInterrupt cut it short: pressed
    every 0.1 s, materialize died of SIGINT instead of exiting 130 in 9 runs of 9, and with
    --workers 2 left its workers to Dask's exit-time reaper and printed tracebacks after its
    one line (2026-12-05). The handler ignores every signal after the first itself, as well
    as setting SIG_IGN: Prefect's flow engine puts back the SIGTERM handler it found when a
    flow ends, which undid the SIG_IGN (2026-12-07).

    With ``keep_ignoring`` (the console command, which exits next) later signals stay
    ignored after an interrupt until the process exits (Python keeps SIG_IGN through its
    own shutdown); otherwise, and always without an interrupt, the caller's handlers are
    back on leaving, so a script or notebook that runs commands in its own process can
    still be stopped. A caller that ignores or handles SIGINT itself (or a thread other
    than the main one) is left alone.

    The answer's ``pressed`` says an interrupt arrived even when a library turned the
    KeyboardInterrupt into an error of its own: pydantic-core raises it as a
    ``PydanticSerializationError`` with no cause, so a press landing in Prefect's
    serialization ended the command with 'unexpected error', exit 1 (1 run of ~10 of
    ``--workers 2`` pressed every 0.1 s, 2026-12-05)."""
    answer = Interrupt()
    main = threading.current_thread() is threading.main_thread()
    # SIGTERM too, where nobody handles it, and whatever SIGINT's handler is (a command
    # started in the background by a script, as batch jobs are, ignores SIGINT): by default
    # it killed the command at once, with no line, exit 143 (2026-12-07); now it is stopped
    # the way a Ctrl-C stops it.
    ours = [sig for sig, default in ((signal.SIGINT, signal.default_int_handler),
                                     (signal.SIGTERM, signal.SIG_DFL))
            if main and signal.getsignal(sig) == default]
    found = {sig: signal.getsignal(sig) for sig in ours}

    def first(signum: int, frame: object) -> None:
        if answer.pressed:          # put back by someone else after the first
            return
        for sig in ours:
            signal.signal(sig, signal.SIG_IGN)
        answer.pressed, answer.signum = True, signum
        raise answer.error()
    for sig in ours:
        signal.signal(sig, first)
    try:
        yield answer
    finally:
        for sig in ours:
            signal.signal(sig, signal.SIG_IGN if answer.pressed and keep_ignoring
                          else found[sig])


def use_storage_options(args: argparse.Namespace, catalog: Catalog | None) -> None:
    """Options for the command's object store, for this process and the workers it starts;
    the text is never echoed (it may hold a secret)."""
    from actstore.catalog import resolve_store
    from actstore.store import io
    from actstore.store.access import OBJECT_STORES

    text = args.storage_options
    if text.startswith("@"):
        try:
            text = Path(text[1:]).expanduser().read_text()
        except OSError as exc:
            raise ActstoreError(f"--storage-options {args.storage_options}: can't read it "
                                f"({exc.strerror})") from None
    try:
        options = json.loads(text)
    except ValueError as exc:
        raise ActstoreError(f"--storage-options: not valid JSON (line {exc.lineno} column "
                            f"{exc.colno}); give an object such as '{{\"anon\": false}}'") from None
    if not isinstance(options, dict):
        raise ActstoreError("--storage-options: give a JSON object of fsspec options, e.g. "
                            "'{\"client_kwargs\": {\"endpoint_url\": \"http://HOST:9000\"}}'")
    store = getattr(args, "store", None)
    uri = resolve_store(catalog, store)["uri"] if store else ""
    if io.protocol_of(uri) not in OBJECT_STORES:
        raise ActstoreError(f"--storage-options: they configure an object store, and "
                            f"{args.command} {'--store ' + uri if uri else ''} uses none; drop "
                            "them")
    io.set_protocol_options(io.protocol_of(uri), options)
