"""Authors' SGD probes vs actstore's closed-form probes, same in-memory cells, one run.

The authors fit every (layer, step) probe as a torch ``nn.Linear(C, 1)`` trained with Adam
(lr 1e-3, batch 4 images, 30 epochs; Huber loss for depth, cross-entropy for the salient
mask). actstore fits ridge (λ by 5-fold CV) from one pass of sufficient statistics and a
logistic probe by Newton/IRLS (λ by 5-fold CV) on the tokens held in memory. This script
times both on the same synthetic cells with a planted linear signal and prints wall times,
the speed ratio and held-out test scores side by side, next to the planted (oracle) score.

Both sides run on one thread (torch and BLAS), so the ratio measures the method, not the
core count, and the benchmark stays polite on a shared machine. Run:
``.venv/bin/python benchmarks/bench_probes.py [--images 200 --tokens 256 --channels 64]``.
The cell generator is the only synthetic part; pointing ``cells()`` at a real store's
arrays (X ``(images, tokens, C)``, y ``(images, tokens)``) needs no other change.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from actstore.metrics import dice, rmse, summarize  # noqa: E402
from actstore.probe.logistic import fit_logistic_cv  # noqa: E402
from actstore.probe.solvers import fit_ridge_cv, predict  # noqa: E402
from actstore.probe.stats import image_stats  # noqa: E402


def cells(n_cells: int, images: int, tokens: int, channels: int, seed: int):
    """Synthetic cells shaped like an attention layer's output: correlated channels (a
    low-rank mix), uneven channel means and scales, a per-image offset, float16 storage.
    The continuous target is a planted linear map plus noise (planted R² = 0.7, z-scored
    like the paper's depth); the binary target thresholds the same latent at its median."""
    rng = np.random.default_rng(seed)
    for _ in range(n_cells):
        mix = rng.normal(size=(channels, channels)) / np.sqrt(channels)
        mix[:, : channels // 4] *= 3.0                      # a few dominant directions
        X = rng.normal(size=(images, tokens, channels)) @ mix
        X = X * rng.uniform(0.5, 2.0, channels) + rng.normal(size=channels)
        X += 0.3 * rng.normal(size=(images, 1, channels))
        X = X.astype(np.float16)
        w = rng.normal(size=channels)
        signal = X.astype(np.float64) @ w
        latent = signal + np.sqrt(0.3 / 0.7) * signal.std() * rng.normal(size=signal.shape)
        yield X, signal, latent


def torch_probe(X: np.ndarray, y: np.ndarray, binary: bool, epochs: int,
                seed: int) -> tuple[np.ndarray, float]:
    """The authors' recipe: nn.Linear, Adam lr 1e-3, 4 images per step, `epochs` epochs."""
    torch.manual_seed(seed)
    Xt, yt = torch.from_numpy(X.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
    model = torch.nn.Linear(X.shape[-1], 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss() if binary else torch.nn.HuberLoss()
    for _ in range(epochs):
        for batch in torch.randperm(len(Xt)).split(4):
            opt.zero_grad()
            loss = loss_fn(model(Xt[batch]).squeeze(-1), yt[batch])
            loss.backward()
            opt.step()
    return model.weight.detach().numpy()[0].astype(np.float64), float(model.bias.detach())


def r2(pred: np.ndarray, y: np.ndarray) -> float:
    return float(1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def score(pred: np.ndarray, y: np.ndarray, binary: bool) -> tuple[float, str]:
    """Headline test score (higher is better) and its printout: per-image Dice for masks
    (logit > 0), pooled R² plus per-image RMSE for continuous targets."""
    if binary:
        d = summarize(dice(pred > 0, y > 0.5))["mean"]
        return d, f"Dice {d:.4f}"
    r = r2(pred, y)
    return r, f"R² {r:.4f}  RMSE {summarize(rmse(pred, y))['mean']:.4f}"


def timed(fn, *args, repeat: int = 1):
    """Result and best-of-``repeat`` wall time: the minimum is the least disturbed by
    other jobs on a shared machine."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return out, best


def methods(n_tr: int, tokens: int, epochs: int, seed: int, binary: bool):
    """(name, fit) pairs for one target; fit(Xtr, ytr) -> (weights, bias, λ or None).
    Binary targets also get ridge on the 0/1 labels thresholded at 0.5 (bias shifted so
    logit > 0 means > 0.5): it shares XᵀX with the continuous targets, so costs no pass."""
    image = np.repeat(np.arange(n_tr), tokens)                  # each token's image

    def adam(X, y):
        return (*torch_probe(X, y, binary, epochs, seed), None)

    def ridge(X, y, shift=0.0):
        fit = fit_ridge_cv(image_stats(image, X.reshape(-1, X.shape[-1]), y.ravel()))
        return fit.weights, fit.bias - shift, float(fit.lam)

    def logistic(X, y):
        fit = fit_logistic_cv(X.reshape(-1, X.shape[-1]), y.ravel(), image)
        return fit.weights, fit.bias, float(fit.lam)
    out = [(f"Adam nn.Linear, {epochs} ep", adam)]
    if binary:
        return out + [("logistic Newton, 5-fold CV", logistic),
                      ("ridge on 0/1 > .5, 5-fold CV", lambda X, y: ridge(X, y, 0.5))]
    return out + [("ridge closed form, 5-fold CV", ridge)]


def build_parser() -> argparse.ArgumentParser:
    """Apart from main, so tests/test_doc_commands.py parses documented lines unrun."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=3)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--train", type=float, default=0.5, help="fraction of images to train on")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="report the best of N timings")
    ap.add_argument("--tie", type=float, default=1e-3, help="score differences below this are ties")
    return ap


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    n_tr = int(a.images * a.train)
    warm = np.random.default_rng(0).normal(size=(n_tr, 4, a.channels)).astype(np.float16)
    for _, fit in methods(n_tr, 4, 1, 0, True):                  # first-call overheads
        fit(warm, (warm[..., 0] > 0).astype(np.float64))
    print(f"{a.cells} cells x {a.images} images ({n_tr} train / {a.images - n_tr} test) x "
          f"{a.tokens} tokens x {a.channels} channels, float16; 1 thread each side, "
          f"best of {a.repeat} timings\n")
    head = f"{'cell':>4} {'target':<8} {'method':<29} {'time s':>8}  {'speed-up':>8}  test score"
    print(head + "\n" + "-" * (len(head) + 30))
    times: dict[str, float] = {}
    worse = []
    with threadpool_limits(1):
        for c, (X, signal, latent) in enumerate(cells(a.cells, a.images, a.tokens, a.channels,
                                                      a.seed)):
            mu, sd = latent[:n_tr].mean(), latent[:n_tr].std()      # z-score, train stats
            thr = np.median(latent[:n_tr])
            for target, y, oracle, binary in (
                    ("depth", (latent - mu) / sd, (signal - mu) / sd, False),
                    ("salient", (latent > thr).astype(np.float64), signal - thr, True)):
                base_t = base_v = None
                for k, (name, fit) in enumerate(methods(n_tr, a.tokens, a.epochs, a.seed + c,
                                                        binary)):
                    (w, b, lam), t = timed(fit, X[:n_tr], y[:n_tr], repeat=a.repeat)
                    v, text = score(predict(w, b, X[n_tr:]), y[n_tr:], binary)
                    base_t, base_v = (t, v) if k == 0 else (base_t, base_v)
                    times[name] = times.get(name, 0.0) + t
                    if v < base_v - a.tie:
                        worse.append(f"cell {c} {target} {name}")
                    print(f"{c if k == 0 else '':>4} {target if k == 0 else '':<8} {name:<29} "
                          f"{t:>8.3f}  {base_t / t:>7.1f}x  {text}"
                          + (f"   (λ={lam:.0e})" if lam else ""))
                print(f"{'':>4} {'':<8} {'planted map (oracle)':<29} {'':>8}  {'':>8}  "
                      f"{score(oracle[n_tr:], y[n_tr:], binary)[1]}")
    adam = times.pop(f"Adam nn.Linear, {a.epochs} ep")
    print(f"\ntotal Adam (both targets) {adam:.2f} s; closed-form totals: " + ", ".join(
        f"{name.split(',')[0]} {t:.2f} s" for name, t in times.items()))
    print(f"every closed-form test score >= Adam's (ties within {a.tie})" if not worse else
          f"scored below Adam: {'; '.join(worse)}")
    print("note: in memory, XᵀX costs 2nC² flops against Adam's ~6nC per epoch, so the gap "
          "narrows as C grows;\nreading a store once instead of 30 times is where the "
          "closed form gains most.")


if __name__ == "__main__":
    main()
