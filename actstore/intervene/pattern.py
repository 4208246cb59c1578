"""A probe's activation pattern: the direction activations take when the probe's reading
changes in the model's own images, for edits the rest of the network may respond to.

A linear probe ŷ = a·w + b is a *filter*: w is fitted to cancel channels that carry
noise, so the minimal-norm edit along w moves an activation in a direction natural
variation seldom takes. The matching *pattern* (Haufe et al. 2014, "On the interpretation
of weight vectors of linear models in multivariate neuroimaging", NeuroImage 87) is

    p = Cov(a, ŷ) / Var(ŷ) = Σw / (wᵀΣw),   Σ the activations' covariance,

the change in a that comes with a unit change of ŷ. Since wᵀp = 1, the edit s·(t − z)·p
gives the probe the same reading z + s·(t − z) as the minimal-norm edit, but moves the
activation as natural variation of the target does. It is at least as long
(‖p‖·‖w‖ ≥ wᵀp = 1, Cauchy-Schwarz), so the equal-size random control and the sweep's
edit-size cap keep the comparison fair.

Σ is the token covariance of the stored activations of the model variant's train images
(the conditional half, as the probes were fitted), per (capture point, step), each token
one sample: p comes from the data w was fitted on, never from the images edited. No C×C
matrix is formed: Cov(a, ŷ) and Var(ŷ) are sums over tokens, one pass over the arrays.
The plan computes it (a few seconds for a toy store, more for large ones) and the
experiment's record names the images and a digest of the vectors, so a rerun that would
edit along other vectors is another experiment, never a resumed one.
"""

from __future__ import annotations

import hashlib

import numpy as np

from actstore.errors import ActstoreError
from actstore.probe.upcast import row_chunks, upcast
from actstore.store import io
from actstore.store.layout import layer_path
from actstore.store.view import StoreView


def train_positions(view: StoreView) -> np.ndarray:
    """Store positions of the train images, all of which must be materialized (the probes
    were fitted on every one of them)."""
    split = np.asarray(view.images["split"].values).astype(str)
    positions = np.asarray(view.images["position"].values)[split == "train"]
    if positions.size == 0:
        raise ActstoreError(f"store {view.uri}: no train images, so no activation pattern; "
                            "use --direction probe")
    if not view.complete[positions].all():
        raise ActstoreError(f"store {view.uri}: model {view.model!r} has train images not "
                            "materialized; finish `actstore materialize` first")
    return positions


def _sums(x: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    """(C + C + 3,) sums over the tokens x (N, C): Σa, Σaŷ, N, Σŷ, Σŷ²."""
    y = x @ np.asarray(w, np.float64) + float(b)
    return np.concatenate([x.sum(0), y @ x, [len(y), y.sum(), y @ y]])


def _finish(sums: np.ndarray) -> np.ndarray:
    """Per row of (S, 2C + 3) sums: the pattern (S, C)."""
    c = (sums.shape[-1] - 3) // 2
    n, sy, syy = sums[:, 2 * c], sums[:, 2 * c + 1], sums[:, 2 * c + 2]
    mean_a, mean_y = sums[:, :c] / n[:, None], sy / n
    cov = sums[:, c:2 * c] / n[:, None] - mean_a * mean_y[:, None]
    var = syy / n - mean_y ** 2
    if (var <= 0).any():
        raise ActstoreError("a probe reads the same value on every train token, so it has no "
                            "activation pattern; use --direction probe")
    return cov / var[:, None]


def layer_patterns(view: StoreView, layer: str, probe: dict, steps: list[int],
                   positions: np.ndarray) -> np.ndarray:
    """(len(steps), C) float64 patterns of one capture point, read in bounded chunks."""
    arr = io.open_array(view.uri, layer_path(view.model, layer))
    index = [probe["steps"].index(s) for s in steps]
    w = np.asarray(probe["weights"], np.float64)[index]
    b = np.asarray(probe["bias"], np.float64)[index]
    per_image = int(np.prod(arr.shape[1:])) * 4
    sums = np.zeros((len(steps), 2 * arr.shape[-1] + 3))
    for rows in row_chunks(len(positions), per_image):
        x = upcast(arr.get_orthogonal_selection((positions[rows], np.asarray(steps))))
        x = x.transpose(1, 0, 2, 3, 4).reshape(len(steps), -1, arr.shape[-1])
        for j in range(len(steps)):
            sums[j] += _sums(x[j].astype(np.float64), w[j], b[j])
    return _finish(sums)


def patterns(view: StoreView, probes: dict[str, dict], steps: list[int]
             ) -> tuple[dict[str, dict[int, np.ndarray]], dict]:
    """Per layer, per step, the float32 pattern to edit along, and what the record keeps
    of it: the train images it came from and a sha256 of the vectors."""
    positions = train_positions(view)
    out: dict[str, dict[int, np.ndarray]] = {}
    digest = hashlib.sha256()
    for layer, probe in probes.items():
        p = layer_patterns(view, layer, probe, steps, positions).astype(np.float32)
        out[layer] = {s: p[j] for j, s in enumerate(steps)}
        digest.update(layer.encode() + b"\x00" + np.ascontiguousarray(p).tobytes())
    ids = [str(v) for v in view.images["image"].values[np.isin(
        view.images["position"].values, positions)]]
    record = {"images": "train", "n_images": len(ids),
              "images_sha256": hashlib.sha256("\x00".join(ids).encode()).hexdigest(),
              "sha256": digest.hexdigest()}
    return out, record
