"""The expected first activation E[act(X)], X ~ N(mu, sigma^2), elementwise (Eq. 1 beyond ReLU).

Eq. 1 needs the mean of the first activation of the network for the Gaussian that the
first affine layer makes of the input noise. ReLU's is T(mu, sigma) (gaussreg.science.moments);
here are the others modern networks start with. With a = mu / sigma, b = (c - mu) / sigma
for a threshold c, Phi and phi the standard normal cdf and pdf:

- LeakyReLU (slope s): s mu + (1 - s) T(mu, sigma), since leaky(x) = s x + (1 - s) relu(x). Exact.
- ReLU6: T(mu, sigma) - T(mu - 6, sigma), since relu6(x) = relu(x) - relu(x - 6). Exact.
- GELU (erf form, x Phi(x)): mu Phi(mu / s) + (sigma^2 / s) phi(mu / s), s = sqrt(1 + sigma^2). Exact.
- Hardswish (0 below -3, x above 3, x (x + 3) / 6 between): the partial moments of X on
  (3, inf) and (-3, 3), written with Phi and phi at b = (+-3 - mu) / sigma. Exact.
- ELU (alpha): T(mu, sigma) + alpha (E[e^X 1{X < 0}] - Phi(-a)), where the Gaussian's moment
  generating function gives E[e^X 1{X < 0}] = exp(mu + sigma^2 / 2) Phi(-a - sigma), computed as
  phi(a) R(a + sigma) with the Mills ratio R (erfcx) where a + sigma >= 0, so that no factor
  overflows. Exact.
- SiLU / Swish (x sigmoid(x)): sigmoid(x) ~ sum_i w_i Phi(k_i x), three probits (SILU_MIX, fitted
  to minimise max |x sigmoid(x) - x sum_i w_i Phi(k_i x)|, 1.8e-4; the single probit
  Phi(sqrt(pi/8) x) of equal slope at 0 is off by 2.5e-2), each term GELU's form scaled:
  E[X Phi(k X)] = mu Phi(k mu / s) + (k sigma^2 / s) phi(k mu / s), s = sqrt(1 + k^2 sigma^2).
  Approximate: the error bound is in ERRORS.
- GELU (tanh form): its erf form's expectation. Approximate: error in ERRORS.

Each is computed in float32 at least, with autocast off (half precision loses these sums),
and differentiated by autograd through the formulas above: every Phi is an erfc (accurate in
both tails), every ratio is clamped where Phi and phi are already exactly 0 or 1, and
sigma = 0 gives act(mu) exactly (where the formulas divide by sigma they run with sigma = 1
there and are discarded, so no gradient is ever 0 * inf; the approximations are replaced by
act(mu) there). A fused or compiled kernel did not pay for these
(bench/README.md, "Other first activations").

Only ReLU's variance is implemented (gaussreg.science.adf): the regularizer's depth > 1
passes moments through ReLU alone."""

from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple, Optional

import torch
from torch import nn

from gaussreg.science.moments import _compute_dtype, relu_mean

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_B_MAX = 50.0  # beyond |b| = 50, Phi and phi are exactly 0/1 even in float64
# (w_i, k_i) of sigmoid(x) ~ sum_i w_i Phi(k_i x); the weights sum to 1, so both tails are exact
SILU_MIX = ((0.11660411, 0.34666183), (0.54906372, 0.54277703), (1.0 - 0.11660411 - 0.54906372, 0.85762267))


def _upper(b):
    """P(Z > b) = erfc(b / sqrt 2) / 2: accurate in the upper tail (and 1 - tiny below)."""
    return 0.5 * torch.special.erfc(b * _INV_SQRT_2)


def _pdf(b):
    return torch.exp(-0.5 * b * b) * _INV_SQRT_2PI


def _between(b1, q1, b2, q2):
    """P(b1 < Z < b2) from q = P(Z > |b|) (one erfc each), without the cancellation of
    Phi(b2) - Phi(b1) in either tail: q1 - q2 for 0 <= b1 < b2 (two small upper tails),
    q2 - q1 for b1 < b2 <= 0, 1 - q1 - q2 across 0."""
    return torch.where(b1 >= 0, q1 - q2, torch.where(b2 <= 0, q2 - q1, 1.0 - q1 - q2))


