import math

import pytest
import torch
from torch import nn

from gaussreg.data import datasets
from gaussreg.science.models import GaussNet, NormalizedConv2d, build_model, from_sequential, parameter_count
from gaussreg.science.regularizer import expected_logits, first_variance, moment_loss, sigma2

TINY = datasets.DatasetInfo("tiny", (1, 4, 4), 3, (0.3,), (0.2,))


def test_mlp_expected_logits_equal_monte_carlo_mean():
    # rest is affine for the mlp, so Eq. 4 is exact: compare with the mean of noisy logits
    torch.manual_seed(0)
    model = build_model("mlp", TINY).double()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    sigma = 0.3
    expected = expected_logits(model, x, sigma)
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        noisy = x[i] + sigma * torch.randn(400_000, 1, 4, 4, generator=g, dtype=torch.float64)
        with torch.no_grad():
            out = model(noisy)
        se = out.std(0) / math.sqrt(len(out))
        assert ((expected[i] - out.mean(0)).abs() <= 4 * se).all()
    # and the noise matters: the expected logits are not the clean ones
    assert not torch.allclose(expected, model(x), atol=1e-3)


def test_lenet_expected_logits_finite_differentiable_and_exact_at_zero_noise():
    torch.manual_seed(0)
    model = build_model("lenet", "mnist")
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(expected_logits(model, x, 0.0), model(x))
    out = expected_logits(model, x, 0.4)
    assert torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.first.weight.grad.abs().sum() > 0


def _explicit_matrix(layer, shape):
    """A and c of the affine map x -> layer(x), column by column."""
    n = math.prod(shape)
    with torch.no_grad():
        c = layer(torch.zeros(1, *shape, dtype=torch.float64)).flatten()
        basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
        A = (layer(basis).flatten(1) - c).T
    return A, c


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 2), (2, 0)])
def test_conv_sigma2_equals_explicit_matrix(stride, padding):
    torch.manual_seed(stride * 10 + padding)
    layer = NormalizedConv2d(2, 3, 3, stride=stride, padding=padding, mean=(0.4, 0.6), std=(0.2, 0.5)).double()
    shape = (2, 5, 6)
    A, _ = _explicit_matrix(layer, shape)
    var = torch.rand(shape, dtype=torch.float64)  # per-pixel noise variance
    ref = torch.sqrt(torch.diag(A @ torch.diag(var.flatten()) @ A.T))
    x = torch.rand(1, *shape, dtype=torch.float64)
    got = sigma2(layer, var.sqrt(), x).flatten()
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)
    # padding borders see fewer noisy pixels than the interior
    if padding:
        full = sigma2(layer, torch.ones(shape, dtype=torch.float64), x)[0, 0]
        assert full[0, 0] < full[full.shape[0] // 2, full.shape[1] // 2]


def test_folded_normalisation_matches_prenormalised_network():
    torch.manual_seed(0)
    model = build_model("lenet", "cifar10").double()
    mean, std = model.first.input_mean, model.first.input_std
    assert torch.allclose(std.flatten(), torch.tensor(datasets.DATASETS["cifar10"].std, dtype=torch.float64))
    plain = nn.Conv2d(3, 32, 5, padding=2).double()
    plain.load_state_dict({k: v for k, v in model.first.state_dict().items() if not k.startswith("input_")})
    net = GaussNet(plain, model.rest)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64).view(3, 1, 1)  # per channel
    a = expected_logits(model, x, sigma)
    b = expected_logits(net, (x - mean) / std, sigma / std[0])  # noise rescaled by hand
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


def test_moment_loss_terms():
    torch.manual_seed(0)
    model = build_model("lenet", "mnist")
    x, y = torch.rand(5, 1, 28, 28), torch.randint(0, 10, (5,))
    m = moment_loss(model, x, y, 0.25, 2.0)
    ce = nn.functional.cross_entropy(model(x), y)
    reg = nn.functional.cross_entropy(expected_logits(model, x, 0.25), y)
    assert torch.allclose(m.ce, ce, atol=1e-6) and torch.allclose(m.reg, reg, atol=1e-6)
    assert torch.allclose(m.total, ce + 2.0 * reg, atol=1e-6)
    assert m.reg.item() != pytest.approx(m.ce.item(), abs=1e-4)


def test_linear_first_layer_variance_flattens_and_folds():
    model = build_model("mlp", TINY).double()
    var = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    A, _ = _explicit_matrix(model.first, TINY.shape)
    ref = A.square() @ var.flatten()
    assert torch.allclose(first_variance(model.first, var)[0], ref)


def test_parameter_counts():
    conv = lambda cin, cout, k: cin * cout * k * k + cout  # noqa: E731
    fc = lambda i, o: i * o + o  # noqa: E731
    lenet_mnist = conv(1, 32, 5) + conv(32, 64, 5) + fc(64 * 7 * 7, 1024) + fc(1024, 10)
    lenet_cifar = conv(3, 32, 5) + conv(32, 64, 5) + fc(64 * 8 * 8, 1024) + fc(1024, 10)
    alex = lambda k: (conv(3, 64, 11) + conv(64, 192, 5) + conv(192, 384, 3) + conv(384, 256, 3)  # noqa: E731
                      + conv(256, 256, 3) + fc(256, 4096) + fc(4096, 4096) + fc(4096, k))
    assert lenet_mnist == 3_274_634
    assert parameter_count(build_model("lenet", "mnist")) == lenet_mnist
    assert parameter_count(build_model("lenet", "cifar10")) == lenet_cifar
    assert parameter_count(build_model("alexnet", "cifar10")) == alex(10)
    assert parameter_count(build_model("alexnet", "cifar100")) == alex(100)


