"""The ridge fit's Gram products XᵀX in float32 (numpy ``syrk``) against exact int8 products
on the AMX units (``torch._int_mm``) of 16-bit fixed-point tokens, at the fit's real shapes.

A fit task holds about :data:`actstore.probe.grid.FIT_TASK_BYTES` of float16 tokens (whole
store blocks of ``--block-size`` images); its fold statistics take one float32 copy in fold
order, centred (``stats._centred_copy``), and one Gram product per fold slice. The int8
route, per column j: q = round(x / s_j) with s_j a power of two such that |q| ≤ :data:`QMAX`,
split q = 256·h + l into signed bytes (h = (q + 128) >> 8, l = q − 256·h ∈ [−128, 127]), and
QᵀQ = 65536·HᵀH + 256·(HᵀL + LᵀH) + LᵀL from three int8 products with int32 sums (exact
for up to 2³¹ / 128² = 131 072 tokens), scaled back by s_i·s_j. Timed, one thread, CPU
time (``time.process_time``), best of ``--repeats``:

* ``float32``: the library's product per fold slice (what the fit does today);
* ``int8, fold slices``: the route above per fold slice, and each of its stages alone;
* ``int8, [H|L]``: one product of the side-by-side bytes (4 products' work, no transpose);
* ``int8, 512 kB pieces``: products per piece while it is in cache (the pieces of
  ``_centred_copy``), int32 sums per fold, the scales assumed known beforehand.

Then the error of each route against float64 sums of the same float32 copy, relative to
√(G_ii·G_jj), on data with a heavy-tailed column (one token 100× the rest) and a column of
tiny values, beside the bound derived for the int8 route and beside what float16 storage
rounding does to the Gram of the same tokens (the script stops if the bound is broken).
Last, a planted ridge problem fitted (``fit_ridge_cv``) from the library's fold statistics
with each fold's Gram product made by each route: the λ chosen and the weights' change.

    python benchmarks/bench_gram_int8.py --repeats 7
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import replace

import numpy as np
import torch

from actstore.probe.grid import FIT_TASK_BYTES
from actstore.probe.solvers import fit_ridge_cv
from actstore.probe.stats import _centred_copy, fold_of, stats_by_fold
from actstore.probe.upcast import PIECE_BYTES

FIXED_POINT_BITS = 16              # q's width: two int8 planes
QMAX = 2 ** (FIXED_POINT_BITS - 1) - 129   # 32 639: q + 128 stays an int16, so h fits int8
MAGIC = 1.5 * 2 ** 23 + 128        # x/s + MAGIC in float32 rounds x/s to an integer, + 128
SHAPES = {"64x64x320": (64 * 64, 320), "32x32x640": (32 * 32, 640),
          "16x16x1280": (16 * 16, 1280), "8x8x1280": (8 * 8, 1280)}


def task_tokens(tokens: int, channels: int, block: int, n_folds: int, seed: int = 0):
    """One fit task's tokens (whole blocks up to FIT_TASK_BYTES), float64 and as stored
    (float16): heavy-tailed in column 0 (one token 100× the column's scale), tiny in
    column 1, with channel means; and each token's fold by its image's hash, as the fit
    assigns them."""
    per_block = block * tokens * channels * 2
    images = block * max(1, FIT_TASK_BYTES // per_block)
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(images * tokens, channels)) * rng.uniform(0.2, 3, channels)
    X += rng.normal(0, 2, channels)
    X[:, 0] = rng.normal(0, 1, len(X))
    X[len(X) // 3, 0] = 100.0
    X[:, 1] *= 1e-3
    fold = fold_of(np.repeat(np.arange(images), tokens), n_folds)
    return X, X.astype(np.float16), fold


def fold_slices(X: np.ndarray, fold: np.ndarray, n_folds: int):
    """The library's centred float32 copy in fold order and each fold's slice of it
    (empty for a fold without tokens), the order and the centre."""
    bounds = np.r_[0, np.cumsum(np.bincount(fold, minlength=n_folds))]
    order = np.argsort(fold, kind="stable")
    R = np.zeros((len(X), 1), np.float32)
    Xf, _, _, c = _centred_copy(X, np.ones(len(X)), fold, bounds, R[order], False)
    return Xf, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])], order, c


def inverse_scales(x: np.ndarray) -> np.ndarray:
    """1/s_j, a power of two: the largest with max_t |x_tj| / s_j ≤ QMAX (exact scaling)."""
    m = np.maximum(x.max(0), -x.min(0)).astype(np.float64)
    return np.exp2(np.floor(np.log2(QMAX / np.maximum(m, 1e-30)))).astype(np.float32)


def split(x: np.ndarray, inv: np.ndarray, y: torch.Tensor, h: torch.Tensor, l: torch.Tensor):
    """h, l int8 with round(x·inv) = 256·h + l: x·inv + MAGIC rounds in float32 (ties to
    even), its low 16 bits are then q + 128, whose high byte is h and whose low byte,
    read as unsigned less 128, is l (``xor 0x80`` read as signed)."""
    torch.addcmul(torch.tensor(MAGIC), torch.from_numpy(x), torch.from_numpy(inv), out=y)
    b = y.view(torch.int8).view(*x.shape, 4)
    h.copy_(b[..., 1])
    torch.bitwise_xor(b[..., 0], -128, out=l)


def combine(hh: torch.Tensor, hl: torch.Tensor, ll: torch.Tensor, inv: np.ndarray) -> np.ndarray:
    """QᵀQ from its three int8 products, scaled back by s_i·s_j, float32 as the library's."""
    g = torch.mul(hh, 65536.0)
    g.add_(hl, alpha=256).add_(hl.T, alpha=256).add_(ll)
    s = torch.from_numpy(1 / inv)
    return g.mul_(s[:, None]).mul_(s[None, :]).numpy()


_BUFFERS = threading.local()


def buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """This thread's reused work array (fresh pages cost their first touch, as in
    ``upcast.scratch_buffer``; one per thread, as fit tasks run side by side)."""
    key, n = f"{name}_{dtype}".replace(".", "_"), int(np.prod(shape))
    b = getattr(_BUFFERS, key, None)
    if b is None or b.numel() < n:
        b = torch.empty(n, dtype=dtype)
        setattr(_BUFFERS, key, b)
    return b[:n].view(shape)


def gram_int8(x: np.ndarray, inv: np.ndarray | None = None) -> np.ndarray:
    """xᵀx (float32 tokens × channels) by the int8 route, on this thread's work arrays."""
    inv = inverse_scales(x) if inv is None else inv
    y = buffer("y", x.shape, torch.float32)
    h, l = buffer("h", x.shape, torch.int8), buffer("l", x.shape, torch.int8)
    split(x, inv, y, h, l)
    C = x.shape[1]
    hh, hl, ll = (buffer(k, (C, C), torch.int32) for k in ("hh", "hl", "ll"))
    torch._int_mm(h.T, h, out=hh), torch._int_mm(h.T, l, out=hl), torch._int_mm(l.T, l, out=ll)
    return combine(hh, hl, ll, inv)


def gram_int8_concat(x: np.ndarray) -> np.ndarray:
    """The same from one product of [H|L]: HᵀL and LᵀH both made, none transposed."""
    inv, C = inverse_scales(x), x.shape[1]
    y, v = buffer("y", x.shape, torch.float32), buffer("v", (len(x), 2 * C), torch.int8)
    split(x, inv, y, v[:, :C], v[:, C:])
    m = torch._int_mm(v.T, v)
    g = torch.mul(m[:C, :C], 65536.0)
    g.add_(m[:C, C:], alpha=256).add_(m[C:, :C], alpha=256).add_(m[C:, C:])
    s = torch.from_numpy(1 / inv)
    return g.mul_(s[:, None]).mul_(s[None, :]).numpy()


def gram_int8_pieces(x: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """The same made piece by piece (PIECE_BYTES of float32), int32 sums across pieces:
    the products a fused ``_centred_copy`` would make, given the scales beforehand."""
    rows, C = max(8, PIECE_BYTES // (4 * x.shape[1])), x.shape[1]
    y = torch.empty((rows, C), dtype=torch.float32)
    h, l = torch.empty((rows, C), dtype=torch.int8), torch.empty((rows, C), dtype=torch.int8)
    acc = [torch.zeros((C, C), dtype=torch.int32) for _ in range(3)]
    for a in range(0, len(x), rows):
        n = min(rows, len(x) - a)
        split(x[a:a + n], inv, y[:n], h[:n], l[:n])
        for out, (p, q) in zip(acc, ((h, h), (h, l), (l, l))):
            out += torch._int_mm(p[:n].T, q[:n])
    return combine(*acc, inv)


def cpu_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best * 1e3


def stages(x: np.ndarray, repeats: int) -> dict[str, float]:
    """The int8 route's stages alone on one fold slice, CPU ms."""
    inv = inverse_scales(x)
    y = torch.empty(x.shape, dtype=torch.float32)
    h, l = torch.empty(x.shape, dtype=torch.int8), torch.empty(x.shape, dtype=torch.int8)
    split(x, inv, y, h, l)
    def products():
        return torch._int_mm(h.T, h), torch._int_mm(h.T, l), torch._int_mm(l.T, l)

    hh, hl, ll = products()
    return {"ranges": cpu_ms(lambda: inverse_scales(x), repeats),
            "round+split": cpu_ms(lambda: split(x, inv, y, h, l), repeats),
            "3 products": cpu_ms(products, repeats),
            "combine": cpu_ms(lambda: combine(hh, hl, ll, inv), repeats)}


def bound(x: np.ndarray, inv: np.ndarray, g: np.ndarray) -> np.ndarray:
    """|Ĝ − G| per entry: rounding x_tj moves it by e_tj, |e_tj| ≤ s_j/2, so
    |Σ(x_i + e_i)(x_j + e_j) − Σx_i x_j| ≤ (s_j/2)Σ|x_i| + (s_i/2)Σ|x_j| + T·s_i·s_j/4,
    plus the float32 combine (four roundings of terms ≤ |Q|ᵀ|Q|·s_i·s_j: 2⁻²² of it)."""
    s, a = 1 / inv.astype(np.float64), np.abs(x).sum(0, dtype=np.float64)
    q = np.abs(np.round(x.astype(np.float64) * inv))
    return (np.outer(a, s) + np.outer(s, a)) / 2 + len(x) * np.outer(s, s) / 4 \
        + 2.0 ** -22 * (q.T @ q) * np.outer(s, s) + 2.0 ** -23 * np.abs(g)


def errors(X64: np.ndarray, X16: np.ndarray, fold: np.ndarray, n_folds: int) -> dict[str, float]:
    """Largest |Ĝ − G| / √(G_ii G_jj) over the fold slices, G by float64 sums of the same
    float32 copy; and, for scale, the same measure between the Gram of the float64 tokens
    before float16 storage and that of the stored tokens (both centred on the same c)."""
    Xf, slices, order, c = fold_slices(X16, fold, n_folds)
    out = {"float32": 0.0, "int8": 0.0, "int8, columns 2+": 0.0, "int8 / its bound": 0.0,
           "float16 storage": 0.0}
    for g in (g for g in slices if g.stop > g.start):
        x = np.array(Xf[g])
        ref = x.astype(np.float64).T @ x.astype(np.float64)
        norm = np.sqrt(np.outer(np.diag(ref), np.diag(ref)))
        i8 = gram_int8(x)
        out["float32"] = max(out["float32"], np.max(np.abs(x.T @ x - ref) / norm))
        out["int8"] = max(out["int8"], np.max(np.abs(i8 - ref) / norm))
        out["int8, columns 2+"] = max(out["int8, columns 2+"],
                                      np.max((np.abs(i8 - ref) / norm)[2:, 2:]))
        out["int8 / its bound"] = max(out["int8 / its bound"],
                                      np.max(np.abs(i8 - ref) / bound(x, inverse_scales(x), ref)))
        x64 = X64[order][g] - c.astype(np.float64)
        x16 = X16[order][g].astype(np.float64) - c.astype(np.float64)
        out["float16 storage"] = max(out["float16 storage"],
                                     np.max(np.abs(x64.T @ x64 - x16.T @ x16) / norm))
    return out


def planted(C: int, images: int = 48, tokens: int = 256, n_folds: int = 5) -> dict:
    """Ridge CV (``fit_ridge_cv``, 15 λ) on a planted linear problem of float16 tokens with
    a t₂-tailed column holding a 100 and a column of 10⁻³ values, from the library's fold
    statistics with each fold's float32 Gram product swapped for the int8 one or for
    float64 sums of the same copy (the rest of the statistics untouched): λ, and weights
    and bias against the float64 fit."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=C) / np.sqrt(C)
    X = rng.normal(size=(images * tokens, C)) * rng.uniform(0.2, 3, C) + rng.normal(0, 2, C)
    X[:, 0] = rng.standard_t(2, size=len(X))
    X[len(X) // 2, 0] = 100.0
    X[:, 1] *= 1e-3
    y = (X @ w + rng.normal(0, 1.0, len(X))).astype(np.float32)
    X16, fold = X.astype(np.float16), fold_of(np.repeat(np.arange(images), tokens), n_folds)
    base = stats_by_fold(X16, y, fold, n_folds)
    Xf, slices, _, _ = fold_slices(X16, fold, n_folds)
    grams = {"float32": lambda x: x.T @ x, "int8": gram_int8,
             "float64": lambda x: x.astype(np.float64).T @ x.astype(np.float64)}
    fits = {}
    for name, gram in grams.items():
        folds = []
        for st, g in zip(base, slices):
            x = np.array(Xf[g])
            delta = gram(x).astype(np.float64) - (x.T @ x).astype(np.float64)
            folds.append(st and replace(st, sxx=st.sxx + delta))
        fits[name] = fit_ridge_cv(folds, np.logspace(-3, 5, 15))
    ref = fits["float64"]
    scale = np.abs(ref.weights).max()
    out = {k: (float(np.ravel(f.lam)[0]), float(np.abs(f.weights - ref.weights).max() / scale),
               float(np.abs(np.ravel(f.bias) - np.ravel(ref.bias)).max()))
           for k, f in fits.items() if k != "float64"}
    return out | {"float64 bias": float(np.ravel(ref.bias)[0])}


def timings(xs: list[np.ndarray], invs: list[np.ndarray], repeats: int) -> str:
    """Each route's CPU ms over a task's fold slices, and the int8 route's stages."""
    t = {"float32": cpu_ms(lambda: [x.T @ x for x in xs], repeats),
         "int8, fold slices": cpu_ms(lambda: [gram_int8(x) for x in xs], repeats),
         "int8, [H|L]": cpu_ms(lambda: [gram_int8_concat(x) for x in xs], repeats),
         "int8, 512 kB pieces": cpu_ms(
             lambda: [gram_int8_pieces(x, v) for x, v in zip(xs, invs)], repeats)}
    st = {k: 0.0 for k in ("ranges", "round+split", "3 products", "combine")}
    for x in xs:
        for k, v in stages(x, repeats).items():
            st[k] += v
    return (", ".join(f"{k} {v:.1f}" for k, v in t.items())
            + " | int8 stages " + ", ".join(f"{k} {v:.1f}" for k, v in st.items()))


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7,
                    help="timings' repeats (best kept); 0: no timings, only the errors and the "
                         "planted problem (on a CPU without int8 matrix units, torch's int8 "
                         "product is ~40x slower than float32's and timings take minutes)")
    ap.add_argument("--planted", type=int, nargs="*", default=[320, 1280], metavar="C",
                    help="channel counts of the planted ridge problem")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
    print(f"AMX int8: {'amx_int8' in open('/proc/cpuinfo').read()}; load {os.getloadavg()}")
    for name in args.shapes:
        tokens, C = SHAPES[name]
        X64, X16, fold = task_tokens(tokens, C, args.block_size, args.folds)
        Xf, slices, _, _ = fold_slices(X16, fold, args.folds)
        xs = [np.array(Xf[g]) for g in slices if g.stop > g.start]
        invs = [inverse_scales(x) for x in xs]
        print(f"{name}: task of {len(X16)} tokens, fold slices {[len(x) for x in xs]}"
              + (f"; CPU ms {timings(xs, invs, args.repeats)}" if args.repeats > 0 else "")
              + f" [load {os.getloadavg()[0]:.1f}]", flush=True)
        e = errors(X64, X16, fold, args.folds)
        print("   error / √(G_ii G_jj): " + ", ".join(f"{k} {v:.2e}" for k, v in e.items()),
              flush=True)
        if e["int8 / its bound"] > 1:
            raise SystemExit(f"{name}: the int8 Gram is off by {e['int8 / its bound']:.2f}x its "
                             "derived bound: the route or the bound is wrong")
    for C in args.planted:
        print(f"planted ridge problem, C = {C}: (λ, weight change / largest, bias change) "
              "against float64 Grams: " + ", ".join(
                  f"{k} ({v[0]:.3g}, {v[1]:.1e}, {v[2]:.1e})" if isinstance(v, tuple)
                  else f"{k} {v:.3g}" for k, v in planted(C).items()), flush=True)


if __name__ == "__main__":
    main()
