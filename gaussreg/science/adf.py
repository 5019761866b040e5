"""Assumed density filtering (ADF): the noise's mean and diagonal variance pushed
through the network layer by layer, beyond the paper's split after the first ReLU.

The paper (Sec. 3.3) computes the exact mean mu3 = T(mu2, sigma2) after the first
affine layer + ReLU and treats the rest of the network as affine around it (Eq. 4).
With `depth = k` the split moves to after the k-th ReLU: every layer before it gets a
Gaussian with diagonal covariance as input and passes on the Gaussian that matches its
output's mean and variance (moment matching, as in Gast & Roth 2018):

- Conv2d / Linear (and the folded input normalisation): mean W mu + b, variance
  (W . W) var (Eq. 5 applied to a per-unit variance map). Exact for a diagonal input;
  the correlations the layer creates are dropped at the next nonlinearity.
- ReLU: the rectified Gaussian's mean T(mu, sigma) (Eq. 1) and variance.
- MaxPool2d: Clark's (1961) mean and variance of the max of two Gaussians, applied
  pairwise along the window, each intermediate max moment-matched to a Gaussian, with
  correlation 0 between the inputs: the standard approximation (it ignores that
  neighbouring units share noise through the layer before).
- Flatten, Identity: reshape, no change.

Anything else in the propagated part (BatchNorm included, which no built-in model has)
is refused with a sentence naming it. A depth beyond the network's number of ReLUs
propagates to the logits, the same as "all".

Standard deviations below the dtype's resolution (var < eps^2) count as exactly zero:
sqrt has an infinite slope at 0, and a deterministic unit must stay deterministic (so
sigma -> 0 gives the clean pass exactly). Under bf16/fp16 autocast the propagation runs
in float32."""

from __future__ import annotations

import math
from typing import List, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from gaussreg.science.moments import _reduce_to

Depth = Union[int, str]

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_A_MAX = 50.0  # beyond |a| = 50, Phi and phi are exactly 0/1 even in float64

SUPPORTED = (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Identity)


def check_depth(depth: Depth) -> Depth:
    if depth == "all" or (isinstance(depth, int) and not isinstance(depth, bool) and depth >= 1):
        return depth
    raise ValueError(f"depth must be an integer >= 1 or 'all', not {depth!r}")


def layers(rest: nn.Module) -> List[nn.Module]:
    """The modules of `rest` in order, nested Sequentials flattened."""
    if isinstance(rest, nn.Sequential):
        return [m for child in rest for m in layers(child)]
    return [rest]


def split(rest: nn.Module, depth: Depth) -> Tuple[List[nn.Module], List[nn.Module]]:
    """(head, tail): the modules of `rest` up to and including the (depth-1)-th ReLU
    of `rest` (the first ReLU of the network is GaussNet's own), and the rest.
    The head is what ADF propagates; rest_k = tail."""
    check_depth(depth)
    mods = layers(rest)
    if depth == 1:
        return [], mods
    cut = len(mods)
    if depth != "all":
        seen = 1
        for i, m in enumerate(mods):
            if isinstance(m, nn.ReLU):
                seen += 1
                if seen == depth:
                    cut = i + 1
                    break
    head = mods[:cut]
    for m in head:
        if not isinstance(m, SUPPORTED):
            raise TypeError(f"depth {depth!r} propagates moments through {type(m).__name__}, which is not "
                            f"supported (only Conv2d, Linear, ReLU, MaxPool2d, Flatten, Identity); "
                            f"use a smaller depth")
    return head, mods[cut:]


def std(var: torch.Tensor) -> torch.Tensor:
    """sqrt(var), with variances below eps^2 of the dtype counted as 0 (zero value and
    zero gradient): the variance floor that keeps d sqrt / d var finite."""
    floor = torch.finfo(var.dtype).eps ** 2
    keep = var > floor
    return torch.where(keep, torch.where(keep, var, torch.ones_like(var)).sqrt(), torch.zeros_like(var))