def _safe(sigma):
    """(sigma > 0, sigma with 1 where it is 0): the formulas divide by sigma."""
    positive = sigma > 0
    return positive, torch.where(positive, sigma, torch.ones_like(sigma))


def _b(c, mu, s):
    return ((c - mu) / s).clamp(-_B_MAX, _B_MAX)


def leaky_relu_mean(mu, sigma, slope: float = 0.01):
    """E[leaky_relu(X)] = slope mu + (1 - slope) T(mu, sigma)."""
    return slope * mu + (1.0 - slope) * relu_mean(mu, sigma)


def relu6_mean(mu, sigma):
    """E[min(max(X, 0), 6)] = T(mu, sigma) - T(mu - 6, sigma)."""
    return relu_mean(mu, sigma) - relu_mean(mu - 6.0, sigma)


def _x_phi_kx(mu, sigma, k: float):
    """E[X Phi(k X)] = mu Phi(k mu / s) + (k sigma^2 / s) phi(k mu / s), s = sqrt(1 + k^2 sigma^2)
    (Stein's lemma on the probit of a Gaussian); sigma = 0 gives mu Phi(k mu)."""
    s = torch.sqrt(1.0 + (k * sigma) ** 2)
    r = k * mu / s
    return mu * _upper(-r) + (k * sigma * sigma / s) * _pdf(r)


def gelu_mean(mu, sigma):
    """E[X Phi(X)], GELU's erf form; exact."""
    return _x_phi_kx(mu, sigma, 1.0)


def silu_mean(mu, sigma):
    """E[X sigmoid(X)] with sigmoid(x) ~ sum_i w_i Phi(k_i x) (SILU_MIX); approximate (ERRORS["SiLU"])."""
    out = None
    for w, k in SILU_MIX:
        term = w * _x_phi_kx(mu, sigma, k)
        out = term if out is None else out + term
    return out


def hardswish_mean(mu, sigma):
    """E[hardswish(X)] = E[X 1{X > 3}] + E[(X^2 + 3X) 1{-3 < X < 3}] / 6, with, for
    b1 = (-3 - mu) / sigma, b2 = (3 - mu) / sigma, P = P(-3 < X < 3):
    E[X 1{X > 3}] = mu Phi(-b2) + sigma phi(b2),
    E[(X^2 + 3X) 1{-3 < X < 3}] = (mu^2 + sigma^2 + 3 mu) P + sigma (mu phi(b1) - (mu + 6) phi(b2))."""
    positive, s = _safe(sigma)
    b1, b2 = _b(-3.0, mu, s), _b(3.0, mu, s)
    q1, q2 = _upper(b1.abs()), _upper(b2.abs())  # two erfc for all of it: the cost is in them
    p2 = _pdf(b2)
    upper = mu * torch.where(b2 >= 0, q2, 1.0 - q2) + s * p2
    middle = (mu * mu + s * s + 3.0 * mu) * _between(b1, q1, b2, q2) + s * (mu * _pdf(b1) - (mu + 6.0) * p2)
    return torch.where(positive, upper + middle / 6.0, nn.functional.hardswish(mu))


def elu_mean(mu, sigma, alpha: float = 1.0):
    """E[elu(X)] = T(mu, sigma) + alpha (exp(mu + sigma^2/2 + log Phi(-a - sigma)) - Phi(-a))."""
    positive, s = _safe(sigma)
    a = mu / s  # unclamped: a clamped ratio would make the exponent wrong by (a - 50) sigma
    z = a + s
    # E[e^X 1{X < 0}] = exp(mu + s^2/2) Phi(-z) = phi(a) R(z), R(z) = Phi(-z) / phi(z) = sqrt(pi/2) erfcx(z / sqrt 2)
    # the Mills ratio (the exponents cancel exactly: mu + s^2/2 - z^2/2 = -a^2/2): for z >= 0 no factor
    # overflows or underflows to 0 * inf; for z < 0, mu + s^2/2 < 0 and the first form is safe
    mills = _pdf(a) * (math.sqrt(math.pi / 2) * torch.special.erfcx(z.clamp_min(0) * _INV_SQRT_2))
    direct = torch.exp((mu + 0.5 * s * s).clamp_max(0)) * _upper(z.clamp_max(0))
    neg = torch.where(z >= 0, mills, direct) - _upper(a.clamp(-_B_MAX, _B_MAX))
    exact_zero = torch.expm1(mu.clamp_max(0))  # sigma = 0: (elu(mu) - relu(mu)) / alpha
    return relu_mean(mu, sigma) + alpha * torch.where(positive, neg, exact_zero)


