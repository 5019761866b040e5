"""Moment propagation past the first ReLU (gaussreg.science.adf) against Monte Carlo."""

import math

import pytest
import torch
from torch import nn

from gaussreg.runs.spec import SpecError, describe_params, resolve, run_id
from gaussreg.science import adf
from gaussreg.science.models import GaussNet, NormalizedLinear, build_model
from gaussreg.science.moments import relu_variance as relu_variance_f64_form
from gaussreg.science.regularizer import expected_logits, moment_loss

F64 = torch.float64


def _se_var(s):
    """Standard error of the sample variance."""
    m4 = ((s - s.mean()) ** 4).mean()
    return math.sqrt(max((m4 - s.var() ** 2).item(), 0.0) / len(s))


@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (1.5, 0.5), (-1.0, 0.7), (3.0, 0.1), (-0.2, 2.0)])
def test_rectified_gaussian_variance_matches_monte_carlo(mu, sigma):
    g = torch.Generator().manual_seed(0)
    s = torch.relu(mu + sigma * torch.randn(1_000_000, generator=g, dtype=F64))
    v = adf.relu_variance(torch.tensor(mu, dtype=F64), torch.tensor(sigma, dtype=F64)).item()
    assert abs(v - s.var().item()) <= 4 * _se_var(s)
    # the same value as the textbook form E[relu^2] - T^2 where that one is accurate (float64)
    ref = relu_variance_f64_form(torch.tensor(mu, dtype=F64), torch.tensor(sigma, dtype=F64)).item()
    assert v == pytest.approx(ref, rel=1e-9, abs=1e-15)


def test_rectified_gaussian_variance_keeps_float32_precision_far_from_zero():
    # mu / sigma = 1e4: E[relu^2] - T^2 cancels to noise in float32; the variance is sigma^2
    mu, sigma = torch.tensor([100.0, 3.0, -3.0]), torch.tensor([0.01, 1e-3, 1e-3])
    v = adf.relu_variance(mu, sigma)
    assert v[0].item() == pytest.approx(1e-4, rel=1e-4)
    assert v[1].item() == pytest.approx(1e-6, rel=1e-4)
    assert v[2].item() == 0.0


@pytest.mark.parametrize("m1,v1,m2,v2", [(0.0, 1.0, 0.0, 1.0), (1.0, 0.25, 0.0, 1.0), (-0.5, 2.0, 0.3, 0.1),
                                         (2.0, 0.01, 1.9, 0.04), (5.0, 1.0, -5.0, 1.0)])
def test_max_of_two_independent_gaussians_matches_monte_carlo(m1, v1, m2, v2):
    g = torch.Generator().manual_seed(1)
    n = 1_000_000
    x1 = m1 + math.sqrt(v1) * torch.randn(n, generator=g, dtype=F64)
    x2 = m2 + math.sqrt(v2) * torch.randn(n, generator=g, dtype=F64)
    s = torch.maximum(x1, x2)
    t = lambda v: torch.tensor([v], dtype=F64)  # noqa: E731
    mean, var = adf.max_moments(t(m1), t(v1), t(m2), t(v2))
    assert abs(mean.item() - s.mean().item()) <= 4 * s.std().item() / math.sqrt(n)
    assert abs(var.item() - s.var().item()) <= 4 * _se_var(s)
    # a MaxPool2d over a window of exactly these two units gives the same moments
    pool = nn.MaxPool2d((1, 2))
    pm, pv = adf.maxpool_moments(pool, torch.tensor([m1, m2], dtype=F64).view(1, 1, 1, 2),
                                 torch.tensor([v1, v2], dtype=F64).view(1, 1, 1, 2))
    assert pm.item() == pytest.approx(mean.item()) and pv.item() == pytest.approx(var.item())


def _two_hidden_mlp():
    torch.manual_seed(0)
    first = NormalizedLinear(16, 32, mean=(0.3,), std=(0.2,))
    rest = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    return GaussNet(first, rest, "mlp2").double()