def _cdf_pdf(a: torch.Tensor):
    """Phi(a), Phi(-a) and phi(a); erfc keeps both tails accurate."""
    v = a * _INV_SQRT_2
    return 0.5 * torch.special.erfc(-v), 0.5 * torch.special.erfc(v), torch.exp(-v * v) * _INV_SQRT_2PI


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den clamped to [-50, 50]; den = 0 gives +-50 (or 0 when num = 0)."""
    return (num / den.clamp_min(torch.finfo(den.dtype).tiny)).clamp(-_A_MAX, _A_MAX)


def _relu_var_ratio(a, cdf, q, pdf):
    """Var[max(X, 0)] / sigma^2 as a function of a = mu / sigma (see relu_variance)."""
    r = pdf - a * q
    pos = 1 + (a * a - 1) * q - a * pdf - r * r
    t = a * cdf + pdf
    neg = (a * a + 1) * cdf + a * pdf - t * t
    return torch.where(a >= 0, pos, neg)


def relu_variance(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Var[max(X, 0)] for X ~ N(mu, sigma^2), written without the cancellation of
    E[max^2] - T^2 that loses everything in float32 when mu >> sigma.

    With a = mu / sigma, Q = Phi(-a) and r = phi(a) - a Q (both tiny for large a):
    Var / sigma^2 = 1 + (a^2 - 1) Q - a phi - r^2 for a >= 0, and
    (a^2 + 1) Phi + a phi - (a Phi + phi)^2 for a < 0 (where every term is small)."""
    a = _ratio(mu, sigma)
    return (sigma * sigma * _relu_var_ratio(a, *_cdf_pdf(a))).clamp_min(0)


class _ReluMoments(torch.autograd.Function):
    """(T, Var) of max(X, 0), X ~ N(mu, sigma^2), with the analytic gradients
    dT/dmu = Phi, dT/dsigma = phi, dVar/dmu = 2 T Phi(-a), dVar/dsigma = 2 (sigma Phi - T phi)
    (from dE[relu^2]/dmu = 2T and, by Stein's lemma, dE[relu^2]/dsigma = 2 sigma Phi):
    three saved tensors instead of the dozen autograd would keep."""

    @staticmethod
    def forward(ctx, mu, sigma):
        a = _ratio(mu, sigma)
        cdf, q, pdf = _cdf_pdf(a)
        t = mu * cdf + sigma * pdf
        var = (sigma * sigma * _relu_var_ratio(a, cdf, q, pdf)).clamp_min(0)
        ctx.save_for_backward(sigma, cdf, pdf, t)
        ctx.mu_shape = mu.shape
        return t, var

    @staticmethod
    def backward(ctx, g_t, g_var):
        sigma, cdf, pdf, t = ctx.saved_tensors
        g_mu = g_t * cdf + g_var * 2 * t * (1 - cdf)
        g_sigma = g_t * pdf + g_var * 2 * (sigma * cdf - t * pdf)
        return _reduce_to(g_mu, ctx.mu_shape), _reduce_to(g_sigma, sigma.shape)


def relu_moments(mu: torch.Tensor, var: torch.Tensor):
    """Mean T(mu, sigma) (Eq. 1) and variance of a rectified Gaussian."""
    return _ReluMoments.apply(mu, std(var))


class _MaxMoments(torch.autograd.Function):
    """Clark's moments of max(X1, X2) (see max_moments) with analytic gradients; with
    theta^2 = v1 + v2, d = m1 - m2, alpha = d / theta, Phi = Phi(alpha), Q = Phi(-alpha):
    dE/dm1 = Phi, dE/dm2 = Q, dE/dv1 = dE/dv2 = phi / (2 theta);
    dVar/dm1 = 2 (Phi (d Q - theta phi) + v1 phi / theta), dVar/dm2 = 2 (-Q (d Phi + theta phi) + v2 phi / theta),
    dVar/dv1 = Phi + B, dVar/dv2 = Q + B, B = phi / (2 theta) (d (Q - Phi) - 2 theta phi - (v1 - v2) alpha / theta)
    (from E[max^2] = (m1^2 + v1) Phi + (m2^2 + v2) Q + (m1 + m2) theta phi)."""

    @staticmethod
    def forward(ctx, m1, v1, m2, v2):
        theta = std(v1 + v2)
        d = m1 - m2
        alpha = _ratio(d, theta)
        cdf, q, pdf = _cdf_pdf(alpha)
        mean = m1 * cdf + m2 * q + theta * pdf
        var = v1 * cdf + v2 * q + d * d * cdf * q + d * theta * pdf * (q - cdf) - theta * theta * pdf * pdf
        ctx.save_for_backward(m1, v1, m2, v2, theta, cdf, pdf)
        return mean, var.clamp_min(0)

    @staticmethod
    def backward(ctx, g_mean, g_var):
        m1, v1, m2, v2, theta, cdf, pdf = ctx.saved_tensors
        q = 1 - cdf
        d = m1 - m2
        # phi / theta -> 0 where theta = 0 (a deterministic pair: the step, no density)
        inv = torch.where(theta > 0, 1 / torch.where(theta > 0, theta, torch.ones_like(theta)), torch.zeros_like(theta))
        alpha = _ratio(d, theta)
        p_t = pdf * inv
        b = 0.5 * p_t * (d * (q - cdf) - 2 * theta * pdf - (v1 - v2) * alpha * inv)
        g_m1 = g_mean * cdf + g_var * 2 * (cdf * (d * q - theta * pdf) + v1 * p_t)
        g_m2 = g_mean * q + g_var * 2 * (v2 * p_t - q * (d * cdf + theta * pdf))
        g_v1 = g_mean * 0.5 * p_t + g_var * (cdf + b)
        g_v2 = g_mean * 0.5 * p_t + g_var * (q + b)
        return g_m1, g_v1, g_m2, g_v2


