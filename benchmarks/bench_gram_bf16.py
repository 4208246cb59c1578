"""The ridge fit's Gram products XᵀX in float32 (numpy ``syrk``) against products on the
AMX-BF16 units with float32 accumulation and output, at the fit's real shapes.

torch 2.13 on CPU has no bfloat16 product with a float32 output (``torch.mm(...,
out_dtype=torch.float32)`` is not implemented for CPU; ``mm``/``addmm``/``matmul`` of bfloat16
round their output to bfloat16; ``_scaled_mm`` takes float8 only). What it has is oneDNN's
"fpmath" mode: with ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"`` a float32
``torch.mm`` rounds its inputs to bfloat16 and multiplies on the AMX units (oneDNN
``brg_matmul:avx10_1_512_amx``, ``attr-fpmath:bf16`` with ``ONEDNN_VERBOSE=1``), float32
sums and output. So ``mm(xᵀ, x)`` is HᵀH for H = bf16(x), with no split pass for H; the
residual r = x − H is exact in float32, and ``mm(xᵀ, r)`` is Hᵀ·bf16(r). The routes, per
fold slice x of the library's centred float32 copy (``stats._centred_copy``):

* ``float32``: numpy's ``x.T @ x`` (one ``syrk``), what the fit does today;
* ``bf16 x1``: HᵀH alone (hi parts only: 8 bits; the speed floor, not exact);
* ``bf16 x2``: HᵀH + HᵀL + LᵀH, L = bf16(r) (16 bits; LᵀL, ~2⁻¹⁸ relative, dropped);
  one split pass (r) and one C×C combine;
* ``bf16 x2, bf16 cross``: the same, with HᵀL from a bfloat16 product (bfloat16 inputs
  and output: cheaper, its output rounded);
* ``bf16 x3``: + LᵀL: exact where x is two bfloat16 (a centre snapped to a coarse grid
  makes x − c so for most tokens, below);
* ``bf16 x4``: three parts (H, M, L: 24 bits, all of a float32) and the products above
  float32's precision, HᵀH + HᵀM + MᵀH + HᵀL + LᵀH + MᵀM.

Errors are measured against float64 (1) of the same product, relative to √(G_ii·G_jj), and
(2) of the centred co-moments per fold, against float64 co-moments of the float16 tokens:
for ``float32`` the library's own ``stats_by_fold``; for the others their Gram corrected by
the fold mean's offset as the library does (``_rank1``, float32). Also on (2): the x2 and x3
routes on a copy centred on a snapped centre (c rounded to a multiple of 2^(⌊log₂σ⌋−4), σ
the spread of the centring tokens), and x3 on the raw float16 tokens (uncentred: a float16
value is exactly two bfloat16), corrected by the mean in float64. Data: the fit's real
shapes (``bench_gram_int8.task_tokens``: a heavy-tailed and a tiny column) and, as
``tests/test_probes.py`` has them, channel means 10–100× the spread.

    python benchmarks/bench_gram_bf16.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from actstore.probe.stats import _centred_copy, _rank1, stats_by_fold
from bench_gram_int8 import SHAPES, cpu_ms, fold_slices, task_tokens

BF16 = torch.backends.mkldnn.matmul


class fpmath_bf16:
    """float32 ``torch.mm`` on the AMX-BF16 units while inside. The setting is global to the
    process, not per thread: another thread's float32 products would round too."""

    def __enter__(self):
        self.was, BF16.fp32_precision = BF16.fp32_precision, "bf16"

    def __exit__(self, *exc):
        BF16.fp32_precision = self.was