@pytest.mark.parametrize("sigma,tol", [(0.1, 0.03), (0.5, 0.10)])
def test_two_hidden_layer_mlp_depth_all_is_closer_to_monte_carlo_than_depth_1(sigma, tol):
    """Measured (these seeds, 4,000 samples per input): mean relative L2 error of the
    logits 0.013 (depth "all") vs 0.051 (depth 1) at sigma 0.1, 0.071 vs 0.32 at sigma
    0.5 (part of it is Monte Carlo error). The stated tolerance on depth "all" is `tol`,
    on the average over 50 random inputs."""
    model = _two_hidden_mlp()
    x = torch.rand(50, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    g = torch.Generator().manual_seed(1)
    S = 4000
    with torch.no_grad():
        noisy = x.unsqueeze(1) + sigma * torch.randn(50, S, 1, 4, 4, generator=g, dtype=F64)
        mc = model(noisy.view(-1, 1, 4, 4)).view(50, S, 10).mean(1)
        err = {d: ((expected_logits(model, x, sigma, d) - mc).norm(dim=1) / mc.norm(dim=1))
               for d in (1, 2, "all")}
    assert torch.equal(expected_logits(model, x, sigma, 2), expected_logits(model, x, sigma, "all"))
    assert err["all"].mean() <= tol
    assert err["all"].mean() < 0.5 * err[1].mean()
    assert (err["all"] < err[1]).float().mean() >= 0.9


def test_lenet_tiny_sigma_is_the_clean_pass_and_huge_sigma_stays_finite():
    torch.manual_seed(0)
    model = build_model("lenet", "fashion-mnist")
    x = torch.rand(3, 1, 28, 28)
    y = torch.tensor([0, 3, 7])
    clean = model(x)
    for depth in (2, 3, "all"):
        assert torch.equal(expected_logits(model, x, 1e-8, depth), clean)
        assert torch.equal(expected_logits(model, x, 0.0, depth), clean)
    for depth in (2, "all"):
        model.zero_grad()
        L = moment_loss(model, x, y, 20.0, 1.0, depth)
        assert torch.isfinite(L.total) and torch.allclose(L.logits, clean, atol=1e-6)
        L.total.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        # the noise matters at this sigma: the expected logits are far from the clean ones
        assert not torch.allclose(expected_logits(model, x, 20.0, depth), clean, atol=1e-2)
    model.zero_grad()
    moment_loss(model, x, y, 1e-3, 1.0, "all").total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_moment_loss_terms_are_the_clean_and_the_deep_expected_pass():
    torch.manual_seed(0)
    model = build_model("lenet", "mnist")
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    L = moment_loss(model, x, y, 0.3, 0.5, 2)
    exp = expected_logits(model, x, 0.3, 2)
    assert torch.allclose(L.logits, model(x), atol=1e-5)
    assert torch.allclose(L.reg, nn.functional.cross_entropy(exp, y), atol=1e-5)
    assert torch.allclose(L.total, L.ce + 0.5 * L.reg)
    # depth 3 of LeNet ends after its last ReLU; the last layer is affine, so it equals "all"
    assert torch.allclose(expected_logits(model, x, 0.3, 3), expected_logits(model, x, 0.3, "all"), atol=1e-6)
    assert not torch.allclose(exp, expected_logits(model, x, 0.3, 1), atol=1e-4)


def test_bf16_autocast_propagates_in_float32():
    torch.manual_seed(0)
    model = build_model("lenet", "mnist")
    x = torch.rand(2, 1, 28, 28)
    ref = expected_logits(model, x, 0.5, "all")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = expected_logits(model, x, 0.5, "all")
    assert torch.isfinite(low).all()
    assert ((low.float() - ref).norm() / ref.norm()).item() < 0.05


def test_unsupported_modules_are_refused_by_name():
    first = NormalizedLinear(16, 8)
    model = GaussNet(first, nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)))
    x = torch.rand(4, 1, 4, 4)
    with pytest.raises(TypeError, match="BatchNorm1d, which is not supported"):
        expected_logits(model, x, 0.1, "all")
    model.eval()
    # depth 1 propagates nothing past the first ReLU: the paper's split still works
    assert torch.isfinite(expected_logits(model, x, 0.1, 1)).all()
    with pytest.raises(ValueError, match="integer >= 1 or 'all'"):
        expected_logits(model, x, 0.1, 0)