def max_moments(m1, v1, m2, v2):
    """Clark's mean and variance of max(X1, X2) for independent X1 ~ N(m1, v1),
    X2 ~ N(m2, v2): theta^2 = v1 + v2, d = m1 - m2, alpha = d / theta,
    E = m1 Phi(alpha) + m2 Phi(-alpha) + theta phi(alpha) (exactly m1 or m2 when theta = 0),
    Var = v1 Phi + v2 Phi(-alpha) + d^2 Phi Phi(-alpha) + d theta phi (Phi(-alpha) - Phi) - theta^2 phi^2
    (the shift-invariant form, free of the E[max^2] - E^2 cancellation)."""
    shape = torch.broadcast_shapes(m1.shape, v1.shape, m2.shape, v2.shape)
    return _MaxMoments.apply(*(t.expand(shape) for t in (m1, v1, m2, v2)))


def maxpool_moments(pool: nn.MaxPool2d, mu: torch.Tensor, var: torch.Tensor):
    """Clark's max pairwise over each pooling window (in row-major order)."""
    k = nn.modules.utils._pair(pool.kernel_size)
    s = nn.modules.utils._pair(pool.stride if pool.stride is not None else pool.kernel_size)
    if (pool.padding not in (0, (0, 0)) or pool.dilation not in (1, (1, 1)) or pool.ceil_mode
            or pool.return_indices):
        raise TypeError("moment propagation supports MaxPool2d without padding, dilation, ceil_mode "
                        f"or return_indices, not {pool}")

    def windows(t):  # (N, C, Ho, Wo, kh * kw)
        w = t.unfold(2, k[0], s[0]).unfold(3, k[1], s[1])
        return w.reshape(*w.shape[:4], k[0] * k[1])

    wm, wv = windows(mu), windows(var)
    m, v = wm[..., 0], wv[..., 0]
    for j in range(1, wm.shape[-1]):
        m, v = max_moments(m, v, wm[..., j], wv[..., j])
    return m, v


def affine_variance(layer: nn.Module, var: torch.Tensor) -> torch.Tensor:
    """(A . A) var (Eq. 5): a diagonal input variance through a Conv2d or Linear layer with
    squared weights and no bias (same stride and padding); a folded input normalisation
    (`input_std`, gaussreg.science.models) divides by std^2 first."""
    std = getattr(layer, "input_std", None)
    if isinstance(layer, nn.Conv2d):
        if std is not None:
            var = var / std.square()
        if layer.padding_mode != "zeros":
            raise ValueError("only zero padding keeps the border noise-free")
        return F.conv2d(var, layer.weight.to(var.dtype).square(), None, layer.stride, layer.padding,
                        layer.dilation, layer.groups)
    if isinstance(layer, nn.Linear):
        if std is not None:
            var = var / (std.view(1, -1, *([1] * (var.ndim - 2))) if var.ndim > 2 else std).square()
        return F.linear(var.flatten(1), layer.weight.to(var.dtype).square())
    raise TypeError(f"the first layer must be Conv2d or Linear, not {type(layer).__name__}")


def layer_moments(mod: nn.Module, mu: torch.Tensor, var: torch.Tensor):
    """One module's output mean and variance for a diagonal Gaussian input."""
    if isinstance(mod, (nn.Conv2d, nn.Linear)):
        return mod(mu), affine_variance(mod, var)  # Eq. 5 with a per-unit variance map
    if isinstance(mod, nn.ReLU):
        return relu_moments(mu, var)
    if isinstance(mod, nn.MaxPool2d):
        return maxpool_moments(mod, mu, var)
    if isinstance(mod, (nn.Flatten, nn.Identity)):
        return mod(mu), mod(var.expand_as(mu))
    raise TypeError(f"moment propagation does not support {type(mod).__name__}")


def propagate(head: List[nn.Module], mu2: torch.Tensor, var2: torch.Tensor):
    """The mean and variance after relu(first(x)) and the `head` modules, given mu2 =
    first(x) and var2 = sigma2^2 (Eq. 5), in float32 when these come in half precision
    and with autocast off."""
    dt = torch.float32 if mu2.dtype in (torch.float16, torch.bfloat16) else mu2.dtype
    with torch.autocast(mu2.device.type, enabled=False):
        mu, var = relu_moments(mu2.to(dt), var2.to(dt))
        for mod in head:
            mu, var = layer_moments(mod, mu, var)
    return mu, var
