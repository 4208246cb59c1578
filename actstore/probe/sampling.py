"""A class-balanced sample of a layer's train tokens, drawn in the same pass as its statistics.

Ridge needs only second moments, but a logistic probe needs its tokens: reading a cell's
tokens again for every step would read the store once per step. Instead every block task
of the one fit pass keeps a sample of its train tokens (the same tokens at every step, as
stored, float16) beside the statistics, and the samples are concatenated like the
statistics are summed. Each token is kept with its class's rate r, the rates set so that
about ``budget`` tokens are kept, half of each class where both have enough, and weighs
1/r, so a weighted fit on the sample estimates the fit on all tokens without bias
(:mod:`actstore.probe.logistic`); a layer with no more than ``budget`` train tokens is
kept whole and fitted exactly.

Which tokens are kept depends only on (image index, token position), through a hash, not
on block boundaries or worker: a run on a cluster keeps the tokens an in-process run keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from actstore.probe.stats import splitmix64

SAMPLE_MIN_TOKENS = 10_000      # 10k-token fits matched all-token fits: benchmarks/README.md
SAMPLE_TOKENS_PER_CHANNEL = 20  # wider layers need more tokens per cell
_SALT = np.uint64(0x5DEECE66D)  # another stream than the fold hash's


def budget(channels: int) -> int:
    """Tokens kept per layer: enough for a C-channel logistic probe."""
    return max(SAMPLE_MIN_TOKENS, SAMPLE_TOKENS_PER_CHANNEL * channels)


def class_rates(labels: np.ndarray, n_tokens: int) -> np.ndarray:
    """Keep rate of class 0 and class 1 (labels in {0, 1}, every train token) for a sample
    of about ``n_tokens``: each class gets half, a class with fewer gets all of its tokens
    and the other class the rest."""
    counts = np.array([(labels < 0.5).sum(), (labels >= 0.5).sum()], np.float64)
    want = np.full(2, n_tokens / 2)
    small = int(np.argmin(counts))
    if counts[small] < want[small]:
        want = np.where(np.arange(2) == small, counts[small], n_tokens - counts[small])
    return np.divide(np.minimum(want, counts), counts, out=np.zeros(2), where=counts > 0)


def unit_hash(image: np.ndarray, position: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per (image index, token position)."""
    key = (image.astype(np.uint64) << np.uint64(32)) | position.astype(np.uint64)
    return (splitmix64(key ^ _SALT) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class TokenSample:
    """Sampled tokens of every step: x (step, token, C) as stored, y (token,) in {0, 1},
    image (token,) store index, weight (token,) 1/rate. ``+`` concatenates."""

    x: np.ndarray
    y: np.ndarray
    image: np.ndarray
    weight: np.ndarray

    def __add__(self, o: "TokenSample | int") -> "TokenSample":
        if isinstance(o, int) and o == 0:
            return self
        return TokenSample.concat([self, o])

    __radd__ = __add__

    @staticmethod
    def concat(parts: "list[TokenSample]") -> "TokenSample":
        """Several samples in one copy (pairwise ``+`` would copy the first ones again at
        every level of a reduction tree)."""
        return TokenSample(np.concatenate([p.x for p in parts], axis=1),
                           np.concatenate([p.y for p in parts]),
                           np.concatenate([p.image for p in parts]),
                           np.concatenate([p.weight for p in parts]))

    def step(self, k: int, stop: int | None = None) -> "TokenSample":
        """Step ``k`` alone (x (1, token, C)), or steps k to ``stop``: what one logistic
        task needs to receive."""
        return TokenSample(self.x[k:k + 1 if stop is None else stop], self.y, self.image,
                           self.weight)


def draw(x: np.ndarray, y: np.ndarray, image: np.ndarray, position: np.ndarray,
         rates: np.ndarray) -> TokenSample:
    """The sample of one block: ``x`` (step, token, C), ``y``/``image``/``position`` per
    token, ``rates`` from :func:`class_rates`."""
    r = rates[(y >= 0.5).astype(int)]
    keep = unit_hash(image, position) < r
    return TokenSample(x[:, keep], y[keep].astype(np.float64), image[keep], 1.0 / r[keep])