def test_depth_in_the_spec_default_keeps_run_ids():
    base = {"dataset": "fashion-mnist", "model": "lenet", "method": "regularizer", "params": {"sigma": 0.5, "alpha": 1}}
    plain = resolve(base)
    assert "depth" not in plain["params"]
    # the id this spec had before depth existed (main at 3fea10a)
    assert run_id(plain) == "run-regularizer-6875a966df"
    assert run_id(resolve({**base, "params": {**base["params"], "depth": 1}})) == run_id(plain)
    deep = resolve({**base, "params": {**base["params"], "depth": "all"}})
    assert deep["params"]["depth"] == "all" and run_id(deep) != run_id(plain)
    assert describe_params(deep) == "alpha=1 depth=all sigma=0.5"  # by name, as everywhere
    assert describe_params(resolve({**base, "params": {**base["params"], "depth": 2}})) == "alpha=1 depth=2 sigma=0.5"
    for bad, needle in [("ALL", "integer >= 1 or 'all'"), (0, "integer >= 1 or 'all'"), (True, "int or str"),
                        (2.5, "int or str")]:
        with pytest.raises(SpecError, match=needle):
            resolve({**base, "params": {**base["params"], "depth": bad}})


DEPTH_MANIFEST = """
[[experiment]]
name = "depth"
dataset = "synthetic"
model = "lenet"
max_epochs = 1
batch_size = 100
train_subset = 200
test_subset = 50
tolerance = 1.0
robustness = { sigmas = [0.0, 0.25] }
methods.baseline = {}
methods.regularizer = { sigma = 0.5, alpha = 1, depth = [2, "all"] }
"""


@pytest.mark.process
def test_a_manifest_with_a_depth_grid_runs_and_shows_depth(tmp_path):
    import json
    import subprocess

    from conftest import cli, python_env

    from gaussreg.runs import manifest

    m = tmp_path / "m.toml"
    m.write_text(DEPTH_MANIFEST)
    planned = manifest.load(m).runs()
    assert sorted(str(r.spec["params"]["depth"]) for r in planned if r.spec["method"] == "regularizer") \
        == ["2", "all"]
    env = python_env(COLUMNS="200")
    out = subprocess.run(cli("run", m, "--store", tmp_path / "runs", "--max-parallel", "2"),
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    ls = subprocess.run(cli("ls", "--store", tmp_path / "runs"), capture_output=True, text=True, env=env).stdout
    assert "depth=2" in ls and "depth=all" in ls
    runs = json.loads(subprocess.run(cli("ls", "--store", tmp_path / "runs", "--format", "json"),
                                     capture_output=True, text=True, env=env).stdout)
    assert len(runs) == 3 and {r["state"] for r in runs} == {"completed"}
    # the fair table names the winning regularizer configuration with its depth (when not 1)
    table = json.loads(subprocess.run(cli("table", "--store", tmp_path / "runs", "--format", "json"),
                                      capture_output=True, text=True, env=env).stdout)
    best = next(e for e in table["experiments"][0]["best"] if e["method"] == "regularizer")
    text = subprocess.run(cli("table", "--store", tmp_path / "runs"), capture_output=True, text=True, env=env).stdout
    assert describe_params({"method": "regularizer", "params": best["params"]}) in text
    assert table["experiments"][0]["counts"]["regularizer"] == {"total": 2, "completed": 2, "eligible": 2}


def test_analytic_gradients_of_relu_and_max_moments_match_finite_differences():
    torch.manual_seed(0)
    mu = (2 * torch.randn(3, 20, dtype=F64)).requires_grad_()
    sigma = (torch.rand(1, 20, dtype=F64) + 0.1).requires_grad_()  # broadcast over the batch, as after `first`
    assert torch.autograd.gradcheck(adf._ReluMoments.apply, (mu, sigma))
    args = [torch.randn(30, dtype=F64), torch.rand(30, dtype=F64) + 0.05,
            torch.randn(30, dtype=F64), 0.5 * torch.rand(30, dtype=F64) + 0.01]
    assert torch.autograd.gradcheck(adf.max_moments, [a.requires_grad_() for a in args])
    # a deterministic tie (theta = 0, d = 0) has finite gradients: the subgradient 1/2
    z = [torch.zeros(2, dtype=F64, requires_grad=True) for _ in range(4)]
    mean, var = adf.max_moments(*z)
    (mean.sum() + var.sum()).backward()
    assert z[0].grad.tolist() == [0.5, 0.5] and all(torch.isfinite(t.grad).all() for t in z)
