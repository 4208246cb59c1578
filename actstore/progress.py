"""Progress for long work: images, denoising steps, MB/s written, ETA (tqdm does the ETA)."""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm


class Progress:
    """Counts image-steps; shows images done and the store's write rate alongside.
    ``unit`` names what one count is where it is not an image-step (a probe run counts
    model layers, each fitted over every step at once)."""

    def __init__(self, n_images: int, n_steps: int, desc: str, enabled: bool = True,
                 unit: str = "img-step"):
        self.n_steps = n_steps
        self.n_images = n_images
        self.images_done = 0
        self.bytes = 0
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=n_images * n_steps, desc=desc, unit=unit,
                        disable=not enabled or quiet(), file=sys.stderr, dynamic_ncols=True)

    def step(self, n_images: int) -> None:
        self.bar.update(n_images)

    def images(self, n: int, nbytes: int) -> None:
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
