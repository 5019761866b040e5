import math

import pytest
import torch

from gaussreg.science.moments import relu_mean, relu_variance, shallow_mean

GRID = [(0.0, 1.0), (1.0, 1.0), (-1.0, 1.0), (2.5, 0.7), (-0.3, 2.0), (0.5, 1e-8), (0.0, 1e-8),
        (-0.5, 1e-8), (40.0, 1.0), (-40.0, 1.0), (4e-7, 1e-8), (-4e-7, 1e-8), (3.0, 0.075)]


def _mc(mu, sigma, n=1_000_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.relu(mu + sigma * torch.randn(n, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("mu,sigma", GRID)
def test_relu_mean_and_variance_match_monte_carlo(mu, sigma):
    s = _mc(mu, sigma)
    n = len(s)
    mean_mc, var_mc = s.mean().item(), s.var().item()
    se_mean = s.std().item() / math.sqrt(n)
    m4 = ((s - s.mean()) ** 4).mean().item()
    se_var = math.sqrt(max(m4 - var_mc ** 2, 0.0) / n)
    t = relu_mean(torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)).item()
    v = relu_variance(torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)).item()
    assert abs(t - mean_mc) <= 4 * se_mean + 1e-15 * max(1, abs(mu))
    assert abs(v - var_mc) <= 4 * se_var + 1e-12 * max(1, mu * mu)
    assert v >= 0


def test_sigma_zero_is_relu_and_never_nan():
    mu = torch.tensor([-2.0, -1e-30, 0.0, 1e-30, 3.0], requires_grad=True)
    sigma = torch.zeros(5, requires_grad=True)
    t = relu_mean(mu, sigma)
    assert torch.equal(t, torch.relu(mu.detach()))
    t.sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(sigma.grad).all()
    # dT/dmu = Phi(mu/0): the step, and at mu = 0 the limit Phi(0) = 1/2 of sigma -> 0+
    assert mu.grad.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_huge_ratios_are_exact_and_gradients_finite():
    mu = torch.tensor([1e6, -1e6, 40.0, -40.0, 1.0], requires_grad=True)
    sigma = torch.tensor([1e-3, 1e-3, 1.0, 1.0, 1e-12], requires_grad=True)
    t = relu_mean(mu, sigma)
    assert t.tolist() == [1e6, 0.0, 40.0, 0.0, 1.0]
    t.sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(sigma.grad).all()
    assert mu.grad.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_gradients_are_phi_and_Phi():
    mu = torch.tensor([-1.0, 0.0, 0.7], dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(relu_mean, (mu, sigma))
    relu_mean(mu, sigma).sum().backward()
    a = (mu / sigma).detach()
    assert torch.allclose(mu.grad, torch.special.ndtr(a))
    assert torch.allclose(sigma.grad, torch.exp(-a * a / 2) / math.sqrt(2 * math.pi))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    mu = torch.linspace(-3, 3, 101)
    sigma = torch.full_like(mu, 0.3)
    ref = relu_mean(mu.to(dtype).float(), sigma.to(dtype).float())
    out = relu_mean(mu.to(dtype), sigma.to(dtype))
    assert out.dtype == dtype
    assert torch.equal(out, ref.to(dtype))
    assert torch.isfinite(relu_variance(mu.to(dtype), sigma.to(dtype))).all()


def _random_net(seed, n=4, p=6, d=3):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(p, n, generator=g, dtype=torch.float64)
    c1 = torch.randn(p, generator=g, dtype=torch.float64) * 0.5
    B = torch.randn(d, p, generator=g, dtype=torch.float64)
    c2 = torch.randn(d, generator=g, dtype=torch.float64)
    return A, c1, B, c2, g


@pytest.mark.parametrize("full", [True, False])
def test_shallow_mean_matches_monte_carlo(full):
    A, c1, B, c2, g = _random_net(1)
    n = A.shape[1]
    means = torch.randn(2, n, generator=g, dtype=torch.float64)
    if full:
        L = torch.randn(n, n, generator=g, dtype=torch.float64) * 0.6
        cov = L @ L.T + 0.1 * torch.eye(n, dtype=torch.float64)
    else:
        cov = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    out = shallow_mean(A, c1, B, c2, means, cov)
    assert out.shape == (2, B.shape[0])
    chol = torch.linalg.cholesky(cov if full else torch.diag(cov))
    for i in range(2):
        z = torch.randn(1_000_000, n, generator=g, dtype=torch.float64)
        x = means[i] + z @ chol.T
        y = torch.relu(x @ A.T + c1) @ B.T + c2
        se = y.std(0) / math.sqrt(len(y))
        assert ((out[i] - y.mean(0)).abs() <= 4 * se).all(), (out[i], y.mean(0), se)


def test_shallow_mean_diagonal_equals_full_with_that_diagonal():
    A, c1, B, c2, g = _random_net(2)
    var = torch.rand(A.shape[1], generator=g, dtype=torch.float64)
    m = torch.randn(5, A.shape[1], generator=g, dtype=torch.float64)
    assert torch.allclose(shallow_mean(A, c1, B, c2, m, var), shallow_mean(A, c1, B, c2, m, torch.diag(var)))


def test_relu_branch_gradient_is_one_for_tiny_positive_mu():
    # float32 Phi(1e-8 / 1) rounds to exactly 0.5: a [Phi > 1/2] mask would zero these gradients
    from gaussreg.science.moments import relu_and_mean
    mu = torch.tensor([[1e-8, 5e-8, -1e-8, 0.0, 2.0]], requires_grad=True)
    sigma = torch.ones(1, 5)
    out = relu_and_mean(mu, sigma)
    out[:1].sum().backward()  # the relu branch only
    assert mu.grad.tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0]]