class Expectation(NamedTuple):
    """How gaussreg takes a first activation's mean: `mean(act, mu, sigma)`, whether it is
    exact, and for an approximation the measured max abs error of the mean (bench/README.md)."""

    name: str
    mean: Callable
    exact: bool
    error: float
    variance: bool  # depth > 1 propagates mean and variance through it (gaussreg.science.adf)


# Bounds on |E_approx - E[act(X)]| for every mu and sigma: sup_x |approx(x) - act(x)| (1.78e-4 for
# the probit mixture, 4.73e-4 between GELU's tanh and erf forms, on a 1e-5 grid in float64), reached
# as sigma -> 0; tests/test_first_activations.py measures the mean's error by quadrature (bench/README.md)
ERRORS = {"SiLU": 1.8e-4, "GELU (tanh)": 4.8e-4}

_BY_TYPE: Dict[type, Expectation] = {
    nn.ReLU: Expectation("ReLU", lambda act, mu, sigma: relu_mean(mu, sigma), True, 0.0, True),
    nn.LeakyReLU: Expectation("LeakyReLU", lambda act, mu, sigma: leaky_relu_mean(mu, sigma, act.negative_slope),
                              True, 0.0, False),
    nn.ReLU6: Expectation("ReLU6", lambda act, mu, sigma: relu6_mean(mu, sigma), True, 0.0, False),
    nn.Hardswish: Expectation("Hardswish", lambda act, mu, sigma: hardswish_mean(mu, sigma), True, 0.0, False),
    nn.ELU: Expectation("ELU", lambda act, mu, sigma: elu_mean(mu, sigma, act.alpha), True, 0.0, False),
    nn.SiLU: Expectation("SiLU", lambda act, mu, sigma: silu_mean(mu, sigma), False, ERRORS["SiLU"], False),
}
_GELU = Expectation("GELU", lambda act, mu, sigma: gelu_mean(mu, sigma), True, 0.0, False)
_GELU_TANH = Expectation("GELU (tanh)", lambda act, mu, sigma: gelu_mean(mu, sigma), False, ERRORS["GELU (tanh)"],
                         False)

SUPPORTED_NAMES = "ReLU, LeakyReLU, ReLU6, GELU, Hardswish, ELU, SiLU"


def expectation(act: nn.Module) -> Optional[Expectation]:
    """The expectation of a first activation module, None if gaussreg has none for it
    (exact types only: a subclass may compute something else)."""
    if type(act) is nn.GELU:
        return _GELU if act.approximate == "none" else _GELU_TANH
    return _BY_TYPE.get(type(act))


def is_activation(mod: nn.Module) -> bool:
    """Whether gaussreg knows the mean of this module as a first activation."""
    return expectation(mod) is not None


def expected_activation(act: nn.Module, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[act(X)], X ~ N(mu, sigma^2) elementwise (broadcast), in float32 at least with
    autocast off, returned in the promoted dtype of mu and sigma (as relu_mean)."""
    e = expectation(act)
    if e is None:
        raise TypeError(f"gaussreg has no expected value for the activation {type(act).__name__}; "
                        f"supported are {SUPPORTED_NAMES}")
    mu, sigma = torch.as_tensor(mu), torch.as_tensor(sigma)
    out_dtype, dt = _compute_dtype(mu, sigma)
    with torch.autocast(mu.device.type, enabled=False):
        mu, sigma = mu.to(dt), sigma.to(dt)
        out = e.mean(act, mu, sigma)
        if not e.exact:  # noise-free units take the activation itself, not its approximation
            out = torch.where(sigma > 0, out, act(mu))
        return out.to(out_dtype)
