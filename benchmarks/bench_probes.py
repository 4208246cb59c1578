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
from actstore.probes import fit_logistic_cv, fit_ridge_cv, image_stats, predict  # noqa: E402


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


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=3)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--train", type=float, default=0.5, help="fraction of images to train on")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warm = np.random.default_rng(0).normal(size=(8, 16, a.channels)).astype(np.float16)
    torch_probe(warm, warm[..., 0] > 0, True, 1, 0)                 # first-call overheads
    fit_logistic_cv(warm.reshape(-1, a.channels), (warm[..., 0] > 0).ravel(), np.repeat(
        np.arange(8), 16), n_folds=2)
    n_tr = int(a.images * a.train)
    print(f"{a.cells} cells x {a.images} images ({n_tr} train / {a.images - n_tr} test) x "
          f"{a.tokens} tokens x {a.channels} channels, float16; 1 thread each side\n")
    head = f"{'cell':>4} {'target':<8} {'method':<26} {'time s':>8}  test score"
    print(head + "\n" + "-" * (len(head) + 24))
    total = {"sgd": 0.0, "closed": 0.0}
    worse = []
    with threadpool_limits(1):
        for c, (X, signal, latent) in enumerate(cells(a.cells, a.images, a.tokens, a.channels,
                                                      a.seed)):
            mu, sd = latent[:n_tr].mean(), latent[:n_tr].std()      # z-score, train stats
            thr = np.median(latent[:n_tr])
            Xtr, Xte = X[:n_tr], X[n_tr:]
            image = np.repeat(np.arange(n_tr), a.tokens)           # each token's image
            for target, y, oracle, binary in (
                    ("depth", (latent - mu) / sd, (signal - mu) / sd, False),
                    ("salient", (latent > thr).astype(np.float64), signal - thr, True)):
                ytr, yte = y[:n_tr], y[n_tr:]
                (w, b), t_sgd = timed(torch_probe, Xtr, ytr, binary, a.epochs, a.seed + c)
                if binary:
                    fit, t_cf = timed(fit_logistic_cv, Xtr.reshape(-1, a.channels), ytr.ravel(),
                                      image)
                    name = "Newton logistic, 5-fold CV"
                else:
                    fit, t_cf = timed(lambda: fit_ridge_cv(
                        image_stats(image, Xtr.reshape(-1, a.channels), ytr.ravel())))
                    name = "closed-form ridge, 5-fold CV"
                v_sgd, s_sgd = score(predict(w, b, Xte), yte, binary)
                v_cf, s_cf = score(predict(fit.weights, fit.bias, Xte), yte, binary)
                s_or = score(oracle[n_tr:], yte, binary)[1]
                print(f"{c:>4} {target:<8} {'Adam nn.Linear, 30 ep':<26} {t_sgd:>8.3f}  {s_sgd}")
                print(f"{'':>4} {'':<8} {name:<26} {t_cf:>8.3f}  {s_cf}   "
                      f"(λ={float(fit.lam):.1e}, {t_sgd / t_cf:.0f}x faster)")
                print(f"{'':>4} {'':<8} {'planted map (oracle)':<26} {'':>8}  {s_or}")
                total["sgd"] += t_sgd
                total["closed"] += t_cf
                if v_cf < v_sgd:
                    worse.append(f"cell {c} {target}")
    print(f"\ntotal: Adam {total['sgd']:.2f} s, closed-form {total['closed']:.2f} s, "
          f"ratio {total['sgd'] / total['closed']:.1f}x")
    print("closed-form test score >= Adam's on every cell" if not worse else
          f"closed-form scored below Adam on: {', '.join(worse)}")


if __name__ == "__main__":
    main()