def _counted(fn):
    def counted(*a):
        counted.calls += 1
        return fn(*a)
    counted.calls = 0
    return counted


def _exact_both(mu, sigma):
    from gaussreg.science.moments import relu_and_mean
    return relu_and_mean(mu.double(), sigma.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_fused_half_precision_kernel_is_exact_to_its_rounding(dtype, monkeypatch):
    """Large half-precision activations take the fused kernel (an erfc approximation with
    |error| < 1.5e-7): every value within one rounding of the exact T (float64) plus 1e-6
    of the activation's scale, the gradients too; sigma = 0 and mu = 0 included. Its maths
    run uncompiled here (compiling costs ~10 s a dtype on a cold cache); the test below
    compares it compiled with it uncompiled."""
    from gaussreg.science import moments
    from gaussreg.science.moments import relu_and_mean
    monkeypatch.setattr(moments, "_COMPILE_FROM", 0)  # this small tensor through the fused path
    monkeypatch.setattr(moments, "_kernel", lambda fn, *args: fn(*args))
    monkeypatch.setattr(moments, "_fused_forward", _counted(moments._fused_forward))
    g = torch.Generator().manual_seed(0)
    mu = (torch.randn(64, 4, 6, 6, generator=g) * 3).to(dtype)
    mu[:, 0, 0, 0] = 0
    sigma = torch.rand(1, 4, 6, 6, generator=g) * 2
    sigma[0, 1, :2] = 0
    m, s = mu.clone().requires_grad_(), sigma.clone().requires_grad_()
    out = relu_and_mean(m, s)
    assert out.dtype == dtype and out.shape == (128, 4, 6, 6) and moments._fused_forward.calls == 1
    md, sd = mu.double().requires_grad_(), sigma.double().requires_grad_()
    exact = _exact_both(md, sd)
    scale = (mu.double().abs() + sigma.double()).repeat(2, 1, 1, 1)
    rounding = exact.abs() * torch.finfo(dtype).eps
    assert ((out.double() - exact).abs() <= rounding + 1e-6 * scale).all()
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad.to(dtype))
    exact.backward(grad.to(dtype).double())
    assert m.grad.dtype == dtype and s.grad.dtype == torch.float32
    assert ((m.grad.double() - md.grad).abs() <= md.grad.abs() * torch.finfo(dtype).eps + 1e-6).all()
    assert torch.allclose(s.grad.double(), sd.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.process  # inductor runs the C++ compiler
def test_the_fused_kernel_compiled_equals_it_uncompiled():
    """The fused kernel runs compiled (inductor here, Triton on a GPU); its maths run
    eagerly gives the same numbers."""
    from gaussreg.science import moments
    g = torch.Generator().manual_seed(1)
    mu = (torch.randn(200, 32, 14, 14, generator=g) * 2).bfloat16().contiguous(memory_format=torch.channels_last)
    sigma = torch.rand(1, 32, 14, 14, generator=g).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(400, 32, 14, 14, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    compiled = moments._kernel(moments._fused_forward, mu, sigma), moments._kernel(moments._fused_backward, grad, mu, sigma)
    assert moments._compiled.get(moments._fused_forward) not in (None, False)  # it did compile
    eager = moments._fused_forward(mu, sigma), moments._fused_backward(grad, mu, sigma)
    # inductor's exp and fused multiply-adds round differently in the last fp32 bits: at most
    # one bf16 rounding apart, and equal almost everywhere
    for c, e in ((compiled[0], eager[0]), (compiled[1][0], eager[1][0])):
        c, e = c.double(), e.double()
        assert ((c - e).abs() <= e.abs() * 2 ** -7 + 1e-30).all() and (c == e).double().mean() > 0.99
    assert torch.allclose(compiled[1][1], eager[1][1], rtol=1e-4, atol=1e-4)  # a sum over 200 rows, another order


def test_the_cpu_kernel_in_pieces_equals_it_in_one(monkeypatch):
    """relu_and_mean in many pieces along the batch (as a big batch on CPU runs) gives the values and
    gradients of one piece, sigma broadcast over the batch (its gradient summed piece by piece) or not."""
    from gaussreg.science import moments
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(10, 3, 4, 4, generator=g, dtype=torch.float64)
    grad = torch.randn(20, 3, 4, 4, generator=g, dtype=torch.float64)
    for sigma in (torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64),
                  torch.rand(10, 3, 4, 4, generator=g, dtype=torch.float64)):
        results = []
        for chunk in (1 << 22, 48):  # one piece; 10 pieces of 1 image (48 elements each)
            monkeypatch.setattr(moments, "_CHUNK_ELEMS", chunk)
            m, s = mu.clone().requires_grad_(), sigma.clone().requires_grad_()
            out = moments.relu_and_mean(m, s)
            out.backward(grad)
            results.append((out, m.grad, s.grad))
        assert len(moments._row_chunks(mu)) == 10
        for one, pieces in zip(*results):
            assert torch.allclose(one, pieces, rtol=1e-12, atol=1e-12)
