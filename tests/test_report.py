import json
import subprocess

import pytest

from conftest import cli, python_env
from gaussreg import report
from gaussreg.spec import resolve, run_id
from gaussreg.store import Store, atomic_write_json


def add(st, exp, method, acc=None, rob=None, seed=0, state="completed", **params):
    spec = resolve({"dataset": "synthetic", "model": "mlp", "method": method, "params": params, "seed": seed,
                    "experiment": exp})
    run = st.create(spec, run_id(spec))
    run.write_status({"state": state})
    if state == "completed":
        atomic_write_json(run.file("result.json"), {"test_accuracy": acc, "robustness": rob})
    return run.id


@pytest.fixture
def store(tmp_path):
    st = Store(tmp_path / "runs")
    st.write_experiment("A", {"tolerance": 0.01})
    add(st, "A", "baseline", 0.90, 0.50, seed=0)
    add(st, "A", "baseline", 0.92, 0.60, seed=1)  # a0 = 0.91, threshold 0.90
    add(st, "A", "augment", 0.905, 0.70, sigma=0.25, folds=2)
    add(st, "A", "augment", 0.89, 0.95, sigma=0.25, folds=6)  # too inaccurate
    add(st, "A", "augment", 0.95, 0.80, sigma=0.5, folds=11)
    add(st, "A", "regularizer", 0.91, 0.78, sigma=0.25, alpha=1)
    add(st, "A", "regularizer", 0.92, 0.78, sigma=0.5, alpha=1)  # tie on R: the more accurate wins
    add(st, "A", "regularizer", 0.8999, 0.99, sigma=1, alpha=1)  # just below the threshold
    add(st, "A", "regularizer", 0.93, 0.70, sigma=2, alpha=1, seed=0)
    add(st, "A", "regularizer", 0.87, 0.74, sigma=2, alpha=1, seed=1)  # seeds average to 0.90 exactly
    add(st, "A", "regularizer", state="failed", sigma=5, alpha=1)
    st.write_experiment("B", {"tolerance": 0.0})
    add(st, "B", "baseline", 0.90, 0.50)
    add(st, "B", "augment", 0.85, 0.90, sigma=0.5, folds=2)
    add(st, "B", "regularizer", 0.80, 0.95, sigma=0.5, alpha=1)
    add(st, "C", "baseline", 0.90, 0.50)
    add(st, "C", "regularizer", 0.90, 0.90, sigma=0.5, alpha=1)
    add(st, "C", "augment", 0.90, 0.50, sigma=0.5, folds=2)
    add(st, "C", "augment", 0.91, 0.60, sigma=0.5, folds=21)
    add(st, "D", "augment", 0.91, 0.60, sigma=0.5, folds=21)
    return st


def _by_exp(t):
    return {r["experiment"]: r for r in t["experiments"]}


def test_fair_table_known_numbers(store):
    a = _by_exp(report.fair_table(store))["A"]
    assert a["tolerance"] == 0.01
    assert a["baseline"]["accuracy"] == pytest.approx(0.91) and a["baseline"]["robustness"] == pytest.approx(0.55)
    assert a["baseline"]["runs"] == 2
    best = {e["method"]: e for e in a["best"]}
    assert list(best) == ["baseline", "augment", "regularizer"]
    assert best["augment"]["params"] == {"sigma": 0.5, "folds": 11, "fresh_noise": True}
    assert best["augment"]["d_robustness"] == pytest.approx(0.25)
    assert best["regularizer"]["params"]["sigma"] == 0.5 and best["regularizer"]["accuracy"] == 0.92
    assert best["regularizer"]["d_accuracy"] == pytest.approx(0.01)
    per_sigma = {(e["method"], e["sigma"]): e["robustness"] for e in a["best_per_sigma"]}
    assert per_sigma == pytest.approx({("augment", 0.25): 0.70, ("augment", 0.5): 0.80, ("regularizer", 0.25): 0.78,
                                       ("regularizer", 0.5): 0.78, ("regularizer", 2.0): 0.72})
    reg2 = next(e for e in a["best_per_sigma"] if e.get("sigma") == 2.0)
    assert reg2["seeds"] == 2 and reg2["accuracy"] == pytest.approx(0.90)
    assert a["equivalent_folds"]["folds"] == 11 and a["equivalent_folds"]["text"] == "11"
    assert a["counts"] == {"baseline": {"total": 2, "completed": 2, "eligible": 2},
                           "augment": {"total": 3, "completed": 3, "eligible": 2},
                           "regularizer": {"total": 6, "completed": 5, "eligible": 4}}


def test_empty_eligible_set_more_folds_needed_and_no_baseline(store):
    t = _by_exp(report.fair_table(store))
    b = t["B"]
    assert [e["method"] for e in b["best"]] == ["baseline"]
    assert b["equivalent_folds"]["text"] == "no eligible regularizer run"
    assert b["counts"]["regularizer"] == {"total": 1, "completed": 1, "eligible": 0}
    assert t["C"]["equivalent_folds"]["text"] == "> 21" and t["C"]["equivalent_folds"]["folds"] is None
    assert t["D"]["baseline"] is None and t["D"]["best"] == []


def test_tolerance_override(store):
    b = _by_exp(report.fair_table(store, "B", tolerance=0.06))["B"]
    assert {e["method"] for e in b["best"]} == {"baseline", "augment"}
    b = _by_exp(report.fair_table(store, "B", tolerance=0.10))["B"]
    assert b["equivalent_folds"]["text"] == "> 2"


def test_cli_json_matches_and_other_formats(store):
    out = subprocess.run(cli("table", "--store", store.root, "--format", "json"), capture_output=True, text=True,
                         env=python_env())
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == json.loads(json.dumps(report.fair_table(store)))
    md = subprocess.run(cli("table", "--store", store.root, "--experiment", "A", "--format", "markdown"),
                        capture_output=True, text=True, env=python_env()).stdout
    assert "| regularizer | alpha=1 sigma=0.5 | 92.00 | +1.00 | 78.00 | +23.00 | 1 |" in md
    assert "equivalent folds of augmentation: 11" in md
    csv = subprocess.run(cli("table", "--store", store.root, "--format", "csv"), capture_output=True, text=True,
                         env=python_env()).stdout
    assert csv.splitlines()[0].startswith("experiment,dataset,model,tolerance,method")
    bad = subprocess.run(cli("table", "--store", store.root, "--tolerance", "3"), capture_output=True, text=True,
                         env=python_env())
    assert bad.returncode == 2 and "--tolerance" in bad.stderr
