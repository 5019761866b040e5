"""The paper's networks, split as f(x) = rest(relu(first(x))) (Sec. 3.3, l = 1).

`first` is the first affine layer with the dataset's input normalisation folded in:
it takes [0,1] pixels, so noise is always specified in pixel units; pushing a
pixel-space noise variance through it (Eq. 5) is gaussreg.science.regularizer.first_variance."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from gaussreg.core import plugins
from gaussreg.data import datasets


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


class FirstBlock(nn.Module):
    """The first affine layer (Conv2d or Linear, an optional Flatten before it) and an
    optional BatchNorm after it: still affine in x given BN's statistics. In training
    mode BN normalises with the statistics of the batch it is given (for the regularizer:
    the clean batch), in eval mode with its running statistics."""

    def __init__(self, affine: nn.Module, bn: Optional[nn.Module] = None, flatten: bool = False):
        super().__init__()
        if not isinstance(affine, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"the first layer must be Conv2d or Linear, not {type(affine).__name__}")
        if bn is not None and not isinstance(bn, _BN):
            raise TypeError(f"the layer after the first one must be BatchNorm1d/2d, not {type(bn).__name__}")
        self.affine, self.bn, self.flatten = affine, bn, flatten

    def forward(self, x):
        z = self.affine(x.flatten(1) if self.flatten else x)
        return z if self.bn is None else self.bn(z)

    def bn_scale(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """gamma / sqrt(var + eps) per channel, shaped to broadcast over affine's output:
        var is the batch variance of affine(x) (biased, as BN normalises with it) in
        training mode, else the running variance."""
        bn = self.bn
        if bn is None:
            return None
        if bn.training or bn.running_var is None:
            if x is None:
                raise ValueError("BatchNorm in training mode needs the batch for its statistics")
            z = self.affine(x.flatten(1) if self.flatten else x)
            var = z.var(dim=[0, *range(2, z.ndim)], unbiased=False)
        else:
            var = bn.running_var
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        return scale


_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


class GaussNet(nn.Module):
    """f(x) = rest(relu(first(x)))."""

    def __init__(self, first: nn.Module, rest: nn.Module, name: str = "custom"):
        super().__init__()
        if not isinstance(first, (nn.Conv2d, nn.Linear, FirstBlock)):
            raise TypeError(f"the first layer must be Conv2d, Linear or a FirstBlock, not {type(first).__name__}")
        self.first, self.rest, self.name = first, rest, name

    def forward(self, x):
        return self.rest(torch.relu(self.first(x)))


class SplitError(TypeError):
    """A model gaussreg cannot split into first block + ReLU + rest; the message says why."""


RECOGNISED = ("a GaussNet(first, rest); an nn.Sequential whose first modules are [Flatten,] Conv2d or Linear, "
              "[BatchNorm1d/2d,] ReLU; or a module with attributes conv1 (Conv2d or Linear), optionally bn1 "
              "(BatchNorm1d/2d), and relu (nn.ReLU) whose forward starts with relu(bn1(conv1(x))), as "
              "torchvision's ResNet does")


def _leaves(module: nn.Module):
    """(name, module) of the modules without children, in registration order."""
    return [(n, m) for n, m in module.named_modules() if not list(m.children())]


def _first_layers(module: nn.Module, k: int = 3) -> str:
    found = [f"{type(m).__name__} ({n})" for n, m in _leaves(module)[:k]]
    return ", ".join(found) if found else "no layers at all"


def from_sequential(seq: nn.Sequential, name: str = "custom") -> GaussNet:
    """[Flatten,] Conv2d/Linear, [BatchNorm,] ReLU, rest... (nested Sequentials flattened)."""
    def flat(m):
        return [x for c in m for x in flat(c)] if isinstance(m, nn.Sequential) else [m]

    mods = flat(seq)
    i = 1 if mods and isinstance(mods[0], nn.Flatten) else 0
    if len(mods) > i and isinstance(mods[i], (nn.Conv2d, nn.Linear)):
        j = i + 1 + (len(mods) > i + 1 and isinstance(mods[i + 1], _BN))
        if len(mods) > j and isinstance(mods[j], nn.ReLU):
            first = mods[i] if i == 0 and j == i + 1 else FirstBlock(mods[i], mods[i + 1] if j > i + 1 else None,
                                                                      flatten=i == 1)
            return GaussNet(first, nn.Sequential(*mods[j + 1:]), name)
    found = ", ".join(type(m).__name__ for m in mods[:3]) or "nothing"
    raise SplitError(f"cannot split the nn.Sequential of model {name!r}: it starts with {found}; "
                     f"recognised are {RECOGNISED}")


def _from_stem(model: nn.Module, name: str, shape) -> GaussNet:
    """A torchvision-style module: conv1 [-> bn1] -> relu first. Its forward is kept as
    rest with conv1 and bn1 made identities: fed relu(first(x)) (or the expected value,
    also >= 0), its own relu changes nothing. Checked on two images in eval mode."""
    conv, bn, relu = model.conv1, getattr(model, "bn1", None), model.relu
    if bn is not None and not isinstance(bn, _BN):
        raise SplitError(f"model {name!r} has bn1 = {type(bn).__name__}, not BatchNorm1d/2d; recognised are "
                         f"{RECOGNISED}")
    flatten = isinstance(conv, nn.Linear)
    first = FirstBlock(conv, bn, flatten=flatten) if bn is not None or flatten else conv
    was = model.training
    model.eval()
    param = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, *shape, generator=g).to(param.device, param.dtype)
    kept = {k: v.clone() for k, v in bn.state_dict().items()} if bn is not None else None
    with torch.no_grad():
        if bn is not None and bn.running_var is not None:
            # a fresh BN is nearly the identity in eval mode, under which relu(bn(z)) and
            # bn(relu(z)) agree: give it random statistics and affine for the check
            for t in (bn.running_mean, bn.weight, bn.bias):
                if t is not None:
                    t.copy_(torch.randn(t.shape, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
        try:
            ref = model(x)
        except Exception as e:  # noqa: BLE001 - the user's forward: say it, do not crash
            raise SplitError(f"model {name!r} fails on a probe batch of shape {tuple(x.shape)} "
                             f"({type(e).__name__}: {e})") from None
        model.conv1 = nn.Identity()
        if bn is not None:
            model.bn1 = nn.Identity()
        relu.inplace = False  # in place it would overwrite relu(first(x)), which autograd keeps
        net = GaussNet(first, model, name)
        try:
            out = net(x)
            same = out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
        except Exception:  # noqa: BLE001
            same = False
        if kept is not None:
            bn.load_state_dict(kept)
    net.train(was)
    if not same:
        raise SplitError(f"model {name!r} has conv1{', bn1' if bn is not None else ''} and relu, but its forward "
                         f"does not start with relu({'bn1(' if bn is not None else ''}conv1(x))"
                         f"{')' if bn is not None else ''} (its output changed when gaussreg split it there: "
                         f"normalise inside conv1, e.g. with gaussreg.science.models.NormalizedConv2d); recognised are "
                         f"{RECOGNISED}")
    return net


def as_gaussnet(obj, name: str = "custom", shape=None) -> GaussNet:
    """What a factory returned, as f(x) = rest(relu(first(x))); SplitError otherwise.
    `shape` (C, H, W) is the input of the probe batch that checks a conv1/bn1/relu split."""
    if isinstance(obj, GaussNet):
        return obj
    if isinstance(obj, nn.Sequential):
        return from_sequential(obj, name)
    if not isinstance(obj, nn.Module):
        raise SplitError(f"model factory {name!r} returned a {type(obj).__name__}, not an nn.Module")
    if isinstance(getattr(obj, "conv1", None), (nn.Conv2d, nn.Linear)) and isinstance(getattr(obj, "relu", None),
                                                                                       nn.ReLU):
        if shape is None:
            raise SplitError(f"model {name!r}: splitting at conv1/bn1/relu needs the input shape to check it")
        return _from_stem(obj, name, shape)
    raise SplitError(f"cannot split model {name!r} ({type(obj).__name__}) into first layer + ReLU + rest: its first "
                     f"layers are {_first_layers(obj)}; recognised are {RECOGNISED}")


# ---------------------------------------------------------------- built-in factories
# Registered as gaussreg.science.models:lenet etc. (gaussreg.core.plugins.BUILTIN_MODELS): built like any user's.

def lenet(ds: datasets.DatasetInfo) -> GaussNet:
    c, h, w = ds.shape
    flat = 64 * (h // 4) * (w // 4)  # 3136 on 28x28, 4096 on 32x32
    first = NormalizedConv2d(c, 32, 5, padding=2, mean=ds.mean, std=ds.std)
    rest = nn.Sequential(
        nn.MaxPool2d(2), nn.Conv2d(32, 64, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(flat, 1024), nn.ReLU(), nn.Linear(1024, ds.classes))
    return GaussNet(first, rest, "lenet")


def alexnet(ds: datasets.DatasetInfo) -> GaussNet:
    c, h, w = ds.shape
    if (h, w) != (32, 32):
        raise ValueError(f"alexnet is built for 32x32 inputs, and {ds.name} is {h}x{w}")
    first = NormalizedConv2d(c, 64, 11, stride=4, padding=5, mean=ds.mean, std=ds.std)
    rest = nn.Sequential(
        nn.MaxPool2d(2), nn.Conv2d(64, 192, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(256, 4096), nn.ReLU(),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, ds.classes))
    return GaussNet(first, rest, "alexnet")


def mlp(ds: datasets.DatasetInfo, hidden: int = 256) -> GaussNet:
    n = math.prod(ds.shape)
    first = NormalizedLinear(n, hidden, mean=ds.mean, std=ds.std)
    return GaussNet(first, nn.Linear(hidden, ds.classes), "mlp")


def build_model(name, dataset, args: Optional[dict] = None, python_path=()) -> GaussNet:
    """The model a name stands for (built-in, entry point or `module:attr`), built by its
    factory for a dataset (name or DatasetInfo) with `args`, and split (as_gaussnet).
    An nn.Sequential given instead of a name is split as it is. Raises PluginError or
    SplitError (a factory's own exception is reported as PluginError naming it)."""
    if isinstance(name, nn.Module):
        return as_gaussnet(name)
    ds = dataset if isinstance(dataset, datasets.DatasetInfo) else datasets.info(dataset)
    factory = plugins.load("model", name, python_path)
    try:
        out = factory(ds, **(args or {}))
    except Exception as e:  # noqa: BLE001 - the user's code: name the factory and its last line
        last = f"{type(e).__name__}: {e}".strip().splitlines()[-1]
        raise plugins.PluginError(f"model factory {name!r} raised {last}") from e
    net = as_gaussnet(out, name, tuple(ds.shape))
    if not isinstance(out, GaussNet):
        net.name = name
    return net


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
