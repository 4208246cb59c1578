"""float16 activations to float32 work arrays, in bounded pieces.

numpy has no fast float16 matmul, so every product on stored activations is made on an
upcast copy; these helpers keep that copy small (:data:`CHUNK_BYTES` per piece), make the
conversion through torch (its F16C path is ~10x numpy's ``astype``) and reuse one buffer per
thread for copies made and dropped at once.
"""

from __future__ import annotations

import threading
from math import prod
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

CHUNK_BYTES = 64 << 20      # bound on the float32 copy of X made per block
PIECE_BYTES = 512 << 10     # a piece of that copy worked on while it is in cache (L2)


def row_chunks(n: int, row_bytes: int) -> list[slice]:
    """Row slices of an n-row array whose float32 copies stay within :data:`CHUNK_BYTES`."""
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)] or [slice(0, 0)]


_SCRATCH = threading.local()


def scratch_buffer(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """This thread's reusable buffer for a transient upcast (at most :data:`CHUNK_BYTES`,
    the chunks' bound): writing a fresh 32 MB array costs its page faults too, 2.5x the
    conversion itself (a 16 MB float16 block: 11 vs 4.5 CPU ms)."""
    import torch
    size, key = prod(shape), np.dtype(dtype).str
    buf = getattr(_SCRATCH, key, None)
    if buf is None or buf.size < size:
        # torch's allocation, not numpy's: numpy asks for transparent huge pages on large
        # arrays, whose first touch took 20-400 ms for 59 MB on the 2026-12-05 benchmark
        # machine (torch's 4 kB pages: 31-39 ms), and a buffer is touched first once
        buf = torch.empty(size, dtype=torch.from_numpy(np.empty(0, dtype)).dtype).numpy()
        setattr(_SCRATCH, key, buf)
    return buf[:size].reshape(shape)


def upcast(X: np.ndarray, dtype: type = np.float32, scratch: bool = False) -> np.ndarray:
    """Upcast for the products. float16 goes through torch, whose F16C conversion is ~10x
    numpy's astype; with numpy, converting would cost more than a narrow layer's XᵀX. With
    ``scratch`` a converted copy goes to this thread's buffer, valid until the next scratch
    upcast: for products made and dropped at once."""
    out_type = np.result_type(X.dtype, dtype)
    if scratch and out_type != X.dtype and X.size * out_type.itemsize <= CHUNK_BYTES:
        out = scratch_buffer(X.shape, out_type)
        copy_into(out, X)
        return out
    if X.dtype == np.float16:
        import torch
        X = as_tensor(X).float().numpy()
    return X.astype(out_type, copy=False)


def copy_into(out: np.ndarray, X: np.ndarray) -> None:
    """out[...] = X, float16 converted by torch (see :func:`upcast`)."""
    if X.dtype == np.float16 and out.dtype != np.float16:
        import torch
        torch.from_numpy(out).copy_(as_tensor(X))
    else:
        np.copyto(out, X, casting="safe")


def as_tensor(X: np.ndarray) -> torch.Tensor:
    """A torch view of X, any strides (a fold-ordered copy of a chunk, made by numpy's
    fancy indexing, is not C-ordered: torch converts it as it is, no float16 copy first)."""
    import torch
    return torch.from_numpy(np.require(X, requirements=["W"]))
