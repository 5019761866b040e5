"""The fair table flags a configuration whose predictions are (nearly) constant (robust
because it ignores its input) and never chooses it: rows made from real models' numbers."""

import pytest
import torch
from conftest import gaussreg
from factories import table_run
from torch import nn

from gaussreg.data import loading
from gaussreg.runs.store import Store
from gaussreg.science.robustness import constant_accuracy, nearly_constant, robustness
from gaussreg.views import report

SIGMAS = [0.0, 0.25, 0.5]


def _images(split):
    x, y = loading.synthetic(split)
    return x.float() / 255, y


def _trained_linear():
    """A linear classifier trained on the synthetic set: it reads its input."""
    torch.manual_seed(0)
    x, y = _images("train")
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def _constant(cls=3):
    """The classifier the issue met (a network that collapsed): the same answer for every input."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    with torch.no_grad():
        net[1].weight.mul_(1e-6)  # it still reads its input, a millionth as much as its bias
        net[1].bias.copy_(torch.nn.functional.one_hot(torch.tensor(cls), 10).float() * 5)
    return net


def _numbers(net):
    """What a worker records of a model: test accuracy, R and the accuracy per sigma, with
    the constant classifier's accuracy on the same images (validation = test here)."""
    x, y = _images("test")
    with torch.no_grad():
        r = robustness(net, x, y, sigmas=SIGMAS)
    chance = constant_accuracy(y)
    return r.clean_accuracy, r.score, {"sigmas": SIGMAS, "accuracy_per_sigma": r.accuracy_per_sigma,
                                       "constant_accuracy": {"val": chance, "test": chance}}


@pytest.fixture(scope="module")
def models():
    return {"trained": _numbers(_trained_linear()), "constant": _numbers(_constant())}


def test_the_real_numbers_are_what_the_rule_is_about(models):
    acc, r, extra = models["constant"]
    chance = extra["constant_accuracy"]["test"]
    x, y = _images("test")
    assert chance == pytest.approx(float((y == y.bincount().argmax()).float().mean()))  # the largest class
    assert r == 1.0 and acc == pytest.approx(float((y == 3).float().mean()))  # it always says 3
    assert extra["accuracy_per_sigma"] == pytest.approx([acc] * 3)  # noisy accuracy equals clean
    assert nearly_constant(acc, r, chance)
    tacc, tr, _ = models["trained"]
    assert tacc > 0.8 and not nearly_constant(tacc, tr, chance)
    # the boundaries: R 99 % and 5 points above the constant answer
    assert nearly_constant(chance + 0.05, 0.99, chance) and not nearly_constant(chance + 0.051, 1.0, chance)
    assert not nearly_constant(chance, 0.989, chance) and not nearly_constant(None, 1.0, chance)


def test_a_constant_configuration_is_flagged_never_chosen_and_says_why(tmp_path, models):
    st = Store(tmp_path / "runs")
    for seed in (0, 1):
        acc, r, extra = models["trained"]
        table_run(st, "K", "baseline", acc, r, seed=seed, cost=extra)
        acc, r, extra = models["constant"]
        table_run(st, "K", "consistency", acc, r, seed=seed, cost=extra, sigma=1.0)
    acc, r, extra = models["trained"]
    table_run(st, "K", "stability", acc - 0.02, r, cost=extra, sigma=0.25)
    # tolerance 1: by accuracy alone the constant configuration would compete, and win on R
    (rec,) = report.fair_table(st, tolerance=1.0)["experiments"]
    assert [e["method"] for e in rec["best"]] == ["baseline", "stability"]
    assert ("consistency", 1.0) not in {(e["method"], e["sigma"]) for e in rec["best_per_sigma"]}
    const = next(c for c in rec["configurations"] if c["method"] == "consistency")
    chance = extra["constant_accuracy"]["val"]
    assert not const["eligible"] and const["reason"] == (
        f"predictions (nearly) constant: validation accuracy {const['selection_accuracy'] * 100:.2f}% is within 5 "
        f"points of always answering the most frequent class ({chance * 100:.2f}%) and R 100.00% >= 99%: "
        "robust because it ignores its input")
    assert rec["counts"]["consistency"]["eligible"] == 0 and not any("constant" in w for w in rec["warnings"])
    out = gaussreg("table", "--store", st.root, "--all", "--tolerance", "1", "--format", "markdown")
    assert out.exit_code == 0 and "predictions (nearly) constant: validation accuracy" in out.stdout
    # --select test reads the test split's numbers and the test split's constant answer
    (rec,) = report.fair_table(st, tolerance=1.0, select="test")["experiments"]
    assert next(c for c in rec["configurations"] if c["method"] == "consistency")["reason"].startswith(
        "predictions (nearly) constant: test accuracy")


def test_a_constant_baseline_is_flagged_with_a_warning_and_old_runs_use_the_datasets_classes(tmp_path, models):
    st = Store(tmp_path / "runs")
    acc, r, extra = models["constant"]
    old = {k: v for k, v in extra.items() if k != "constant_accuracy"}  # before the worker recorded it
    table_run(st, "K", "baseline", acc, r, cost=old)  # synthetic: 10 classes, 1/10 is the constant answer
    acc, r, extra = models["trained"]
    table_run(st, "K", "stability", acc, r, cost=extra, sigma=0.25)
    (rec,) = report.fair_table(st, tolerance=1.0)["experiments"]
    base = next(c for c in rec["configurations"] if c["method"] == "baseline")
    assert base["reason"].startswith("predictions (nearly) constant") and "(10.00%)" in base["reason"]
    assert [e["method"] for e in rec["best"]] == ["stability"]
    assert rec["warnings"] == [f"the baseline's {base['reason']}; a0 is chance accuracy, so the comparison says "
                               "nothing about robustness"]
