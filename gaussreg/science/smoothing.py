"""Certified robustness by randomized smoothing (Cohen, Rosenfeld and Kolter, ICML 2019).

The smoothed classifier g(x) = argmax_c P(f(x + eps) = c), eps ~ N(0, sigma^2 I), is
constant within the L2 ball of radius sigma * Phi^-1(pA) around x, where pA is a lower
bound of the top class's probability (their Theorem 1). `predict` and `certify` are
their PREDICT and CERTIFY: Monte Carlo counts of f's votes under noise, a two-sided
binomial test for PREDICT, a one-sided Clopper-Pearson bound for CERTIFY.

Noise is in [0,1] pixel units like everything else in gaussreg (the models fold the
dataset's normalisation into their first layer) and is not clipped, as in the paper,
so a radius is an L2 distance in pixel space. Sampling is batched on the model's device
and seeded: the same call gives the same answer."""

from __future__ import annotations

import math
import time
from typing import Callable, List, Optional, Sequence

import torch

from gaussreg.science.robustness import CERTIFY_DEFAULTS

ABSTAIN = -1
DEFAULT_N, DEFAULT_N0 = CERTIFY_DEFAULTS["n"], CERTIFY_DEFAULTS["n0"]
DEFAULT_ALPHA, DEFAULT_IMAGES = CERTIFY_DEFAULTS["alpha"], CERTIFY_DEFAULTS["images"]
TABLE_RADII = (0.0, 0.25, 0.5)  # the radii the fair table and the TUI show
CURVE_STEP = 0.05


def _device(model, x):
    p = next(model.parameters(), None)
    return p.device if p is not None else x.device


@torch.no_grad()
def sample_counts(model, x, sigma: float, num: int, batch: int, generator) -> torch.Tensor:
    """How often f(x + eps) votes for each class over `num` noise draws (a long tensor
    on the model's device; its length is the number of logits)."""
    dev = _device(model, x)
    x = x.to(dev)
    counts = None
    left = num
    while left > 0:
        b = min(batch, left)
        noise = torch.randn((b, *x.shape), generator=generator, device=dev)
        logits = model(x.unsqueeze(0) + sigma * noise)
        if counts is None:
            counts = torch.zeros(logits.shape[1], dtype=torch.long, device=dev)
        # counted into a fixed-size tensor: bincount sizes its output from the data, which
        # costs a GPU run a wait for the host at every batch
        votes = logits.argmax(1)
        counts.index_add_(0, votes, torch.ones_like(votes))
        left -= b
    return counts


def _generator(model, x, seed: int):
    return torch.Generator(device=_device(model, x)).manual_seed(seed)


def _check(sigma, n, alpha, batch, n0=None):
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, not {sigma}")
    if n < 1 or batch < 1:
        raise ValueError("n and batch must be >= 1")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), not {alpha}")
    if n0 is not None and not 1 <= n0 <= n:
        raise ValueError(f"n0 must be in [1, n], not {n0}")


