"""The expected first activation beyond ReLU (gaussreg.science.activations) and the split at it."""

import math

import pytest
import torch
from torch import nn

from gaussreg.science import activations, models
from gaussreg.science.activations import expected_activation
from gaussreg.science.models import FirstBlock, GaussNet, SplitError, as_gaussnet, build_model
from gaussreg.science.regularizer import expected_logits, moment_loss

ACTS = {"ReLU": nn.ReLU(), "LeakyReLU": nn.LeakyReLU(0.1), "ReLU6": nn.ReLU6(), "GELU": nn.GELU(),
        "GELU-tanh": nn.GELU(approximate="tanh"), "Hardswish": nn.Hardswish(), "ELU": nn.ELU(0.7),
        "SiLU": nn.SiLU()}
RATIOS = (-5.0, -2.0, -0.5, 0.0, 0.5, 2.0, 5.0)  # mu / sigma
SIGMAS = (1e-3, 0.1, 1.0, 3.0, 20.0)


def _error(act) -> float:
    """The approximation's stated max error of the mean (0 for the exact ones)."""
    e = activations.expectation(act)
    return 0.0 if e.exact else e.error


@pytest.mark.parametrize("name", ACTS)
def test_mean_matches_monte_carlo_within_4_standard_errors(name):
    act = ACTS[name]
    sigma = torch.tensor([s for s in SIGMAS for _ in RATIOS], dtype=torch.float64)
    mu = torch.tensor([r * s for s in SIGMAS for r in RATIOS], dtype=torch.float64)
    z = torch.randn(200_000, len(mu), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = act(mu + sigma * z)
    mc, se = draws.mean(0), draws.std(0) / math.sqrt(len(z))
    got = expected_activation(act, mu, sigma)
    # + 2e-6 sigma: a tail of probability < 5e-6, which 200,000 draws may all miss, moves the mean by less
    bad = (got - mc).abs() > 4 * se + _error(act) + 2e-6 * sigma
    assert not bad.any(), [(m, s, g, c) for m, s, g, c, b in zip(mu.tolist(), sigma.tolist(), got.tolist(),
                                                                  mc.tolist(), bad.tolist()) if b]


def test_the_approximations_stay_within_their_stated_error():
    """SiLU and GELU-tanh against a dense Simpson quadrature in float64 (z in [-12, 12])."""
    z = torch.linspace(-12, 12, 24_001, dtype=torch.float64)
    w = torch.full_like(z, 2.0)
    w[1::2], w[0], w[-1] = 4.0, 1.0, 1.0
    w = w * (z[1] - z[0]) / 3 * torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    mu = torch.linspace(-10, 10, 81, dtype=torch.float64)
    for name in ("SiLU", "GELU-tanh"):
        act = ACTS[name]
        worst = 0.0
        for s in (1e-3, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0):
            exact = (act(mu[:, None] + s * z) * w).sum(1)
            worst = max(worst, (expected_activation(act, mu, torch.tensor(s, dtype=torch.float64)) - exact)
                        .abs().max().item())
        assert 0.5 * _error(act) < worst <= _error(act), (name, worst)  # stated, and not overstated


@pytest.mark.parametrize("name", ACTS)
def test_gradcheck_float64(name):
    act = ACTS[name]
    mu = torch.tensor([-3.4, -1.3, 0.2, 2.9, 3.1, 7.0, -0.6, 1.1], dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.05, 0.7, 2.0, 20.0, 0.3, 1.0, 1e-3 * 0.6e3, 4.0], dtype=torch.float64,
                         requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, s: expected_activation(act, m, s), (mu, sigma))


@pytest.mark.parametrize("name", ACTS)
def test_float32_is_stable_at_extreme_ratios_and_sigmas(name):
    act = ACTS[name]
    ratios = torch.tensor([-1e3, -50.0, -5.0, 0.0, 5.0, 50.0, 1e3], dtype=torch.float64)
    for s in (1e-3, 1.0, 20.0):
        mu64, s64 = ratios * s, torch.full_like(ratios, s)
        ref = expected_activation(act, mu64, s64)
        mu, sg = mu64.float().requires_grad_(), s64.float().requires_grad_()
        got = expected_activation(act, mu, sg)
        assert got.dtype == torch.float32
        # float32 rounding of terms of size ~1 (e.g. ELU's exp(mu + ...) - Phi(-a)) and ~mu
        assert torch.allclose(got.double(), ref, rtol=2e-6, atol=1e-7 * (1 + s)), (s, got, ref)
        got.sum().backward()
        assert torch.isfinite(mu.grad).all() and torch.isfinite(sg.grad).all(), (s, mu.grad, sg.grad)
    # sigma = 0 is the activation itself, with finite gradients
    mu = torch.tensor([-4.0, -1.0, 0.0, 0.5, 3.0, 8.0], requires_grad=True)
    sg = torch.zeros(6, requires_grad=True)
    got = expected_activation(act, mu, sg)
    assert torch.allclose(got, act(mu.detach()), atol=1e-7)
    got.sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(sg.grad).all()


