"""Training methods, each a loss on a batch: baseline, augment, regularizer, randsign, fgsm.

Noise is in [0,1] pixel units and drawn on the batch's device from the run's
generator, so a run is reproducible from its seed and never syncs the host."""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .regularizer import moment_loss
from .spec import ParamError, check_params  # the methods' parameter schema lives in the spec


class Loss(NamedTuple):
    total: torch.Tensor
    terms: Dict[str, torch.Tensor]  # the named parts of the objective, for logging
    logits: Optional[torch.Tensor]  # clean logits when the method computes them


class Method:
    """Clean training. Subclasses change the epoch's items (`copies`, `batch`) or the loss."""

    name = "baseline"
    copies = 1  # items per clean training image in one epoch

    def __init__(self, **params):
        self.params = check_params(self.name, params)

    def prepare(self, n: int, image_shape, g: torch.Generator) -> None:
        """Called once per run with the training set size."""

    def batch(self, X, Y, idx, g: torch.Generator):
        return X[idx], Y[idx]

    def loss(self, model, x, y, g: torch.Generator) -> Loss:
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        return Loss(ce, {"ce": ce}, logits)

    def objective(self, model, x, y, g: torch.Generator) -> Loss:
        """The validation objective: the training loss, minus training-only randomness."""
        return self.loss(model, x, y, g)


class Augment(Method):
    """N-fold Gaussian data augmentation: each epoch holds every clean image plus
    `folds` noisy copies x + sigma z, with independent noise per image and per copy,
    shuffled together; the epoch costs (folds + 1) clean epochs."""

    name = "augment"

    def __init__(self, **params):
        super().__init__(**params)
        self.copies = self.params["folds"] + 1
        self.fixed: Optional[torch.Tensor] = None

    def prepare(self, n, image_shape, g):
        self.n = n
        if not self.params["fresh_noise"]:
            # A once-augmented dataset: the noise is drawn once from the seed. Half
            # precision halves the memory of this (folds x n) noise bank.
            self.fixed = torch.randn((self.params["folds"], n, *image_shape), generator=g,
                                     device=g.device).half()

    def batch(self, X, Y, idx, g, fixed: bool = True):
        example, copy = idx % len(X), idx // len(X)
        x = X[example]
        noisy = (copy > 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        if fixed and self.fixed is not None:
            z = self.fixed[(copy - 1).clamp_min(0), example].float()
        else:
            z = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return x + self.params["sigma"] * noisy * z, Y[example]

    def objective(self, model, x, y, g):
        # the same (folds + 1)-fold objective on validation images, with noise from the
        # caller's generator (reseeded per evaluation, so epochs compare)
        idx = torch.arange(len(x) * self.copies, device=x.device)
        return Method.loss(self, model, *self.batch(x, y, idx, g, fixed=False), g)


class Regularizer(Method):
    """CE(f(x), y) + alpha CE(rest_k(mu_k), y) (Eq. 3; depth k = 1 is the paper)."""

    name = "regularizer"

    def loss(self, model, x, y, g):
        m = moment_loss(model, x, y, self.params["sigma"], self.params["alpha"], self.params["depth"])
        return Loss(m.total, {"ce": m.ce, "reg": m.reg}, m.logits)


def random_sign(x, eps: float, p: float, g) -> torch.Tensor:
    """g(x) = x + eps x l(x), l(x) = sign(x) w.p. p, else -sign(x); x l(x) = +-|x|."""
    s = torch.where(torch.rand(x.shape, generator=g, device=x.device) < p, 1.0, -1.0).to(x.dtype)
    return x + eps * x.abs() * s


class RandSign(Method):
    """The seed paper's random sign perturbation, on the input, the first hidden
    layer, or both; training only (validation and test see the clean network)."""

    name = "randsign"

    def loss(self, model, x, y, g):
        eps, p, where = self.params["eps"], self.params["p"], self.params["where"]
        if where in ("input", "both"):
            x = random_sign(x, eps, p, g)
        h = torch.relu(model.first(x))
        if where in ("hidden", "both"):
            h = random_sign(h, eps, p, g)
        logits = model.rest(h)
        ce = F.cross_entropy(logits, y)
        return Loss(ce, {"ce": ce}, logits)

    def objective(self, model, x, y, g):
        return Method.loss(self, model, x, y, g)


class FGSM(Method):
    """FGSM adversarial training: 0.5 CE(x) + 0.5 CE(clamp(x + eps sign(grad_x CE), 0, 1))."""

    name = "fgsm"

    def loss(self, model, x, y, g):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logits = model(x)
            ce = F.cross_entropy(logits, y)
            # the clean graph is reused for the training step, so keep it
            (grad,) = torch.autograd.grad(ce, x, retain_graph=True)
            x_adv = (x + self.params["eps"] * grad.sign()).clamp(0, 1).detach()
            adv = F.cross_entropy(model(x_adv), y)
        return Loss(0.5 * ce + 0.5 * adv, {"ce": ce, "adv": adv}, logits)


METHODS = {cls.name: cls for cls in (Method, Augment, Regularizer, RandSign, FGSM)}


def make_method(name: str, params: dict) -> Method:
    if name not in METHODS:
        raise ParamError("method", f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name](**params)
