"""Consistency regularization (Jeong and Shin 2020) and stability training (Zheng et al.
2016): each loss against a hand computation, and each through a sweep to the fair table."""

import csv
import json
import math
import subprocess
import textwrap

import pytest
import torch
from conftest import cli, python_env
from torch import nn

from gaussreg.runs.spec import SpecError, default_certify_sigma
from gaussreg.runs.store import Store
from gaussreg.science.methods import check_params, make_method
from gaussreg.views import plot
from gaussreg.views.export import export

W = [[0.5, -1.0], [1.5, 0.25], [-0.75, 0.8]]  # a Linear(2, 3): three classes
B = [0.1, -0.2, 0.05]
X = [[0.2, 0.9], [0.7, 0.1], [0.4, 0.4]]
Y = [0, 1, 2]


def _net():
    net = nn.Linear(2, 3).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor(W, dtype=torch.float64))
        net.bias.copy_(torch.tensor(B, dtype=torch.float64))
    return net


def _softmax(x):
    """softmax of the Linear's logits at the point x, in Python floats."""
    z = [sum(w * v for w, v in zip(row, x)) + b for row, b in zip(W, B)]
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _noise(seed, copies):
    """The noise the method draws: copies x (3, 2) standard normals, in order, from a generator of this seed."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 2, generator=g, dtype=torch.float64).tolist() for _ in range(copies)]


def test_consistency_loss_is_mean_ce_plus_lbd_kl_plus_eta_entropy():
    sigma, m, lbd, eta = 0.3, 3, 7.0, 0.5
    method = make_method("consistency", {"sigma": sigma, "m": m, "lbd": lbd, "eta": eta})
    x, y = torch.tensor(X, dtype=torch.float64), torch.tensor(Y)
    L = method.loss(_net(), x, y, torch.Generator().manual_seed(11))
    z = _noise(11, m)
    ce = kl = ent = 0.0
    for i in range(3):
        ps = [_softmax([x + sigma * n for x, n in zip(X[i], z[c][i])]) for c in range(m)]
        pbar = [sum(p[k] for p in ps) / m for k in range(3)]
        ce += sum(-math.log(p[Y[i]]) for p in ps) / m
        kl += sum(sum(pbar[k] * math.log(pbar[k] / p[k]) for k in range(3)) for p in ps) / m
        ent += -sum(q * math.log(q) for q in pbar)
    ce, kl, ent = ce / 3, kl / 3, ent / 3
    assert kl > 1e-4  # the copies disagree: the term is not trivially zero
    assert L.terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert L.terms["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert L.terms["entropy"].item() == pytest.approx(ent, rel=1e-6)
    assert L.total.item() == pytest.approx(ce + lbd * kl + eta * ent, rel=1e-6)
    z0 = torch.tensor(z[0], dtype=torch.float64)  # the train accuracy's logits: the first noisy copy's
    assert torch.allclose(L.logits, _net()(x + sigma * z0), rtol=1e-12, atol=0)
    assert tuple(L.terms) == method.term_names == ("ce", "kl", "entropy")


def test_consistency_without_noise_has_no_kl_and_the_entropy_of_the_prediction():
    method = make_method("consistency", {"sigma": 0.0})
    L = method.loss(_net(), torch.tensor(X, dtype=torch.float64), torch.tensor(Y), torch.Generator())
    ent = sum(-sum(p * math.log(p) for p in _softmax(x)) for x in X) / 3
    assert L.terms["kl"].item() == pytest.approx(0.0, abs=1e-12)
    assert L.terms["entropy"].item() == pytest.approx(ent, rel=1e-9)


def test_stability_loss_is_ce_plus_alpha_kl_of_clean_to_noisy():
    sigma, alpha = 0.4, 3.0
    method = make_method("stability", {"sigma": sigma, "alpha": alpha})
    x, y = torch.tensor(X, dtype=torch.float64), torch.tensor(Y)
    L = method.loss(_net(), x, y, torch.Generator().manual_seed(5))
    (z,) = _noise(5, 1)
    ce = stab = 0.0
    for i in range(3):
        p, q = _softmax(X[i]), _softmax([x + sigma * n for x, n in zip(X[i], z[i])])
        ce += -math.log(p[Y[i]])
        stab += sum(p[k] * math.log(p[k] / q[k]) for k in range(3))
    ce, stab = ce / 3, stab / 3
    assert stab > 1e-4
    assert L.terms["ce"].item() == pytest.approx(ce, rel=1e-9)
    assert L.terms["stab"].item() == pytest.approx(stab, rel=1e-6)
    assert L.total.item() == pytest.approx(ce + alpha * stab, rel=1e-6)
    assert torch.equal(L.logits, _net()(x))  # the clean logits: the train accuracy is the clean one


def test_stability_and_consistency_gradients_flow_through_every_copy():
    """Both terms are differentiated through the clean and the noisy passes (no detach)."""
    for name, params, term in (("stability", {"sigma": 0.5, "alpha": 1.0}, "stab"),
                               ("consistency", {"sigma": 0.5}, "kl")):
        net = _net()
        L = make_method(name, params).loss(net, torch.tensor(X, dtype=torch.float64), torch.tensor(Y),
                                           torch.Generator().manual_seed(1))
        (g,) = torch.autograd.grad(L.terms[term], [net.weight])
        assert g.abs().sum().item() > 1e-6


def test_parameters_defaults_cost_and_training_sigma():
    assert check_params("consistency", {"sigma": 0.25}) == {"sigma": 0.25, "m": 2, "lbd": 10.0, "eta": 0.5}
    assert check_params("stability", {"sigma": 1}) == {"sigma": 1.0, "alpha": 0.01}
    for name, bad, key in (("consistency", {"sigma": 0.25, "m": 0}, "m"), ("consistency", {"m": 2}, "sigma"),
                           ("stability", {"sigma": 0.25, "alpha": -1.0}, "alpha"),
                           ("stability", {"sigma": 0.25, "beta": 1.0}, "beta")):
        with pytest.raises(SpecError) as e:
            check_params(name, bad)
        assert e.value.key == f"params.{key}"
    assert make_method("consistency", {"sigma": 0.25, "m": 4}).passes(100) == {"clean": 0, "noisy": 400,
                                                                              "expected": 0}
    assert make_method("stability", {"sigma": 0.25}).passes(100) == {"clean": 100, "noisy": 100, "expected": 0}
    # their noise level is the training sigma: certification's default
    assert default_certify_sigma({"method": "consistency", "params": {"sigma": 0.5}}) == 0.5
    assert default_certify_sigma({"method": "stability", "params": {"sigma": 0.12}}) == 0.12


def test_validation_objective_is_the_clean_cross_entropy():
    net, x, y = _net(), torch.tensor(X, dtype=torch.float64), torch.tensor(Y)
    for name in ("consistency", "stability"):
        L = make_method(name, {"sigma": 0.5}).objective(net, x, y, torch.Generator())
        assert L.total.item() == pytest.approx(nn.functional.cross_entropy(net(x), y).item(), rel=1e-12)


SWEEP = '''
[defaults]
dataset = "synthetic"
model = "mlp"
preset = "lenet"
optimizer = { lr = 0.01 }
batch_size = 100
max_epochs = 2
train_subset = 600
test_subset = 200
robustness = { sigmas = [0.0, 0.25, 0.5] }

[[experiment]]
name = "noise-methods"
tolerance = 1.0
methods.baseline = {}
methods.consistency = { sigma = 0.25, lbd = [5.0, 10.0] }
methods.stability = { sigma = 0.25, alpha = 1.0 }
'''


@pytest.mark.process
def test_both_train_through_the_scheduler_and_compete_in_the_fair_table(tmp_path):
    (tmp_path / "m.toml").write_text(textwrap.dedent(SWEEP))
    store = tmp_path / "runs"

    def run(*args):
        return subprocess.run(cli(*args), capture_output=True, text=True, env=python_env(COLUMNS="200"))

    out = run("run", tmp_path / "m.toml", "--store", store, "--gpus", "none")
    assert out.returncode == 0, out.stdout + out.stderr
    ls = json.loads(run("ls", "--store", store, "--format", "json").stdout)
    assert len(ls) == 4 and {r["state"] for r in ls} == {"completed"}
    by = {r["spec"]["method"] + str(r["spec"]["params"].get("lbd", "")): r["result"] for r in ls}
    assert all(r["test_accuracy"] > 0.5 for r in by.values()), by  # 10 classes: chance is 0.1
    # cost as recorded: 2 epochs of 600 training images (train_subset is taken after the validation split)
    assert by["consistency10.0"]["images"] == {"clean": 0, "noisy": 2 * 600 * 2, "expected": 0}
    assert by["stability"]["images"] == {"clean": 2 * 600, "noisy": 2 * 600, "expected": 0}
    table = json.loads(run("table", "--store", store, "--format", "json", "--all").stdout)
    (comp,) = table["experiments"]
    best = {e["method"]: e for e in comp["best"]}
    assert set(best) == {"baseline", "consistency", "stability"}
    assert best["consistency"]["params"]["lbd"] in (5.0, 10.0) and best["consistency"]["steps_x"] == 1.0
    per_sigma = {(e["method"], e["sigma"]) for e in comp["best_per_sigma"]}
    assert {("consistency", 0.25), ("stability", 0.25)} <= per_sigma  # their noise is the training sigma
    assert comp["counts"]["consistency"] == {"total": 2, "completed": 2, "eligible": 2}
    for r in ls:  # every epoch logs the method's own terms
        lines = (store / r["id"] / "events.jsonl").read_text().splitlines()
        terms = {tuple(e["train_terms"]) for e in map(json.loads, lines) if e.get("type") == "epoch"}
        assert terms == {make_method(r["spec"]["method"], r["spec"]["params"]).term_names}, r["id"]
    # exports: each term its own column, the parameters and the cost
    st = Store(store)
    rows = {r["run_id"]: r for r in csv.DictReader(export(st, "epochs", "csv").splitlines())}
    cons = next(r for r in rows.values() if r["method"] == "consistency")
    assert float(cons["train_loss"]) == pytest.approx(float(cons["train_ce"]) + float(cons["train_kl"]) * float(
        next(x for x in ls if x["id"] == cons["run_id"])["spec"]["params"]["lbd"]) + 0.5 * float(cons["train_entropy"]),
        rel=1e-4)  # CSV keeps 6 significant digits
    assert next(r for r in rows.values() if r["method"] == "stability")["train_stab"] != ""
    runs = list(csv.DictReader(export(st, "runs", "csv").splitlines()))
    assert {(r["method"], r["param_sigma"], r["images_noisy"]) for r in runs if r["method"] == "stability"} == {
        ("stability", "0.25", "1200")}
    # figures: the new methods in their own colours
    pytest.importorskip("matplotlib")
    files = plot.plot(st, tmp_path / "fig", fmt="svg")
    scatter = next(f for f in files if "accuracy-vs-robustness" in str(f)).read_text()
    for method in ("consistency", "stability"):
        assert plot.COLORS[method].lstrip("#").lower() in scatter.lower() and f"{method} (" in scatter
