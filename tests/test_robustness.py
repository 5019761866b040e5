import math

import pytest
import torch
from torch import nn

from gaussreg.science.robustness import default_sigmas, robustness, score_of


class Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.tensor([0.0, 1.0, 0.0]))

    def forward(self, x):
        return self.b.expand(len(x), 3)


class Linear2D(nn.Module):
    """sign(w . x + b) as two logits."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.tensor(w)), nn.Parameter(torch.tensor(b))

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([-s, s], 1)


def test_constant_classifier_is_perfectly_robust():
    r = robustness(Constant(), torch.rand(50, 1, 6, 6), torch.ones(50, dtype=torch.long))
    assert r.per_sigma == [1.0] * 30 and r.score == 1.0
    assert r.sigmas == pytest.approx(default_sigmas()) and r.sigmas[-1] == pytest.approx(0.5)
    assert r.accuracy_per_sigma == [1.0] * 30 and r.clean_accuracy == 1.0


def _closed_form(d, r):
    # noise of norm exactly r in a uniform direction flips the prediction when its
    # component along w exceeds the distance d to the boundary: arccos(d/r)/pi of the circle
    return 1 - math.acos(min(d / r, 1.0)) / math.pi if r > 0 else 1.0


@pytest.mark.parametrize("samples", [1, 3])
def test_linear_classifier_matches_closed_form(samples):
    w, b = [0.6, 0.8], -0.5  # unit normal
    model = Linear2D(w, b)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(4000, 1, 1, 2, generator=g)
    d = (x.flatten(1) @ torch.tensor(w) + b).abs()
    sigmas = [0.0, 0.05, 0.1, 0.2, 0.3]
    r = robustness(model, x, sigmas=sigmas, samples=samples, seed=1)
    assert r.accuracy_per_sigma is None
    for s, got in zip(sigmas, r.per_sigma):
        probs = torch.tensor([_closed_form(di, s * math.sqrt(2)) for di in d.tolist()], dtype=torch.float64)
        exp = (probs ** samples).mean().item()  # all m draws must agree
        se = math.sqrt(max(exp * (1 - exp), 1e-12) / len(x))
        assert abs(got - exp) <= 4 * se + 1e-12, (s, got, exp)
    assert r.score == pytest.approx(score_of(sigmas, r.per_sigma))
    assert r.per_sigma[0] == 1.0 and r.per_sigma[-1] < 0.9


def test_deterministic_for_a_seed():
    model = Linear2D([1.0, -1.0], 0.1)
    x = torch.rand(500, 1, 1, 2, generator=torch.Generator().manual_seed(0))
    a = robustness(model, x, seed=3)
    b = robustness(model, x, seed=3)
    c = robustness(model, x, seed=4)
    assert a.per_sigma == b.per_sigma and a.score == b.score
    assert a.per_sigma != c.per_sigma


def test_score_is_trapezoidal_average():
    assert score_of([0, 0.5], [1.0, 0.0]) == pytest.approx(0.5)
    assert score_of([0, 0.1, 0.5], [1.0, 1.0, 0.0]) == pytest.approx((0.1 + 0.4 * 0.5) / 0.5)
    assert score_of([0.2], [0.7]) == pytest.approx(0.7)
    # the order the sigmas were given in does not matter (it gave 0.95 instead of 0.6 here)
    assert score_of([0.1, 0, 0.5], [1.0, 1.0, 0.0]) == score_of([0, 0.1, 0.5], [1.0, 1.0, 0.0])
    assert score_of([0.5, 0.1, 0], [0.0, 1.0, 1.0]) == score_of([0, 0.1, 0.5], [1.0, 1.0, 0.0])


def test_noise_has_exact_norm_and_clip_option():
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(len(x), 2)

    x = torch.full((4, 3, 5, 5), 0.5)
    robustness(Spy(), x, sigmas=[0.2, 0.4])
    noisy = seen[1].view(2, 4, -1) - 0.5
    n = 3 * 5 * 5
    assert torch.allclose(noisy.norm(dim=2)[0], torch.full((4,), 0.2 * math.sqrt(n)), rtol=1e-5)
    assert torch.allclose(noisy.norm(dim=2)[1], torch.full((4,), 0.4 * math.sqrt(n)), rtol=1e-5)
    seen.clear()
    robustness(Spy(), x, sigmas=[2.0], clip=True)
    assert seen[1].min() >= 0 and seen[1].max() <= 1


def test_progress_counts_noisy_draws_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(10, 1, 4, 4), torch.randint(0, 3, (10,))
    calls = []
    with_bar = robustness(model, x, y, sigmas=[0.0, 0.3], samples=3, seed=1, batch_size=8,
                          progress=lambda done, total: calls.append((done, total)))
    plain = robustness(model, x, y, sigmas=[0.0, 0.3], samples=3, seed=1, batch_size=8)
    assert with_bar.per_sigma == plain.per_sigma and with_bar.accuracy_per_sigma == plain.accuracy_per_sigma
    # chunks of 8 // 2 sigmas = 4 images, 3 draws each: one call per forward pass, ending at 10 x 3
    assert calls == [(4, 30), (8, 30), (12, 30), (16, 30), (20, 30), (24, 30), (26, 30), (28, 30), (30, 30)]