def predict(model, x, sigma: float, n: int = DEFAULT_N, alpha: float = DEFAULT_ALPHA, batch: int = 1000,
            seed: int = 0, generator=None) -> int:
    """PREDICT: the smoothed classifier's class for one input x (no batch dimension), or
    ABSTAIN. The top two counts nA, nB of n draws go through a two-sided binomial test
    of nA ~ Bin(nA + nB, 1/2); the answer is returned only when its p-value is <= alpha,
    so a wrong (non-argmax) class comes back with probability at most alpha."""
    from scipy.stats import binomtest  # here: scipy.stats costs ~1-2 s at import, and every worker imports this module
    _check(sigma, n, alpha, batch)
    was_training = model.training
    model.eval()
    try:
        g = generator if generator is not None else _generator(model, x, seed)
        counts = sample_counts(model, x, sigma, n, batch, g).cpu()
    finally:
        model.train(was_training)
    top2 = counts.topk(min(2, len(counts)))
    nA = int(top2.values[0])
    nB = int(top2.values[1]) if len(counts) > 1 else 0
    if binomtest(nA, nA + nB, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(top2.indices[0])


def lower_confidence_bound(nA: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound of a binomial proportion:
    the alpha quantile of Beta(nA, n - nA + 1) (0 when nA = 0)."""
    from scipy.stats import beta  # here: scipy.stats costs ~1-2 s at import, and every worker imports this module
    return float(beta.ppf(alpha, nA, n - nA + 1)) if nA > 0 else 0.0


def certify(model, x, sigma: float, n0: int = DEFAULT_N0, n: int = DEFAULT_N, alpha: float = DEFAULT_ALPHA,
            batch: int = 1000, seed: int = 0, generator=None):
    """CERTIFY: (class, radius) of the smoothed classifier at one input x (no batch
    dimension), or (ABSTAIN, 0.0). n0 draws pick the top class cA; n further, independent
    draws count its votes nA; pA = the one-sided Clopper-Pearson lower bound of nA / n at
    level 1 - alpha. With pA > 1/2 the prediction is certified within the L2 radius
    sigma * Phi^-1(pA) (Theorem 1) with probability >= 1 - alpha over the draws."""
    from scipy.stats import norm  # here: scipy.stats costs ~1-2 s at import, and every worker imports this module
    _check(sigma, n, alpha, batch, n0)
    was_training = model.training
    model.eval()
    try:
        g = generator if generator is not None else _generator(model, x, seed)
        c_a = int(sample_counts(model, x, sigma, n0, batch, g).argmax())
        n_a = int(sample_counts(model, x, sigma, n, batch, g)[c_a])
    finally:
        model.train(was_training)
    p_a = lower_confidence_bound(n_a, n, alpha)
    if p_a < 0.5:
        return ABSTAIN, 0.0
    return c_a, float(sigma * norm.ppf(p_a))


def image_seed(seed: int, index: int) -> int:
    """Each test image has its own noise stream, so an image's certificate does not
    depend on which other images are certified with it."""
    return (seed << 32) + index


def pick_images(count: int, images: Optional[int]) -> List[int]:
    """`images` test indices spread evenly over the test set (the paper takes every
    20th image); all of them when images is None or >= count."""
    if images is None or images >= count:
        return list(range(count))
    return [i * count // images for i in range(images)]


def curve(records: Sequence[dict], step: float = CURVE_STEP) -> dict:
    """Certified accuracy (correct and radius >= r) at r = 0, step, 2 step, ... up to the
    largest certified radius (rounded up to the step)."""
    top = max((r["radius"] for r in records if r["correct"]), default=0.0)
    k = max(0, math.ceil(top / step - 1e-9))
    radii = [round(i * step, 10) for i in range(k + 1)]
    return {"radii": radii, "certified_accuracy": [certified_accuracy(records, r) for r in radii]}


def certified_accuracy(records: Sequence[dict], radius: float) -> float:
    """The fraction of images predicted correctly and certified at `radius` or more."""
    if not records:
        return 0.0
    return sum(1 for r in records if r["correct"] and r["radius"] >= radius) / len(records)


def certify_dataset(model, images, labels, sigma: float, n0: int = DEFAULT_N0, n: int = DEFAULT_N,
                    alpha: float = DEFAULT_ALPHA, batch: int = 1000, seed: int = 0,
                    indices: Optional[Sequence[int]] = None,
                    should_stop: Optional[Callable[[], bool]] = None,
                    progress: Optional[Callable[[int, int], None]] = None) -> Optional[dict]:
    """CERTIFY for test images[indices]: the content of `certify-<sigma>.json` without
    the run's own fields, or None when should_stop() turned true (checked per image)."""
    _check(sigma, n, alpha, batch, n0)
    indices = list(range(len(images))) if indices is None else list(indices)
    records = []
    t0 = time.time()
    for k, i in enumerate(indices):
        if should_stop is not None and should_stop():
            return None
        x = images[i]
        g = _generator(model, x, image_seed(seed, i))
        c, radius = certify(model, x, sigma, n0, n, alpha, batch, generator=g)
        y = int(labels[i])
        records.append({"index": int(i), "label": y, "prediction": c, "radius": radius,
                        "correct": c == y})
        if progress is not None:
            progress(k + 1, len(indices))
    elapsed = time.time() - t0
    forwards = len(indices) * (n0 + n)
    return {
        "sigma": float(sigma), "n0": n0, "n": n, "alpha": alpha, "seed": seed, "batch": batch,
        "images": len(records), "abstain_rate": sum(r["prediction"] == ABSTAIN for r in records) / max(1, len(records)),
        "certified_accuracy": {f"{r:g}": certified_accuracy(records, r) for r in TABLE_RADII},
        "curve": curve(records), "per_image": records, "time_s": elapsed,
        "forward_passes_per_s": forwards / elapsed if elapsed > 0 else None,
    }
