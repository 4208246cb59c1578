"""Progress for long work: images, denoising steps, MB/s written, ETA (tqdm does the ETA)."""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Callable

from tqdm.auto import tqdm


class Progress:
    """Counts image-steps; shows images done and the store's write rate alongside.
    ``unit`` names what one count is where it is not an image-step (a probe run counts
    model layers, each fitted over every step at once)."""

    def __init__(self, n_images: int, n_steps: int, desc: str, enabled: bool = True,
                 unit: str = "img-step", relay: Callable[[int, int, int], None] | None = None):
        self.n_steps = n_steps
        self.n_images = n_images
        self.images_done = 0
        self.bytes = 0
        self.t0 = time.perf_counter()
        self.relay = relay      # (steps, images, bytes) to a bar elsewhere (relayed)
        self.bar = tqdm(total=n_images * n_steps, desc=desc, unit=unit,
                        disable=not enabled or quiet(), file=sys.stderr, dynamic_ncols=True)

    def step(self, n_images: int) -> None:
        self.bar.update(n_images)
        if self.relay is not None:
            self.relay(n_images, 0, 0)

    def images(self, n: int, nbytes: int) -> None:
        if self.relay is not None:
            self.relay(0, n, nbytes)
        self.images_done += n
        self.bytes += nbytes
        rate = self.bytes / max(time.perf_counter() - self.t0, 1e-9) / 1e6
        self.bar.set_postfix_str(f"images {self.images_done}/{self.n_images}, {rate:.1f} MB/s")

    def close(self) -> None:
        self.bar.close()

    @property
    def mb_per_s(self) -> float:
        return self.bytes / max(time.perf_counter() - self.t0, 1e-9) / 1e6


def quiet() -> bool:
    """``TQDM_DISABLE=1`` (``actstore --quiet`` sets it) silences every bar, including those
    of flows, which are not passed a ``progress`` argument."""
    return os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


def relayed(topic: str, what: str, every: float = 0.5) -> Callable[[int, int, int], None]:
    """For a task on a Dask worker: its progress, summed and sent to the scheduler's
    event log under ``topic`` (named ``what``) at most every ``every`` seconds, for the
    command's bar (:class:`RelayedBar`). Without it a fan-out's bar moved only when a whole
    task ended: a soak run's materialize regions left it still for a minute, and a region
    of SD images would take hours; label's and intervene's block groups left it at 0% for
    2 min 24 s and 83 s (2026-12-06)."""
    from distributed import get_worker

    worker, held, last = get_worker(), [0, 0, 0], [time.monotonic()]

    def send(steps: int, images: int, nbytes: int) -> None:
        held[0] += steps
        held[1] += images
        held[2] += nbytes
        if time.monotonic() - last[0] >= every:
            worker.log_event(topic, {"what": what, "counts": list(held)})
            held[:] = [0, 0, 0]
            last[0] = time.monotonic()
    return send


def progress_topic(progress: bool) -> str | None:
    """A fan-out's own event topic for :func:`relayed`, unique so that two commands on one
    scheduler never count each other's work; None where no bar is shown."""
    return f"actstore-progress-{uuid.uuid4().hex}" if progress and not quiet() else None


def relaying(topic: str | None, what: str) -> Progress | None:
    """A silent bar for a task on a Dask worker that only relays its counts as ``what``
    (:func:`relayed`); None without a topic (no bar, or not on a worker)."""
    return Progress(0, 1, "", enabled=False, relay=relayed(topic, what)) if topic else None


class RelayedBar:
    """The command's side of :func:`relayed`: counts its tasks send while they run, and
    at each task's end (:meth:`finish`) what it did beyond them, never twice. Without a
    ``client`` (no topic, no Dask) it counts each task only as it ends."""

    def __init__(self, bar: Progress, client, topic: str | None):
        import threading

        self.bar, self.client, self.topic = bar, client, topic
        self.seen: dict[str, list[int]] = {}
        self.ended: set[str] = set()
        self.lock = threading.Lock()
        if client is not None:
            client.subscribe_topic(topic, self._event)

    def _event(self, event) -> None:
        msg = event[1] if isinstance(event, tuple) else event
        with self.lock:
            if msg["what"] in self.ended:
                return
            steps, images, nbytes = msg["counts"]
            seen = self.seen.setdefault(msg["what"], [0, 0, 0])
            for i, n in enumerate((steps, images, nbytes)):
                seen[i] += n
        self.bar.step(steps)
        if images:
            self.bar.images(images, nbytes)

    def finish(self, what: str, steps: int, images: int, nbytes: int) -> None:
        with self.lock:
            self.ended.add(what)
            seen = self.seen.pop(what, [0, 0, 0])
        # exact, also after a retry relayed part of a task twice (a negative update)
        self.bar.step(steps - seen[0])
        if images != seen[1] or nbytes != seen[2]:
            self.bar.images(images - seen[1], nbytes - seen[2])

    def close(self) -> None:
        if self.client is None:
            return
        try:
            self.client.unsubscribe_topic(self.topic)
        except Exception:  # noqa: BLE001 - a client gone with its scheduler
            pass
