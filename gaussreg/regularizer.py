"""The analytic moment regularizer: the loss of the network's expected output under
Gaussian input noise, computed with one extra pass through `rest` (Eq. 3-5)."""

from __future__ import annotations

from typing import NamedTuple, Union

import torch
import torch.nn.functional as F

from .moments import relu_and_mean, relu_mean, safe_sqrt
from .models import first_variance

Sigma = Union[float, torch.Tensor]


def noise_variance(sigma: Sigma, image_shape, like: torch.Tensor) -> torch.Tensor:
    """sigma_x^2 as a (1, C, H, W) map: sigma is a float or a tensor broadcastable to
    one image (per pixel / per channel), in [0,1] pixel units."""
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if (s < 0).any():
        raise ValueError("sigma must be non-negative")
    return s.square().expand(image_shape).unsqueeze(0)


def sigma2(first, sigma: Sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma2 = sqrt((A . A) sigma_x^2) (Eq. 5). The noise does not depend on the image,
    so this is one pass of a single variance map, broadcast over the batch."""
    return safe_sqrt(first_variance(first, noise_variance(sigma, x.shape[1:], x)))


def expected_logits(model, x: torch.Tensor, sigma: Sigma) -> torch.Tensor:
    """rest(mu3) with mu3 = T(mu2, sigma2) and mu2 = first(x) (Eq. 1, 4, 5)."""
    mu2 = model.first(x)
    return model.rest(relu_mean(mu2, sigma2(model.first, sigma, x)))


class MomentLoss(NamedTuple):
    total: torch.Tensor
    ce: torch.Tensor  # CE(f(x), y)
    reg: torch.Tensor  # CE(rest(mu3), y)
    logits: torch.Tensor  # f(x), for accuracy


def moment_loss(model, x: torch.Tensor, y: torch.Tensor, sigma: Sigma, alpha: float) -> MomentLoss:
    """CE(f(x), y) + alpha * CE(rest(mu3), y) (Eq. 3).

    first(x) is computed once and shared by both terms, and relu(mu2) and mu3 are
    written into one buffer that goes through `rest` as one batch."""
    mu2 = model.first(x)
    both = model.rest(relu_and_mean(mu2, sigma2(model.first, sigma, x)))
    logits, expected = both[: len(x)], both[len(x):]
    ce = F.cross_entropy(logits, y)
    reg = F.cross_entropy(expected, y)
    return MomentLoss(ce + alpha * reg, ce, reg, logits)
