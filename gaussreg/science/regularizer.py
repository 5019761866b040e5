"""The analytic moment regularizer: the loss of the network's expected output under
Gaussian input noise, computed with one extra pass through `rest` (Eq. 3-5).

`depth` moves the split deeper than the paper's first ReLU (gaussreg.science.adf): 1 is the
paper, k splits after the k-th ReLU, "all" propagates the moments to the logits."""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from gaussreg.science import activations, adf
from gaussreg.science.methods import channel_tensor
from gaussreg.science.models import FirstBlock
from gaussreg.science.moments import relu_and_mean, relu_mean, safe_sqrt

Sigma = Union[float, tuple, torch.Tensor]


def noise_variance(sigma: Sigma, image_shape, like: torch.Tensor) -> torch.Tensor:
    """sigma_x^2 as a (1, C, H, W) map: sigma is a float, a tuple of one float per channel
    or a tensor broadcastable to one image (per pixel / per channel), in [0,1] pixel units.
    This runs on every batch: a float or tuple sigma is checked in Python and made on the
    device (a tuple once per run), because a tensor made from a float and a tensor
    comparison read back by `if` each block on the GPU."""
    if isinstance(sigma, tuple):
        if len(sigma) != image_shape[0] or not all(s >= 0 for s in sigma):
            raise ValueError(f"a per-channel sigma must be {image_shape[0]} non-negative numbers, not {sigma}")
        return channel_tensor(sigma, like.dtype, like.device).square().expand(image_shape).unsqueeze(0)
    if not isinstance(sigma, torch.Tensor):
        sigma = float(sigma)
        if not sigma >= 0:
            raise ValueError(f"sigma must be non-negative, not {sigma}")
        return torch.full((1, *image_shape), sigma, dtype=like.dtype, device=like.device).square()
    s = sigma.to(dtype=like.dtype, device=like.device)
    if (s < 0).any():
        raise ValueError("sigma must be non-negative")
    return s.square().expand(image_shape).unsqueeze(0)


