"""The paper's networks, split as f(x) = rest(relu(first(x))) (Sec. 3.3, l = 1), and users'
networks, split as f(x) = rest(act(first(x))) for the first activations of
gaussreg.science.activations.

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
from gaussreg.science import activations


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
    """f(x) = rest(act(first(x))): `act` is ReLU unless given, else one of the first
    activations whose expected value gaussreg knows (gaussreg.science.activations)."""

    def __init__(self, first: nn.Module, rest: nn.Module, name: str = "custom", act: Optional[nn.Module] = None):
        super().__init__()
        if not isinstance(first, (nn.Conv2d, nn.Linear, FirstBlock)):
            raise TypeError(f"the first layer must be Conv2d, Linear or a FirstBlock, not {type(first).__name__}")
        act = nn.ReLU() if act is None else act
        if not activations.is_activation(act):
            raise TypeError(f"the activation after the first layer must be one of {activations.SUPPORTED_NAMES}, "
                            f"not {type(act).__name__}")
        if hasattr(act, "inplace"):
            act.inplace = False  # in place it would overwrite first(x), which the regularizer's mean reads too
        self.first, self.act, self.rest, self.name = first, act, rest, name

    def forward(self, x):
        return self.rest(self.act(self.first(x)))


class SplitError(TypeError):
    """A model gaussreg cannot split into first block + activation + rest; the message says why and what to do."""


WRAP = ("wrap it as gaussreg.science.models.GaussNet(FirstBlock(conv, bn), rest, act=...) "
        "(README, \"Your own model and data\")")
OTHERS = "the methods other than the regularizer (baseline, augment, ...) train this model as it is"
NO_ACTIVATION = ("the analytic regularizer needs an elementwise activation right after the first affine layer "
                 f"(and its BatchNorm), for its expected value (Eq. 1); {OTHERS}")
_STEM_AFFINE, _STEM_BN, _STEM_ACT = ("conv1",), ("bn1",), ("relu", "act1")


def _leaves(module: nn.Module):
    """(name, module) of the modules without children, in registration order."""
    return [(n, m) for n, m in module.named_modules() if not list(m.children())]


def _first_layers(module: nn.Module, k: int = 3) -> str:
    found = [f"{type(m).__name__} ({n})" for n, m in _leaves(module)[:k]]
    return ", ".join(found) if found else "no layers at all"


def _flat(m: nn.Module):
    """The modules of nested nn.Sequentials in order, as (index path, module)."""
    if isinstance(m, nn.Sequential):
        return [(f"{i}.{p}" if p else str(i), x) for i, c in enumerate(m) for p, x in _flat(c)]
    return [("", m)]


def _stem_in(mods):
    """(i, j) for mods = [Flatten,] affine, [BatchNorm,] act, ...: affine at i, act at j; or
    None, with what was found there instead, for the refusal."""
    i = 1 if mods and isinstance(mods[0], nn.Flatten) else 0
    if len(mods) <= i or not isinstance(mods[i], (nn.Conv2d, nn.Linear)):
        return None, f"it starts with {', '.join(type(m).__name__ for m in mods[:3]) or 'nothing'}"
    j = i + 1 + (len(mods) > i + 1 and isinstance(mods[i + 1], _BN))
    if len(mods) <= j:
        return None, f"nothing follows its first affine layer {type(mods[i]).__name__}"
    if activations.is_activation(mods[j]):
        return (i, j), ""
    what = "first affine layer" + (" and BatchNorm" if j > i + 1 else "")
    return None, f"after its {what} comes {type(mods[j]).__name__}"


def from_sequential(seq: nn.Sequential, name: str = "custom") -> GaussNet:
    """[Flatten,] Conv2d/Linear, [BatchNorm,] activation, rest... (nested Sequentials flattened)."""
    mods = [m for _, m in _flat(seq)]
    found, why = _stem_in(mods)
    if found is None:
        raise SplitError(f"cannot split the nn.Sequential of model {name!r}: gaussreg looks for [Flatten,] Conv2d or "
                         f"Linear, [BatchNorm1d/2d,] and an activation ({activations.SUPPORTED_NAMES}), and {why}; "
                         f"{_remedy(mods)}")
    i, j = found
    first = mods[i] if i == 0 and j == i + 1 else FirstBlock(mods[i], mods[i + 1] if j > i + 1 else None,
                                                              flatten=i == 1)
    return GaussNet(first, nn.Sequential(*mods[j + 1:]), name, act=mods[j])


def _remedy(mods) -> str:
    """What to do with a model that did not split: a norm after the first affine layer
    (a ViT's patch embedding, ConvNeXt's LayerNorm stem) cannot have the regularizer."""
    affine = next((k for k, m in enumerate(mods) if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    nxt = next((m for m in mods[affine + 1:] if not isinstance(m, (nn.Identity, nn.Dropout))), None) \
        if affine is not None else None
    if isinstance(nxt, _NORMS):
        return f"its first affine layer is followed by {type(nxt).__name__}, not an elementwise activation: " \
               f"{NO_ACTIVATION}"
    return f"if its forward does start with an affine layer, [BatchNorm,] and one of these activations, {WRAP}; " \
           f"{OTHERS}"


# the stems of ViT (patch embedding + LayerNorm) and ConvNeXt (LayerNorm), and GroupNorm ones
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.instancenorm._InstanceNorm)


def _stem_paths(model: nn.Module):
    """The stem as (affine, bn or None, act) paths of submodules: torchvision's and timm's
    conv1, bn1, relu or act1 attributes, or the first modules of a `features` nn.Sequential
    (torchvision's MobileNet, EfficientNet, VGG); None with what was found, for the refusal."""
    affine = next((a for a in _STEM_AFFINE if isinstance(getattr(model, a, None), (nn.Conv2d, nn.Linear))), None)
    if affine is not None:
        bn = next((b for b in _STEM_BN if getattr(model, b, None) is not None), None)
        act = next((a for a in _STEM_ACT if isinstance(getattr(model, a, None), nn.Module)), None)
        if act is None:
            return None, f"it has {affine} but no attribute relu or act1"
        if not activations.is_activation(getattr(model, act)):
            return None, (f"its {act} is {type(getattr(model, act)).__name__}, not an activation gaussreg knows "
                          f"({activations.SUPPORTED_NAMES})")
        if bn is not None and not isinstance(getattr(model, bn), _BN):
            return None, f"its {bn} is {type(getattr(model, bn)).__name__}, not BatchNorm1d/2d"
        return (affine, bn, act), ""
    feats = getattr(model, "features", None)
    if isinstance(feats, nn.Sequential):
        flat = _flat(feats)
        found, why = _stem_in([m for _, m in flat])
        if found is None:
            return None, f"its features {why}"
        i, j = found
        if i == 1:
            return None, "its features start with Flatten"
        return (f"features.{flat[i][0]}", f"features.{flat[i + 1][0]}" if j > i + 1 else None,
                f"features.{flat[j][0]}"), ""
    return None, f"it has none of the attributes {', '.join(_STEM_AFFINE)} or features, and its first layers are " \
                 f"{_first_layers(model)}"


def _set(model: nn.Module, path: str, mod: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, mod)


def _from_stem(model: nn.Module, name: str, shape, paths) -> GaussNet:
    """A torchvision/timm-style module: affine [-> bn] -> act first. Its forward is kept as
    rest with the affine layer and bn made identities, and the activation too unless it
    is a ReLU (fed relu(first(x)) or its mean, both >= 0, a ReLU changes nothing, and it
    may be used again later). Checked on two images in eval mode; on failure the model
    is left as it was."""
    affine_p, bn_p, act_p = paths
    conv, act = model.get_submodule(affine_p), model.get_submodule(act_p)
    bn = model.get_submodule(bn_p) if bn_p else None
    keep_act = type(act) is nn.ReLU
    flatten = isinstance(conv, nn.Linear)
    first = FirstBlock(conv, bn, flatten=flatten) if bn is not None or flatten else conv
    was = model.training
    model.eval()
    param = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, *shape, generator=g).to(param.device, param.dtype)
    kept = {k: v.clone() for k, v in bn.state_dict().items()} if bn is not None else None
    inplace = getattr(act, "inplace", None)
    with torch.no_grad():
        if bn is not None and bn.running_var is not None:
            # a fresh BN is nearly the identity in eval mode, under which act(bn(z)) and
            # bn(act(z)) agree: give it random statistics and affine for the check
            for t in (bn.running_mean, bn.weight, bn.bias):
                if t is not None:
                    t.copy_(torch.randn(t.shape, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
        try:
            ref = model(x)
        except Exception as e:  # noqa: BLE001 - the user's forward: say it, do not crash
            model.train(was)
            raise SplitError(f"model {name!r} fails on a probe batch of shape {tuple(x.shape)} "
                             f"({type(e).__name__}: {e})") from None
        _set(model, affine_p, nn.Identity())
        if bn is not None:
            _set(model, bn_p, nn.Identity())
        if keep_act:
            act.inplace = False  # in place it would overwrite relu(first(x)), which autograd keeps
            net = GaussNet(first, model, name)
        else:
            _set(model, act_p, nn.Identity())
            net = GaussNet(first, model, name, act=act)
        try:
            out = net(x)
            same = out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
        except Exception:  # noqa: BLE001
            same = False
        if kept is not None:
            bn.load_state_dict(kept)
        if not same:  # put the model back: the methods that need no split train it as it is
            _set(model, affine_p, conv)
            if bn is not None:
                _set(model, bn_p, bn)
            _set(model, act_p, act)
            if inplace is not None:
                act.inplace = inplace
    model.train(was)
    if not same:
        stem = f"{act_p}({bn_p + '(' if bn is not None else ''}{affine_p}(x)){')' if bn is not None else ''}"
        again = "" if keep_act else f", or it uses {act_p} again later"
        raise SplitError(f"model {name!r} has {affine_p}{', ' + bn_p if bn is not None else ''} and {act_p}, but "
                         f"its forward does not start with {stem}{again} (its output changed when gaussreg split it "
                         f"there; normalise inside {affine_p}, e.g. with gaussreg.science.models.NormalizedConv2d, "
                         f"or {WRAP})")
    return net


def as_gaussnet(obj, name: str = "custom", shape=None) -> GaussNet:
    """What a factory returned, as f(x) = rest(act(first(x))); SplitError, with the remedy,
    otherwise. `shape` (C, H, W) is the input of the probe batch that checks a stem split."""
    if isinstance(obj, GaussNet):
        return obj
    if isinstance(obj, nn.Sequential):
        return from_sequential(obj, name)
    if not isinstance(obj, nn.Module):
        raise SplitError(f"model factory {name!r} returned a {type(obj).__name__}, not an nn.Module")
    paths, why = _stem_paths(obj)
    if paths is None:
        raise SplitError(f"cannot split model {name!r} ({type(obj).__name__}) into first layer + activation + rest: "
                         f"gaussreg looks for attributes conv1, [bn1,] and relu or act1 (torchvision, timm) or a "
                         f"features nn.Sequential starting with Conv2d, [BatchNorm2d,] activation, and {why}; "
                         f"{_remedy([m for _, m in _leaves(obj)])}")
    if shape is None:
        raise SplitError(f"model {name!r}: splitting at {paths[0]}/{paths[2]} needs the input shape to check it")
    return _from_stem(obj, name, shape, paths)


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


def build_model(name, dataset, args: Optional[dict] = None, python_path=(), split: bool = True) -> nn.Module:
    """The model a name stands for (built-in, entry point or `module:attr`), built by its
    factory for a dataset (name or DatasetInfo) with `args`, and split (as_gaussnet).
    An nn.Sequential given instead of a name is split as it is. Raises PluginError or
    SplitError (a factory's own exception is reported as PluginError naming it); with
    split=False a model that does not split is returned as it is (the methods that need
    no first block train it so; the same model splits, or not, every time it is built)."""
    if isinstance(name, nn.Module):
        return as_gaussnet(name)
    ds = dataset if isinstance(dataset, datasets.DatasetInfo) else datasets.info(dataset)
    factory = plugins.load("model", name, python_path)
    try:
        out = factory(ds, **(args or {}))
    except Exception as e:  # noqa: BLE001 - the user's code: name the factory and its last line
        last = f"{type(e).__name__}: {e}".strip().splitlines()[-1]
        raise plugins.PluginError(f"model factory {name!r} raised {last}") from e
    try:
        net = as_gaussnet(out, name, tuple(ds.shape))
    except SplitError:
        if split or not isinstance(out, nn.Module):
            raise
        return out
    if not isinstance(out, GaussNet):
        net.name = name
    return net


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