def test_half_precision_under_autocast_is_computed_in_float32():
    mu = torch.linspace(-6, 6, 101).bfloat16()
    sigma = torch.full((101,), 0.3).bfloat16()
    for act in ACTS.values():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = expected_activation(act, mu, sigma)
        assert got.dtype == torch.bfloat16
        ref = expected_activation(act, mu.float(), sigma.float()).bfloat16()
        assert torch.equal(got, ref)


def _mc_logits(seq, x, sigma, n=200_000):
    """Monte Carlo mean of seq(x + n) and its standard error, per logit."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = seq(x + sigma * torch.randn(n, *x.shape, generator=g, dtype=x.dtype))
    return out.mean(0), out.std(0) / math.sqrt(n)


@pytest.mark.parametrize("name", ACTS)
def test_linear_act_linear_expected_logits_are_exact_against_monte_carlo(name):
    """For Linear, act, Linear the analytic mean is exact (up to the approximation): rest is affine."""
    torch.manual_seed(0)
    act = ACTS[name]
    seq = nn.Sequential(nn.Linear(6, 12), act, nn.Linear(12, 3)).double()
    net = as_gaussnet(seq)
    assert isinstance(net, GaussNet) and net.act is act
    x = torch.rand(6, dtype=torch.float64)
    for sigma in (0.05, 0.5, 2.0):
        mc, se = _mc_logits(seq, x, sigma)
        got = expected_logits(net, x[None], sigma)[0]
        bound = 4 * se + _error(act) * seq[2].weight.abs().sum(1)
        assert ((got - mc).abs() <= bound).all(), (sigma, got, mc, se)


def _stem_model(act, bn=True, attr="act1"):
    """timm-style: conv1, bn1, act1 (or torchvision's relu)."""
    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(4) if bn else None
            setattr(self, attr, act)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            z = self.conv1(x)
            z = getattr(self, attr)(self.bn1(z) if self.bn1 is not None else z)
            return self.fc(z.mean((2, 3)))
    return Stem()


def _features_model(act):
    """torchvision-style MobileNet: features = [Sequential(conv, bn, act), ...], classifier."""
    class Mobile(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4),
                                                        act),
                                          nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.Hardswish())
            self.classifier = nn.Linear(4, 2)

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))
    return Mobile()


@pytest.mark.parametrize("name", ACTS)
def test_the_splitter_recognises_each_activation_in_every_form(name):
    act_type = type(ACTS[name])
    kw = {"approximate": "tanh"} if name == "GELU-tanh" else {}

    def fresh():
        return act_type(**kw)
    x = torch.rand(3, 3, 6, 6)
    forms = {"sequential": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), fresh(), nn.Flatten(),
                                         nn.Linear(64, 2)),
             "gaussnet": GaussNet(FirstBlock(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
                                  nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), act=fresh()),
             "act1": _stem_model(fresh()), "relu": _stem_model(fresh(), attr="relu"),
             "no bn": _stem_model(fresh(), bn=False), "features": _features_model(fresh())}
    for form, model in forms.items():
        model.eval()
        with torch.no_grad():
            ref = model(x)
        net = as_gaussnet(model, form, (3, 6, 6))
        assert type(net.act) is act_type, form
        with torch.no_grad():
            assert torch.allclose(net(x), ref, atol=1e-6), form
            # sigma -> 0: the expected logits are the clean ones
            assert torch.allclose(expected_logits(net, x, 0.0), ref, atol=1e-5), form
        net.train()
        loss = moment_loss(net, x, torch.tensor([0, 1, 0]), 0.2, 1.0)
        loss.total.backward()
        w = net.first.weight if isinstance(net.first, nn.Conv2d) else net.first.affine.weight
        assert torch.isfinite(loss.reg) and w.grad.abs().sum() > 0, form


