"""How close is the analytic E[f(x + n)] to Monte Carlo, by regularizer depth?

    python -m gaussreg.bench.depth --out bench/results/moment-depth.json --figure docs/moment-depth.png

Trains small models on a Fashion-MNIST subset (LeNet baseline, LeNet with the paper's
regularizer, the built-in one-hidden-layer MLP and a two-hidden-layer MLP; `--epochs`
over `--train` images, Adam, batch 100), then for `--images` test images and each
sigma compares expected_logits(model, x, sigma, depth) with the mean logits of
`--samples` noisy copies (x + sigma z, z ~ N(0, I), unclipped, fixed seeds): relative
L2 error ||analytic - MC|| / ||MC|| per image, averaged. Also reports the Monte Carlo
noise floor (the relative standard error of the MC mean) and how often the argmax of
the analytic estimate agrees with the argmax of the MC mean. One thread, to share the
machine."""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from gaussreg import __version__
from gaussreg.data import loading as data
from gaussreg.science.methods import make_method
from gaussreg.science.models import GaussNet, NormalizedLinear, build_model
from gaussreg.science.regularizer import expected_logits

SIGMAS = [0.05, 0.1, 0.25, 0.5, 1.0]
DEPTHS = [1, 2, 3, "all"]


def mlp2(info) -> GaussNet:
    """784-256-256-10: the MLP with a second hidden layer, so depth matters."""
    first = NormalizedLinear(math.prod(info.shape), 256, mean=info.mean, std=info.std)
    return GaussNet(first, nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, info.classes)), "mlp2")


def train(model, method, X, Y, epochs, seed, lr=1e-3, batch=100):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), batch):
            idx = perm[i:i + batch]
            loss = method.loss(model, X[idx], Y[idx], g)
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, X, Y):
    return (model(X).argmax(1) == Y).float().mean().item()


@torch.no_grad()
def measure(model, x, sigma, samples, seed, chunk=500):
    """Per image: relative errors by depth, MC noise floor, argmax agreement."""
    g = torch.Generator().manual_seed(seed)
    mc, se = [], []
    for xi in x:
        s1 = s2 = 0
        for j in range(0, samples, chunk):
            n = min(chunk, samples - j)
            out = model(xi + sigma * torch.randn(n, *xi.shape, generator=g)).double()
            s1, s2 = s1 + out.sum(0), s2 + (out * out).sum(0)
        m = s1 / samples
        mc.append(m)
        se.append(((s2 / samples - m * m).clamp_min(0) * samples / (samples - 1) / samples).sqrt())
    mc, se = torch.stack(mc), torch.stack(se)
    norm = mc.norm(dim=1)
    row = {"mc_floor": (se.norm(dim=1) / norm).mean().item()}
    for d in DEPTHS:
        e = expected_logits(model, x, sigma, d).double()
        rel = (e - mc).norm(dim=1) / norm
        row[str(d)] = {"rel_err_mean": rel.mean().item(), "rel_err_median": rel.median().item(),
                       "argmax_agree": (e.argmax(1) == mc.argmax(1)).float().mean().item()}
    return row


def figure(res, path):
    import matplotlib  # here: matplotlib is the optional extra `plots`
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # here: matplotlib is the optional extra `plots`
    names = list(res["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), sharey=True)
    for ax, name in zip(axes, names):
        rows = res["models"][name]["sigmas"]
        sig = [float(s) for s in rows]
        for d, style in zip(DEPTHS, ["o-", "s--", "^-.", "d:"]):
            ax.plot(sig, [rows[s][str(d)]["rel_err_mean"] for s in rows], style, label=f"depth {d}")
        ax.plot(sig, [rows[s]["mc_floor"] for s in rows], "k-", alpha=0.3, lw=3, label="MC noise floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{name} (acc {res['models'][name]['test_accuracy']:.0%})", fontsize=10)
        ax.set_xlabel("sigma (pixel units)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("relative L2 error vs Monte Carlo")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/moment-depth.json")
    ap.add_argument("--figure", default=None, help="write the figure here (needs matplotlib)")
    ap.add_argument("--from-json", action="store_true", help="only redraw the figure from --out")
    ap.add_argument("--model", action="append", dest="models", help="a model's label (repeat for more; default: all)")
    ap.add_argument("--sigmas", default=None, help="comma-separated test sigmas (default: 0.05,0.1,0.25,0.5,1)")
    a = ap.parse_args(argv)
    if a.from_json:
        figure(json.loads(Path(a.out).read_text()), a.figure)
        return 0
    torch.set_num_threads(a.threads)
    s = data.load("fashion-mnist", train_subset=a.train, test_subset=1000)
    X, Y, TX, TY = s.train_x, s.train_y, s.test_x, s.test_y
    x = TX[:a.images]
    models = {
        "lenet baseline": ("lenet", "baseline", {}),
        "lenet regularizer (sigma 0.5, alpha 1, depth 1)": ("lenet", "regularizer", {"sigma": 0.5, "alpha": 1.0}),
        "mlp baseline": ("mlp", "baseline", {}),
        "mlp2 baseline": ("mlp2", "baseline", {}),
    }
    if a.models:
        unknown = [w for w in a.models if w not in models]
        if unknown:
            ap.error(f"--model: unknown {', '.join(map(repr, unknown))}; known: {', '.join(map(repr, models))}")
        models = {k: v for k, v in models.items() if k in a.models}
    sigmas = [float(v) for v in a.sigmas.split(",")] if a.sigmas else SIGMAS
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {"machine": platform.processor() or platform.machine(), "threads": a.threads, "torch": torch.__version__,
           "gaussreg": __version__, "commit": commit, "date": time.strftime("%Y-%m-%d"),
           "setup": {"train_images": a.train, "epochs": a.epochs, "optimizer": "adam lr 1e-3 batch 100",
                     "test_images": a.images, "mc_samples": a.samples, "noise": "x + sigma z, unclipped"},
           "models": {}}
    for i, (label, (arch, method, params)) in enumerate(models.items()):
        torch.manual_seed(i)
        model = mlp2(s.info) if arch == "mlp2" else build_model(arch, s.info)
        t0 = time.time()
        train(model, make_method(method, params), X, Y, a.epochs, seed=i)
        entry = {"test_accuracy": accuracy(model, TX, TY), "train_s": time.time() - t0, "sigmas": {}}
        for sigma in sigmas:  # seeded by the sigma's place in SIGMAS, so a subset draws the same noise
            j = SIGMAS.index(sigma) if sigma in SIGMAS else len(SIGMAS) + sigmas.index(sigma)
            entry["sigmas"][str(sigma)] = measure(model, x, sigma, a.samples, seed=1000 + j)
        res["models"][label] = entry
        print(json.dumps({label: entry}, indent=1), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    if a.figure:
        figure(res, a.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