def first_variance(first: nn.Module, var: torch.Tensor, x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sigma2^2 = (A . A) sigma_x^2 (Eq. 5): the variance map through `first` with squared
    weights, no bias, same stride/padding; a folded normalisation divides by std^2, a
    BatchNorm multiplies by (gamma / sqrt(var + eps))^2 (its statistics from the batch x
    in training mode)."""
    if isinstance(first, FirstBlock):
        out = first_variance(first.affine, var)
        scale = first.bn_scale(x)
        if scale is None:
            return out
        scale = scale.to(out.dtype).square()
        return out * scale.view(1, -1, *([1] * (out.ndim - 2)))
    return adf.affine_variance(first, var)


def sigma2(first, sigma: Sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma2 = sqrt((A . A) sigma_x^2) (Eq. 5). The noise does not depend on the image,
    so this is one pass of a single variance map, broadcast over the batch."""
    return safe_sqrt(_first_variance(first, sigma, x))


def _first_variance(first, sigma: Sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma2^2 (Eq. 5) in at least fp32 with autocast off: squared weights times sigma^2
    summed over a receptive field overflows fp16 (max 65504) at large sigma."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        # x: a BatchNorm of the first block in training mode scales by the batch's statistics
        return first_variance(first, noise_variance(sigma, x.shape[1:], x.new_empty((), dtype=dtype)), x)


def _deep_mean(model, mu2: torch.Tensor, x: torch.Tensor, sigma: Sigma, head) -> torch.Tensor:
    """mu_k: the ADF mean after the first ReLU and the `head` modules."""
    var2 = _first_variance(model.first, sigma, x)
    mu, _ = adf.propagate(head, mu2, var2)
    return mu.to(mu2.dtype)


def _act(model) -> nn.Module:
    return getattr(model, "act", None) or nn.ReLU()  # a GaussNet from before it had `act` is a ReLU one


def _is_relu(act: nn.Module) -> bool:
    return type(act) is nn.ReLU


def first_mean(model, mu2: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """mu3 = E[act(X)], X ~ N(mu2, s2^2): T(mu2, s2) for ReLU (Eq. 1), else the first
    activation's expected value (gaussreg.science.activations)."""
    act = _act(model)
    return relu_mean(mu2, s2) if _is_relu(act) else activations.expected_activation(act, mu2, s2)


def _check_deep(model, depth: adf.Depth) -> None:
    act = _act(model)
    if depth != 1 and not activations.expectation(act).variance:
        raise TypeError(f"depth {depth!r} propagates mean and variance through the first activation, and gaussreg "
                        f"has the variance of ReLU only, not of {type(act).__name__}; use depth = 1 (the paper's "
                        f"split, which needs the mean alone)")


def expected_logits(model, x: torch.Tensor, sigma: Sigma, depth: adf.Depth = 1) -> torch.Tensor:
    """The analytic estimate of E[f(x + n)]: rest_k(mu_k). depth 1 is the paper's
    rest(mu3), mu3 = T(mu2, sigma2), mu2 = first(x) (Eq. 1, 4, 5; for another first
    activation mu3 is its expected value); deeper splits propagate mean and variance
    through the layers before the k-th ReLU (gaussreg.science.adf)."""
    mu2 = model.first(x)
    if depth == 1:
        return model.rest(first_mean(model, mu2, sigma2(model.first, sigma, x)).to(mu2.dtype))
    _check_deep(model, depth)
    head, tail = adf.split(model.rest, depth)
    out = _deep_mean(model, mu2, x, sigma, head)
    for mod in tail:
        out = mod(out)
    return out


@contextmanager
def clean_batch_norm(rest: nn.Module, n: int):
    """While [clean; expected] batches go through `rest` as one, each BatchNorm in
    training mode normalises both halves with the statistics of the clean half (its
    first n rows) and updates its running statistics from the clean half alone: the
    clean pass is the baseline's, and the expected pass sees the same affine maps."""
    bns = [m for m in rest.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]

    def make(bn):
        def forward(z):
            clean = type(bn).forward(bn, z[:n])
            dims = [0, *range(2, z.ndim)]
            mean, var = z[:n].mean(dims), z[:n].var(dims, unbiased=False)
            shape = (1, -1, *([1] * (z.ndim - 2)))
            other = (z[n:] - mean.view(shape)) * torch.rsqrt(var + bn.eps).view(shape)
            if bn.weight is not None:
                other = other * bn.weight.view(shape) + bn.bias.view(shape)
            return torch.cat([clean, other])
        return forward

    for bn in bns:
        bn.forward = make(bn)  # an instance attribute: nn.Module.__call__ calls it
    try:
        yield
    finally:
        for bn in bns:
            del bn.forward


class MomentLoss(NamedTuple):
    total: torch.Tensor
    ce: torch.Tensor  # CE(f(x), y)
    reg: torch.Tensor  # CE(rest(mu3), y)
    logits: torch.Tensor  # f(x), for accuracy


def moment_loss(model, x: torch.Tensor, y: torch.Tensor, sigma: Sigma, alpha: float,
                depth: adf.Depth = 1) -> MomentLoss:
    """CE(f(x), y) + alpha * CE(rest_k(mu_k), y) (Eq. 3; k = 1 is the paper's rest(mu3)).

    first(x) is computed once and shared by both terms, and the clean activations and
    mu_k go through rest_k as one batch (at depth 1 written into one buffer)."""
    mu2 = model.first(x)
    if depth == 1:
        act = _act(model)
        s2 = sigma2(model.first, sigma, x)
        if _is_relu(act):
            both = relu_and_mean(mu2, s2)
        else:
            both = torch.cat([act(mu2), activations.expected_activation(act, mu2, s2).to(mu2.dtype)])
        with clean_batch_norm(model.rest, len(x)):
            both = model.rest(both)
    else:
        _check_deep(model, depth)
        head, tail = adf.split(model.rest, depth)
        h = torch.relu(mu2)
        for mod in head:
            h = mod(h)
        both = torch.cat([h, _deep_mean(model, mu2, x, sigma, head).to(h.dtype)])
        with clean_batch_norm(nn.Sequential(*tail), len(x)):
            for mod in tail:
                both = mod(both)
    logits, expected = both[: len(x)], both[len(x):]
    ce = F.cross_entropy(logits, y)
    reg = F.cross_entropy(expected, y)
    return MomentLoss(ce + alpha * reg, ce, reg, logits)
