"""Closed-form moments of a ReLU under Gaussian input (paper Sec. 3.1, Theorem 1)."""

from __future__ import annotations

import math

import torch

# Beyond |mu/sigma| = 50, Phi and phi are exactly 0/1 even in float64, so clamping the
# ratio changes no value; it keeps huge ratios (sigma -> 0) from producing inf * 0 = NaN
# in the gradient of phi.
_A_MAX = 50.0
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _compute_dtype(*ts):
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    # half precision loses T entirely for moderate ratios; compute in float32
    return dt, (torch.float32 if dt in (torch.float16, torch.bfloat16) else dt)


def _ratio(mu, sigma):
    positive = sigma > 0
    safe = torch.where(positive, sigma, torch.ones_like(sigma))
    return positive, safe, (mu / safe).clamp(-_A_MAX, _A_MAX)


def _pdf(a):
    return torch.exp(-0.5 * a * a) * _INV_SQRT_2PI


def relu_mean(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """T(mu2, sigma2) = E[max(X, 0)] for X ~ N(mu, sigma^2), elementwise (Eq. 1).

    T = mu * Phi(mu/sigma) + sigma * phi(mu/sigma); sigma = 0 gives relu(mu).
    Differentiable in both arguments (dT/dmu = Phi, dT/dsigma = phi); fp16/bf16
    inputs are computed in float32 and returned in their own dtype."""
    mu, sigma = torch.as_tensor(mu), torch.as_tensor(sigma)
    out_dtype, dt = _compute_dtype(mu, sigma)
    mu, sigma = mu.to(dt), sigma.to(dt)
    positive, s, a = _ratio(mu, sigma)
    t = mu * torch.special.ndtr(a) + s * _pdf(a)
    return torch.where(positive, t, torch.relu(mu)).to(out_dtype)


def relu_variance(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Var[max(X, 0)] for X ~ N(mu, sigma^2): (mu^2+sigma^2) Phi(a) + mu sigma phi(a) - T^2,
    clamped at 0 (cancellation can make it slightly negative)."""
    mu, sigma = torch.as_tensor(mu), torch.as_tensor(sigma)
    out_dtype, dt = _compute_dtype(mu, sigma)
    mu, sigma = mu.to(dt), sigma.to(dt)
    positive, s, a = _ratio(mu, sigma)
    cdf, pdf = torch.special.ndtr(a), _pdf(a)
    t = mu * cdf + s * pdf
    var = (mu * mu + s * s) * cdf + mu * s * pdf - t * t
    return torch.where(positive, var, torch.zeros_like(var)).clamp_min(0).to(out_dtype)


def safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not infinite) gradient at 0, for sigma2 of noise-free units."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def shallow_mean(A, c1, B, c2, mean_x, cov_x):
    """Theorem 1: the exact mean of B relu(A x + c1) + c2 for x ~ N(mean_x, cov_x).

    mu2 = A mean_x + c1, sigma2 = sqrt(diag(A cov_x A^T)), result B T(mu2, sigma2) + c2.
    `cov_x` is a full (n, n) matrix or a vector of n variances; `mean_x` may carry
    leading batch dimensions (..., n)."""
    mu2 = mean_x @ A.transpose(-1, -2) + c1
    n = A.shape[-1]
    if cov_x.ndim == 2 and tuple(cov_x.shape) == (n, n):
        var2 = ((A @ cov_x) * A).sum(-1)  # diag(A cov A^T) without forming p x p
    else:
        var2 = cov_x @ (A * A).transpose(-1, -2)  # Eq. 5: (A . A) sigma_x^2
    mu3 = relu_mean(mu2, safe_sqrt(var2))
    return mu3 @ B.transpose(-1, -2) + c2
