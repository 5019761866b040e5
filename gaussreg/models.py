"""The paper's networks, split as f(x) = rest(relu(first(x))) (Sec. 3.3, l = 1).

`first` is the first affine layer with the dataset's input normalisation folded in:
it takes [0,1] pixels, so noise is always specified in pixel units, and its
`variance` method pushes a pixel-space noise variance through it (Eq. 5)."""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from . import data


class NormalizedConv2d(nn.Conv2d):
    """Conv2d on (x - mean) / std. Zero padding happens after normalisation, so the
    padded border carries no noise: the layer is affine in x with A = W / std."""

    def __init__(self, *args, mean=(0.0,), std=(1.0,), **kw):
        super().__init__(*args, **kw)
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return super().forward((x - self.input_mean) / self.input_std)


class NormalizedLinear(nn.Linear):
    """Linear on flatten((x - mean) / std); per-channel statistics for image inputs."""

    def __init__(self, in_features, out_features, mean=(0.0,), std=(1.0,), bias=True):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32))

    def _stat(self, t, x):
        return t.view(1, -1, *([1] * (x.ndim - 2))) if x.ndim > 2 else t

    def forward(self, x):
        x = (x - self._stat(self.input_mean, x)) / self._stat(self.input_std, x)
        return super().forward(x.flatten(1))


def first_variance(first: nn.Module, var: torch.Tensor) -> torch.Tensor:
    """sigma2^2 = (A . A) sigma_x^2 (Eq. 5): the variance map through `first` with squared
    weights, no bias, same stride/padding; a folded normalisation divides by std^2."""
    std = getattr(first, "input_std", None)
    if isinstance(first, nn.Conv2d):
        if std is not None:
            var = var / std.square()
        if first.padding_mode != "zeros":
            raise ValueError("only zero padding keeps the border noise-free")
        return F.conv2d(var, first.weight.to(var.dtype).square(), None, first.stride, first.padding,
                        first.dilation, first.groups)
    if isinstance(first, nn.Linear):
        if std is not None:
            var = var / (std.view(1, -1, *([1] * (var.ndim - 2))) if var.ndim > 2 else std).square()
        return F.linear(var.flatten(1), first.weight.to(var.dtype).square())
    raise TypeError(f"the first layer must be Conv2d or Linear, not {type(first).__name__}")


class GaussNet(nn.Module):
    """f(x) = rest(relu(first(x)))."""

    def __init__(self, first: nn.Module, rest: nn.Module, name: str = "custom"):
        super().__init__()
        if not isinstance(first, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"the first layer must be Conv2d or Linear, not {type(first).__name__}")
        self.first, self.rest, self.name = first, rest, name

    def forward(self, x):
        return self.rest(torch.relu(self.first(x)))


def from_sequential(seq: nn.Sequential) -> GaussNet:
    """A user's nn.Sequential whose first two modules are Conv2d/Linear and ReLU."""
    mods = list(seq)
    if len(mods) < 2 or not isinstance(mods[0], (nn.Conv2d, nn.Linear)) or not isinstance(mods[1], nn.ReLU):
        raise TypeError("a custom model must be an nn.Sequential starting with Conv2d/Linear then ReLU")
    return GaussNet(mods[0], nn.Sequential(*mods[2:]))


def _lenet(ds: data.DatasetInfo) -> GaussNet:
    c, h, w = ds.shape
    flat = 64 * (h // 4) * (w // 4)  # 3136 on 28x28, 4096 on 32x32
    first = NormalizedConv2d(c, 32, 5, padding=2, mean=ds.mean, std=ds.std)
    rest = nn.Sequential(
        nn.MaxPool2d(2), nn.Conv2d(32, 64, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(flat, 1024), nn.ReLU(), nn.Linear(1024, ds.classes))
    return GaussNet(first, rest, "lenet")


def _alexnet(ds: data.DatasetInfo) -> GaussNet:
    c, h, w = ds.shape
    first = NormalizedConv2d(c, 64, 11, stride=4, padding=5, mean=ds.mean, std=ds.std)
    rest = nn.Sequential(
        nn.MaxPool2d(2), nn.Conv2d(64, 192, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(256, 4096), nn.ReLU(),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, ds.classes))
    return GaussNet(first, rest, "alexnet")


def _mlp(ds: data.DatasetInfo, hidden: int = 256) -> GaussNet:
    n = math.prod(ds.shape)
    first = NormalizedLinear(n, hidden, mean=ds.mean, std=ds.std)
    return GaussNet(first, nn.Linear(hidden, ds.classes), "mlp")


MODELS = {"lenet": _lenet, "alexnet": _alexnet, "mlp": _mlp}


def build_model(name, dataset) -> GaussNet:
    """A model for a dataset (name or DatasetInfo); an nn.Sequential is wrapped as is."""
    if isinstance(name, nn.Sequential):
        return from_sequential(name)
    ds = dataset if isinstance(dataset, data.DatasetInfo) else data.info(dataset)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    if name == "alexnet" and ds.shape[1:] != (32, 32):
        raise ValueError(f"alexnet is built for 32x32 inputs, and {ds.name} is {ds.shape[1]}x{ds.shape[2]}")
    return MODELS[name](ds)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