def test_depth_beyond_1_only_through_relu():
    for name, act in ACTS.items():
        net = as_gaussnet(nn.Sequential(nn.Linear(4, 8), type(act)(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
        x, y = torch.rand(2, 4), torch.tensor([0, 1])
        if name == "ReLU":
            moment_loss(net, x, y, 0.1, 1.0, 2).total.backward()
            continue
        with pytest.raises(TypeError, match=rf"depth 2 propagates mean and variance through the first "
                                            rf"activation, and gaussreg has the variance of ReLU only, not of "
                                            rf"{type(act).__name__}; use depth = 1"):
            moment_loss(net, x, y, 0.1, 1.0, 2)
        with pytest.raises(TypeError, match="use depth = 1"):
            expected_logits(net, x, 0.1, "all")


class ViT(nn.Module):
    """A patch embedding and a LayerNorm: no elementwise activation after the first affine layer."""

    def __init__(self, classes=2):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.norm(self.patch_embed(x).flatten(2).transpose(1, 2)).mean(1))


def test_refusals_name_what_was_looked_for_found_and_the_remedy():
    with pytest.raises(SplitError, match=r"cannot split model 'vit' \(ViT\) .* gaussreg looks for attributes conv1, "
                                         r"\[bn1,\] and relu or act1 \(torchvision, timm\) or a features nn.Sequential"
                                         r".* its first layers are Conv2d \(patch_embed\), LayerNorm \(norm\), Linear "
                                         r"\(head\); its first affine layer is followed by LayerNorm, not an "
                                         r"elementwise activation: the analytic regularizer needs an elementwise "
                                         r"activation right after the first affine layer .* the methods other than the "
                                         r"regularizer \(baseline, augment, ...\) train this model as it is"):
        as_gaussnet(ViT(), "vit", (3, 8, 8))
    # ConvNeXt's stem: Conv2d then LayerNorm in a features-like Sequential
    with pytest.raises(SplitError, match=r"its features after its first affine layer comes LayerNorm; its first "
                                         r"affine layer is followed by LayerNorm, not an elementwise activation"):
        m = nn.Module()
        m.features = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.LayerNorm([4, 2, 2]))
        as_gaussnet(m, "convnext", (3, 8, 8))
    with pytest.raises(SplitError, match=r"its act1 is Mish, not an activation gaussreg knows \(ReLU, LeakyReLU, "
                                         r"ReLU6, GELU, Hardswish, ELU, SiLU\); if its forward does start with an "
                                         r"affine layer, \[BatchNorm,\] and one of these activations, wrap it as "
                                         r"gaussreg.science.models.GaussNet\(FirstBlock\(conv, bn\), rest, act=...\)"):
        as_gaussnet(_stem_model(nn.Mish()), "mish", (3, 6, 6))

    class Reused(nn.Module):  # uses its act1 twice: the split would drop the second
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GELU()
            self.conv2 = nn.Conv2d(4, 2, 4)

        def forward(self, x):
            return self.act1(self.conv2(self.act1(self.bn1(self.conv1(x))))).flatten(1)
    model = Reused()
    with pytest.raises(SplitError, match=r"has conv1, bn1 and act1, but its forward does not start with "
                                         r"act1\(bn1\(conv1\(x\)\)\), or it uses act1 again later"):
        as_gaussnet(model, "reused", (3, 6, 6))
    # left as it was: the methods that need no split train it whole
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.bn1, nn.BatchNorm2d)
    assert isinstance(model.act1, nn.GELU)


def test_a_model_without_first_activation_is_built_unsplit_for_methods_that_need_no_split():
    info = models.datasets.DatasetInfo("t", (3, 8, 8), 2, (0.5,) * 3, (0.25,) * 3)
    vit = ViT()
    with pytest.raises(SplitError, match="not an elementwise activation"):
        build_model(vit, info)  # an nn.Module is split as it is
    net = build_model(f"{__name__}:vit_factory", info, None, split=False)
    assert isinstance(net, ViT)
    with pytest.raises(SplitError, match="not an elementwise activation"):
        build_model(f"{__name__}:vit_factory", info, None, split=True)


def vit_factory(info):
    return ViT(info.classes)