def residual(x: torch.Tensor, hb: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """r = x − bf16(x), exact in float32 (the rounding is torch's, to nearest even); by
    way of a float32 copy of the bfloat16: ``torch.sub(x, hb)`` of mixed types is 2.4×
    slower (12 288 × 640: 22.6 vs 9.6 CPU ms)."""
    hb.copy_(x)
    r.copy_(hb)
    return torch.sub(x, r, out=r)


def gram_x1(x: torch.Tensor, w: dict) -> torch.Tensor:
    with fpmath_bf16():
        return torch.mm(x.T, x, out=w["G"])


def gram_x2(x: torch.Tensor, w: dict, ll: bool = False) -> torch.Tensor:
    r = residual(x, w["hb"], w["r"])
    with fpmath_bf16():
        G, P = torch.mm(x.T, x, out=w["G"]), torch.mm(x.T, r, out=w["P"])
        G.add_(P).add_(P.T)
        if ll:
            G.add_(torch.mm(r.T, r, out=w["P"]))
    return G


def gram_x3(x: torch.Tensor, w: dict) -> torch.Tensor:
    return gram_x2(x, w, ll=True)


def gram_x2_bf16_cross(x: torch.Tensor, w: dict) -> torch.Tensor:
    hb, lb = w["hb"], w["lb"]
    lb.copy_(residual(x, hb, w["r"]))
    with fpmath_bf16():
        G = torch.mm(x.T, x, out=w["G"])
    P = torch.mm(hb.T, lb, out=w["Pb"])
    return G.add_(P).add_(P.T)


def gram_x4(x: torch.Tensor, w: dict) -> torch.Tensor:
    r = residual(x, w["hb"], w["r"])            # M = bf16(r) inside the products
    lo = residual(r, w["hb"], w["lo"])          # L = r − M, exact
    with fpmath_bf16():
        G, P = torch.mm(x.T, x, out=w["G"]), torch.mm(x.T, r, out=w["P"])
        P.addmm_(x.T, lo)                       # HᵀM + HᵀL
        G.add_(P).add_(P.T).add_(torch.mm(r.T, r, out=w["P"]))
    return G


ROUTES = {"bf16 x1": gram_x1, "bf16 x2": gram_x2, "bf16 x2, bf16 cross": gram_x2_bf16_cross,
          "bf16 x3": gram_x3, "bf16 x4": gram_x4}


def work(T: int, C: int) -> dict:
    f32, b16 = torch.float32, torch.bfloat16
    return {"G": torch.empty(C, C), "P": torch.empty(C, C), "Pb": torch.empty(C, C, dtype=b16),
            "hb": torch.empty(T, C, dtype=b16), "lb": torch.empty(T, C, dtype=b16),
            "r": torch.empty(T, C, dtype=f32), "lo": torch.empty(T, C, dtype=f32)}


def large_means(tokens: int, channels: int, block: int, n_folds: int, seed: int = 0):
    """As ``task_tokens``, channels as ``tests/test_probes.py`` has them: spread 0.3–3,
    means N(0, 30²) (10–100× the spread)."""
    X64, _, fold = task_tokens(tokens, channels, block, n_folds, seed)
    rng = np.random.default_rng(seed + 1)
    X = rng.normal(size=X64.shape) * rng.uniform(0.3, 3, channels) + rng.normal(size=channels) * 30
    return X, X.astype(np.float16), fold


def snapped(X16: np.ndarray, order: np.ndarray, c: np.ndarray):
    """The fold-ordered copy centred on c rounded to a multiple of q = 2^(⌊log₂σ⌋−4) (σ the
    spread of the centring tokens): x − c then lies on the coarser of x's float16 grid and
    q, within a few σ of 0 for most tokens, so it is two bfloat16 exactly."""
    probe = np.linspace(0, len(X16) - 1, min(len(X16), 256)).round().astype(int)
    sd = X16[probe].astype(np.float64).std(0)
    q = np.exp2(np.floor(np.log2(np.maximum(sd, 1e-30))) - 4)
    cs = (np.round(c / q) * q).astype(np.float32)
    return X16[order].astype(np.float32) - cs, cs


def comoment_error(G: np.ndarray, x16: np.ndarray, c: np.ndarray) -> float:
    """Largest |Ŝ − S| / √(S_ii S_jj): Ŝ = G (centred on c) less n·d·dᵀ, d = mean − c, in
    float32 as ``stats._grouped`` does; S from float64 sums of the float16 tokens."""
    xd = x16.astype(np.float64)
    m = xd.mean(0)
    S = (xd - m).T @ (xd - m)
    Sh = np.array(G, np.float32)
    _rank1(Sh, (m - c).astype(np.float64), -float(len(xd)))
    return float(np.max(np.abs(Sh - S) / np.sqrt(np.outer(np.diag(S), np.diag(S)))))


def errors(X16: np.ndarray, fold: np.ndarray, n_folds: int) -> dict[str, tuple[float, float]]:
    """Per route (largest over the fold slices): the product's error against float64 of the
    same copy, and the co-moments' error against float64 of the float16 tokens."""
    lib = stats_by_fold(X16, None, fold, n_folds)      # before the copy: same scratch buffer
    Xf, slices, order, c = fold_slices(X16, fold, n_folds)
    Xf = np.array(Xf)
    Xs, cs = snapped(X16, order, c)
    raw = X16[order].astype(np.float32)
    out: dict[str, list[float]] = {}

    def note(name, g_err, s_err):
        a = out.setdefault(name, [0.0, 0.0])
        a[0], a[1] = max(a[0], g_err), max(a[1], s_err)

    for k, g in enumerate(slices):
        if g.stop == g.start:
            continue
        x16 = X16[order][g]
        for name, copy, centre in (("", Xf, c), (", snapped c", Xs, cs)):
            x = np.array(copy[g])
            ref = x.astype(np.float64).T @ x.astype(np.float64)
            norm = np.sqrt(np.outer(np.diag(ref), np.diag(ref)))
            if not name:
                note("float32", float(np.max(np.abs(x.T @ x - ref) / norm)),
                     float(np.max(np.abs(lib[k].sxx - _exact(x16)) / _norm(x16))))
            for route, fn in ROUTES.items():
                if name and route not in ("bf16 x2", "bf16 x3"):
                    continue
                G = fn(torch.from_numpy(x), work(*x.shape)).numpy()
                note(route + name, float(np.max(np.abs(G - ref) / norm)),
                     comoment_error(G, x16, centre))
        xr = np.array(raw[g])
        G = gram_x3(torch.from_numpy(xr), work(*xr.shape)).numpy().astype(np.float64)
        m = xr.astype(np.float64).mean(0)
        S = G - len(xr) * np.outer(m, m)               # the mean's correction in float64
        ref = xr.astype(np.float64).T @ xr.astype(np.float64)
        note("bf16 x3, raw float16", float(np.max(np.abs(G - ref) / np.sqrt(
            np.outer(np.diag(ref), np.diag(ref))))),
             float(np.max(np.abs(S - _exact(x16)) / _norm(x16))))
    return {k: (v[0], v[1]) for k, v in out.items()}


def _exact(x16: np.ndarray) -> np.ndarray:
    xd = x16.astype(np.float64)
    return (xd - xd.mean(0)).T @ (xd - xd.mean(0))


def _norm(x16: np.ndarray) -> np.ndarray:
    d = np.diag(_exact(x16))
    return np.sqrt(np.outer(d, d))


def timings(X16: np.ndarray, fold: np.ndarray, n_folds: int, repeats: int) -> dict[str, float]:
    """CPU ms per fit task, best of ``repeats``, the routes interleaved within each repeat:
    the library's whole fold statistics (``stats_by_fold``), and each route's products on
    the fold slices of the centred copy (split passes and combines included)."""
    Xf, slices, _, _ = fold_slices(X16, fold, n_folds)
    xs = [torch.from_numpy(np.array(Xf[g])) for g in slices if g.stop > g.start]
    ws = [work(*x.shape) for x in xs]
    y = np.zeros(len(X16), np.float32)
    fns = {"fold statistics (float32)": lambda: stats_by_fold(X16, y, fold, n_folds),
           "float32": lambda: [x.numpy().T @ x.numpy() for x in xs]}
    fns |= {k: (lambda f=f: [f(x, w) for x, w in zip(xs, ws)]) for k, f in ROUTES.items()}
    fns["x2 split pass"] = lambda: [residual(x, w["hb"], w["r"]) for x, w in zip(xs, ws)]
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            best[k] = min(best[k], cpu_ms(fn, 1))
    return best


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    return ap


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
    print(f"AMX bf16: {'amx_bf16' in open('/proc/cpuinfo').read()}; torch {torch.__version__}; "
          f"load {os.getloadavg()}")
    for name in args.shapes:
        tokens, C = SHAPES[name]
        _, X16, fold = task_tokens(tokens, C, args.block_size, args.folds)
        t = timings(X16, fold, args.folds, args.repeats)
        gram = t["float32"]
        others = {k: v for k, v in t.items() if k.startswith("bf16")}
        print(f"{name}: task of {len(X16)} tokens, {C} channels; CPU ms, best of "
              f"{args.repeats}: fold statistics {t['fold statistics (float32)']:.1f}, of it "
              f"the float32 Gram products {gram:.1f}; x2 split pass {t['x2 split pass']:.1f}"
              f" [load {os.getloadavg()[0]:.1f}]", flush=True)
        print("   products (ms, ratio to float32): " + ", ".join(
            f"{k} {v:.1f} ({v / gram:.2f}x)" for k, v in others.items()), flush=True)
        fs = t["fold statistics (float32)"]
        print("   fold statistics with the route instead (ms, ratio): " + ", ".join(
            f"{k} {fs - gram + v:.1f} ({(fs - gram + v) / fs:.2f}x)" for k, v in others.items()),
              flush=True)
        for kind, (_, x16, f) in (("plain", (None, X16, fold)),
                                  ("large means", large_means(tokens, C, args.block_size,
                                                              args.folds))):
            e = errors(x16, f, args.folds)
            print(f"   {kind}: error of XᵀX / of the co-moments against float64: " + ", ".join(
                f"{k} {a:.1e} / {b:.1e}" for k, (a, b) in e.items()), flush=True)
            if e["bf16 x1"][0] < 2.0 ** -12:    # 8-bit inputs err ~2⁻⁹: none, no bf16 units
                raise SystemExit(f"{name}: the bf16 products were exact to "
                                 f"{e['bf16 x1'][0]:.1e}: oneDNN did not round to bfloat16 "
                                 "(no AMX-BF16 / AVX512-BF16?), the timings are float32's")
            if e["bf16 x4"][1] > 1e-5:          # 24 bits in three parts: float32's error
                raise SystemExit(f"{name}: the three-part route erred {e['bf16 x4'][1]:.1e}, "
                                 "above float32's: the split is not exact")


if __name__ == "__main__":
    main()
