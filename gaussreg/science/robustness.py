"""The robustness metric R of paper Sec. 4.1: how often predictions survive noise."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional

# Randomized-smoothing certification (gaussreg.science.smoothing; Cohen et al.'s n, n0 and alpha)
# after training: torch-free here so that specs can name the defaults without torch.
CERTIFY_DEFAULTS = {"n": 10_000, "n0": 100, "alpha": 0.001, "images": 500}
CERTIFY_SIGMA = 0.25  # for methods trained without a noise level


def certify_batch(device_type: str) -> int:
    """Noisy copies per forward pass of certification when none is asked for: a GPU keeps
    busy only with larger batches; a CPU gains nothing past ~1000 and needs the memory less."""
    return 5000 if device_type == "cuda" else 1000


def default_sigmas(count: int = 30, top: float = 0.5) -> List[float]:
    """The paper's set A: `count` evenly spaced noise levels in [0, top] (the values of
    torch.linspace in float64, computed without importing torch)."""
    if count == 1:
        return [0.0]
    step = top / (count - 1)
    return [i * step if i < count // 2 else top - (count - 1 - i) * step for i in range(count)]


@dataclass
class Robustness:
    sigmas: List[float]
    per_sigma: List[float]  # fraction of images whose prediction survives all samples
    score: float  # trapezoidal average of per_sigma over the sigma range
    samples: int
    accuracy_per_sigma: Optional[List[float]] = None  # only with labels
    clean_accuracy: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


def score_of(sigmas, per_sigma) -> float:
    """Trapezoidal average of a per-sigma curve (its mean for a single sigma), over the
    sigmas in increasing order whatever order they were given in (`--sigmas 0.25,0,0.5`)."""
    pairs = sorted(zip((float(v) for v in sigmas), (float(v) for v in per_sigma)), key=lambda sp: sp[0])
    s, p = [sp[0] for sp in pairs], [sp[1] for sp in pairs]
    if len(s) == 1 or s[-1] == s[0]:
        return sum(p) / len(p)
    area = sum((s[i + 1] - s[i]) * (p[i] + p[i + 1]) / 2 for i in range(len(s) - 1))
    return area / (s[-1] - s[0])


def robustness(model, images, labels=None, sigmas=None, samples: int = 1, seed: int = 0,
               clip: bool = False, batch_size: int = 4096, should_stop=None, progress=None) -> Robustness:
    """Prediction consistency under noise, per sigma (Sec. 4.1).

    For each image and sigma, `samples` noise vectors of norm exactly sigma sqrt(n)
    (n = pixels x channels, the expected energy of N(0, sigma^2 I)) are drawn; the
    image is robust at sigma when every noisy prediction equals the clean one. All
    sigmas of a chunk of images go through the model as one batch, on the model's
    device; results are deterministic for a seed (and batch_size). `should_stop` is
    asked before every forward pass: when it says yes, EvaluationStopped is raised (a
    cancel must not wait for the whole evaluation). `progress(done, total)` is told
    the noisy draws done (images x samples, each at every sigma) after each forward pass."""
    import torch  # here, so that reading results and specs never needs torch
    with torch.no_grad():
        return _robustness(model, images, labels, sigmas, samples, seed, clip, batch_size, should_stop, progress)


class EvaluationStopped(Exception):
    """should_stop() said yes during the evaluation."""


def _robustness(model, images, labels, sigmas, samples, seed, clip, batch_size, should_stop, progress) -> Robustness:
    import torch  # here: reading results and specs never needs torch
    if samples < 1:
        raise ValueError("samples must be >= 1")
    params = next(model.parameters(), None)
    dev = params.device if params is not None else images.device
    sig_list = [float(v) for v in (default_sigmas() if sigmas is None else sigmas)]
    sig = torch.tensor(sig_list, dtype=torch.float32, device=dev)
    if (sig < 0).any():
        raise ValueError("sigmas must be non-negative")
    S = len(sig)
    shape = tuple(images.shape[1:])
    n = math.prod(shape)
    radius = (sig * math.sqrt(n)).view(S, 1, *([1] * len(shape)))
    g = torch.Generator(device=dev).manual_seed(seed)
    robust = torch.zeros(S, dtype=torch.long, device=dev)
    correct = torch.zeros(S, dtype=torch.long, device=dev)
    clean_correct = torch.zeros((), dtype=torch.long, device=dev)
    chunk = max(1, batch_size // S)
    done = 0  # noisy draws of an image (at every sigma) so far, for `progress`
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(images), chunk):
            x = images[i:i + chunk].to(dev)
            clean = model(x).argmax(1)
            agree = torch.ones(S, len(x), dtype=torch.bool, device=dev)
            y = labels[i:i + chunk].to(dev) if labels is not None else None
            if y is not None:
                clean_correct += (clean == y).sum()
            for _ in range(samples):
                if should_stop is not None and should_stop():
                    raise EvaluationStopped()
                z = torch.randn((S, len(x), *shape), generator=g, device=dev)
                z = z * (radius / z.flatten(2).norm(dim=2).view(S, len(x), *([1] * len(shape))))
                xn = x.unsqueeze(0) + z
                if clip:
                    xn = xn.clamp(0, 1)
                pred = model(xn.flatten(0, 1)).argmax(1).view(S, len(x))
                agree &= pred == clean
                if y is not None:
                    correct += (pred == y).sum(1)
                done += len(x)
                if progress is not None:
                    progress(done, len(images) * samples)
            robust += agree.sum(1)
    finally:
        model.train(was_training)
    N = len(images)
    per_sigma = (robust.double() / N).tolist()
    out = Robustness(sig_list, per_sigma, score_of(sig_list, per_sigma), samples)
    if labels is not None:
        out.accuracy_per_sigma = (correct.double() / (N * samples)).tolist()
        out.clean_accuracy = float(clean_correct) / N
    return out