def test_model_is_rest_of_relu_of_first_and_shapes():
    for name, ds, shape in [("lenet", "mnist", (1, 28, 28)), ("lenet", "cifar100", (3, 32, 32)),
                            ("alexnet", "cifar10", (3, 32, 32)), ("mlp", "fashion-mnist", (1, 28, 28))]:
        m = build_model(name, ds)
        x = torch.rand(2, *shape)
        assert torch.equal(m(x), m.rest(torch.relu(m.first(x))))
        assert m(x).shape == (2, datasets.DATASETS[ds].classes)
    with pytest.raises(ValueError, match="32x32"):
        build_model("alexnet", "mnist")


def test_custom_sequential():
    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    m = from_sequential(seq)
    x = torch.rand(2, 1, 4, 4)
    assert torch.equal(m(x), seq(x))
    assert torch.equal(expected_logits(m, x, 0.0), seq(x))
    with pytest.raises(TypeError):
        from_sequential(nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))


def _forbid_host_syncs(monkeypatch):
    """Make every way a tensor's value reaches Python raise: on a GPU each one blocks the host."""
    def sync(*_a, **_k):
        raise AssertionError("host sync in the per-batch path")
    for name in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(torch, "as_tensor", sync)  # a tensor from a float is a blocking host-to-device copy


@pytest.mark.parametrize("depth", [1, "all"])
def test_a_float_sigma_batch_reads_nothing_back_from_the_device(monkeypatch, depth):
    torch.manual_seed(0)
    model = build_model("lenet", datasets.DatasetInfo("tiny", (1, 28, 28), 10, (0.3,), (0.2,)))
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    want = moment_loss(model, x, y, 0.4, 0.5, depth=depth)
    _forbid_host_syncs(monkeypatch)
    got = moment_loss(model, x, y, 0.4, 0.5, depth=depth)
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(got, want))  # same bits as before
    with pytest.raises(AssertionError, match="host sync"):  # the trap is armed: a tensor sigma checks its sign
        _forbid_host_syncs(monkeypatch)
        moment_loss(model, x, y, torch.tensor(0.4), 0.5, depth=depth)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="sigma must be non-negative"):
        moment_loss(model, x, y, -0.1, 0.5)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_first_layer_variance_is_fp32_under_autocast_and_finite_at_large_sigma(half):
    torch.manual_seed(0)
    model = build_model("lenet", datasets.DatasetInfo("tiny", (1, 28, 28), 10, (0.3,), (0.2,)))
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    sigma = 200.0  # sigma2^2 ~ 1e6 here: past fp16's 65504
    with torch.no_grad():
        exact = sigma2(model.first, sigma, x.double())
        assert exact.max() ** 2 > 65504
        with torch.autocast("cpu", dtype=half):
            assert model.first(x).dtype == half  # autocast is on for the layer itself
            got = sigma2(model.first, sigma, x)
            loss = moment_loss(model, x, y, sigma, 1.0, depth="all")
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.allclose(got.double(), exact, rtol=1e-5)
    assert all(torch.isfinite(t).all() for t in loss)


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_first_block_matches_monte_carlo(training):
    # conv -> BatchNorm -> ReLU: BN is affine given its statistics, so sigma2 is the conv's
    # variance map times (gamma / sqrt(var + eps))^2. In training mode the statistics are
    # those of the clean batch (the noisy copies are normalised with them too); in eval
    # mode the running ones.
    from gaussreg.science.models import FirstBlock
    from gaussreg.science.moments import relu_mean
    torch.manual_seed(3)
    conv = NormalizedConv2d(2, 3, 3, padding=1, mean=(0.4, 0.6), std=(0.2, 0.5))
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.running_mean.copy_(torch.tensor([0.2, -0.1, 0.4]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.2]))
    first = FirstBlock(conv, bn).double().train(training)
    x = torch.rand(8, 2, 5, 5, dtype=torch.float64)
    sigma = 0.15
    with torch.no_grad():
        z = conv(x)
        if training:
            m, v = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
        else:
            m, v = bn.running_mean.double(), bn.running_var.double()
        mu2 = first(x)
        s2 = sigma2(first, sigma, x)
        expected = relu_mean(mu2, s2.expand_as(mu2))
        shape = (1, -1, 1, 1)
        g = torch.Generator().manual_seed(4)
        for i in range(2):
            noisy = x[i] + sigma * torch.randn(200_000, 2, 5, 5, generator=g, dtype=torch.float64)
            pre = (conv(noisy) - m.view(shape)) / (v + bn.eps).sqrt().view(shape) * bn.weight.view(shape) \
                + bn.bias.view(shape)
            assert torch.allclose(pre.mean(0), mu2[i], atol=5e-3)  # the clean batch's BN is the mean's map
            assert torch.allclose(pre.var(0), s2[0].square(), rtol=0.02)  # Eq. 5 through the BN scale
            out = torch.relu(pre)
            se = out.std(0) / math.sqrt(len(out))
            # + 1e-6: a unit 5 sigma below 0 has E[relu] ~ 1e-8 and no positive draw at all
            assert ((expected[i] - out.mean(0)).abs() <= 4 * se + 1e-6).all()
    # and the scale matters: without it the variance would be the conv's alone
    assert not torch.allclose(s2, sigma2(conv.double(), sigma, x))
