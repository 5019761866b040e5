import json
import re
import subprocess

import pytest
from conftest import cli, python_env

from gaussreg.runs.spec import resolve, run_id
from gaussreg.runs.store import Store, atomic_write_json
from gaussreg.views import report


def add(st, exp, method, acc=None, rob=None, seed=0, state="completed", val=None, keys=None, noisy=None, **params):
    """A hand-made run; validation numbers equal the test ones unless val=(acc, R) says otherwise."""
    spec = resolve({"dataset": "synthetic", "model": "mlp", "method": method, "params": params, "seed": seed,
                    "experiment": exp, **(keys or {})})
    run = st.create(spec, run_id(spec))
    run.write_status({"state": state})
    if state == "completed":
        va, vr = val if val else (acc, rob)
        res = {"test_accuracy": acc, "robustness": rob, "best_val_accuracy": va, "val_robustness": vr}
        if noisy is not None:
            res.update(sigmas=[0.0, 0.5], accuracy_per_sigma=noisy)
        atomic_write_json(run.file("result.json"), res)
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
    assert a["equivalent_folds"]["folds"] == 11 and a["equivalent_folds"]["n_tilde"] == 12
    assert a["equivalent_folds"]["text"] == "Ñ = 12"
    assert a["counts"] == {"baseline": {"total": 2, "completed": 2, "eligible": 2},
                           "augment": {"total": 3, "completed": 3, "eligible": 2},
                           "regularizer": {"total": 6, "completed": 5, "eligible": 4}}


def test_empty_eligible_set_more_folds_needed_and_no_baseline(store):
    t = _by_exp(report.fair_table(store))
    b = t["B"]
    assert [e["method"] for e in b["best"]] == ["baseline"]
    assert b["equivalent_folds"]["text"] == "no eligible regularizer run"
    assert b["counts"]["regularizer"] == {"total": 1, "completed": 1, "eligible": 0}
    assert t["C"]["equivalent_folds"]["text"] == "Ñ > 22" and t["C"]["equivalent_folds"]["folds"] is None
    assert t["D"]["baseline"] is None and t["D"]["best"] == []


def test_tolerance_override(store):
    b = _by_exp(report.fair_table(store, "B", tolerance=0.06))["B"]
    assert {e["method"] for e in b["best"]} == {"baseline", "augment"}
    b = _by_exp(report.fair_table(store, "B", tolerance=0.10))["B"]
    assert b["equivalent_folds"]["text"] == "Ñ > 3"


def test_cli_json_matches_and_other_formats(store):
    out = subprocess.run(cli("table", "--store", store.root, "--format", "json"), capture_output=True, text=True,
                         env=python_env())
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == json.loads(json.dumps(report.fair_table(store)))
    md = subprocess.run(cli("table", "--store", store.root, "--experiment", "A", "--format", "markdown"),
                        capture_output=True, text=True, env=python_env()).stdout
    assert "| regularizer | alpha=1 sigma=0.5 | 1 | 92.00 | +1.00 | 78.00 | +23.00 | - | - |" in md
    assert "equivalent augmentation (the paper's Ñ = folds + 1): Ñ = 12" in md
    assert "selected on validation" in md
    csv = subprocess.run(cli("table", "--store", store.root, "--format", "csv"), capture_output=True, text=True,
                         env=python_env()).stdout
    import csv as csv_module
    rows = list(csv_module.DictReader(csv.splitlines()))
    reg = next(r for r in rows if r["experiment"] == "A" and r["table"] == "best" and r["method"] == "regularizer")
    assert reg["accuracy"] == "0.92" and reg["d_accuracy"] == "0.01" and reg["robustness"] == "0.78"
    assert {r["table"] for r in rows} == {"best", "best_per_sigma"}
    assert next(r for r in rows if r["table"] == "best_per_sigma" and r["sigma"] == "2.0")["seeds"] == "2"
    bad = subprocess.run(cli("table", "--store", store.root, "--tolerance", "3"), capture_output=True, text=True,
                         env=python_env())
    assert bad.returncode == 2 and "--tolerance" in bad.stderr
    # into a pipe (Rich sizes it as 80 columns unless COLUMNS says otherwise) the table gets its
    # width: no number cut to "92.…"
    env = python_env()
    env.pop("COLUMNS", None)
    piped = subprocess.run(cli("table", "--store", store.root, "--experiment", "A"), capture_output=True,
                           text=True, env=env).stdout
    row = next(ln for ln in piped.splitlines() if "│ regularizer" in ln)
    assert "…" not in piped and len(row) > 80
    assert [c.strip() for c in row.split("│")[1:-1]][:8] == ["regularizer", "alpha=1 sigma=0.5", "1", "92.00",
                                                           "+1.00", "78.00", "+23.00", "-"]


def test_grid_axes_other_than_seed_are_never_averaged(tmp_path):
    st = Store(tmp_path / "runs")
    for epochs, (a, r) in ((1, (0.50, 0.40)), (100, (0.90, 0.60))):
        add(st, "G", "baseline", a, r, keys={"max_epochs": epochs})
        add(st, "G", "regularizer", a - 0.01, r + 0.2, keys={"max_epochs": epochs}, sigma=0.5, alpha=1)
    add(st, "G", "baseline", 0.80, 0.55, keys={"max_epochs": 100, "optimizer": {"lr": 1e-3}})
    add(st, "G", "baseline", 0.70, 0.50, keys={"max_epochs": 100, "optimizer": {"lr": 1e-3}}, seed=1)
    t = report.fair_table(st, tolerance=0.02)["experiments"]
    got = {json.dumps(r["setting"], sort_keys=True): r for r in t}
    assert set(got) == {'{"max_epochs": 1, "optimizer.lr": 0.0001}', '{"max_epochs": 100, "optimizer.lr": 0.0001}',
                        '{"max_epochs": 100, "optimizer.lr": 0.001}'}
    one, hundred = got['{"max_epochs": 1, "optimizer.lr": 0.0001}'], got['{"max_epochs": 100, "optimizer.lr": 0.0001}']
    assert one["baseline"]["runs"] == 1 and one["baseline"]["accuracy"] == 0.50
    assert hundred["baseline"]["runs"] == 1 and hundred["baseline"]["accuracy"] == 0.90
    assert [e["robustness"] for e in hundred["best"]] == [0.60, pytest.approx(0.80)]
    lr = got['{"max_epochs": 100, "optimizer.lr": 0.001}']
    assert lr["baseline"]["runs"] == 2 and lr["baseline"]["accuracy"] == pytest.approx(0.75)  # only seeds average
    assert "max_epochs=1" in report.render_markdown({"experiments": [one]})
    # a run that differs only by where it ran is the same configuration
    spec = resolve({"dataset": "synthetic", "model": "mlp", "method": "baseline", "seed": 3, "device": "cpu"})
    other = resolve({"dataset": "synthetic", "model": "mlp", "method": "baseline", "seed": 4, "data_dir": "/x"})
    assert report.config_key(spec) == report.config_key(other)


def _folds_store(tmp_path):
    st = Store(tmp_path / "runs")
    add(st, "F", "baseline", 0.90, 0.50)
    add(st, "F", "regularizer", 0.90, 0.80, sigma=0.5, alpha=1)
    add(st, "F", "augment", 0.90, 0.70, sigma=0.5, folds=1)   # less robust
    add(st, "F", "augment", 0.80, 0.95, sigma=1.0, folds=1)   # lost too much accuracy
    add(st, "F", "augment", 0.90, 0.85, sigma=0.5, folds=5)   # as robust: N~ = 6
    add(st, "F", "augment", 0.90, 0.60, sigma=0.25, folds=10)  # less robust
    return st


def test_failed_or_cancelled_augment_runs_change_nothing_in_equivalent_folds(tmp_path):
    st = _folds_store(tmp_path)
    before = report.fair_table(st, tolerance=0.0)["experiments"][0]["equivalent_folds"]
    assert before["n_tilde"] == 6 and before["folds"] == 5 and before["text"] == "Ñ = 6"
    assert before["augment_configs"] == 4 and before["augment_less_accurate"] == 1
    assert before["augment_less_robust"] == 2
    add(st, "F", "augment", state="failed", sigma=0.5, folds=20)
    add(st, "F", "augment", state="cancelled", sigma=0.5, folds=2)
    add(st, "F", "augment", state="failed", sigma=0.5, folds=5, seed=1)
    assert report.fair_table(st, tolerance=0.0)["experiments"][0]["equivalent_folds"] == before
    # and with no augment run as robust, the largest *completed* augmentation is the bound
    st2 = Store(tmp_path / "runs2")
    add(st2, "F", "baseline", 0.90, 0.50)
    add(st2, "F", "regularizer", 0.90, 0.80, sigma=0.5, alpha=1)
    add(st2, "F", "augment", 0.90, 0.70, sigma=0.5, folds=5)
    add(st2, "F", "augment", state="cancelled", sigma=0.5, folds=20)
    ef = report.fair_table(st2, tolerance=0.0)["experiments"][0]["equivalent_folds"]
    assert ef["text"] == "Ñ > 6" and ef["max_n_tilde_tried"] == 6 and ef["augment_less_robust"] == 1


def test_validation_selection_picks_a_different_winner_than_test_selection(tmp_path):
    st = Store(tmp_path / "runs")
    add(st, "V", "baseline", 0.90, 0.50, val=(0.88, 0.52))
    # X looks best on test, Y on validation; Z is accurate on test but not on validation
    add(st, "V", "regularizer", 0.90, 0.90, val=(0.88, 0.70), sigma=0.5, alpha=1)  # X
    add(st, "V", "regularizer", 0.90, 0.80, val=(0.88, 0.80), sigma=1.0, alpha=1)  # Y
    add(st, "V", "regularizer", 0.90, 0.95, val=(0.85, 0.99), sigma=2.0, alpha=1)  # Z
    add(st, "V", "regularizer", 0.85, 0.99, val=(0.88, 0.60), sigma=5.0, alpha=1)  # W: accurate on val only
    val = report.fair_table(st, tolerance=0.01)
    test = report.fair_table(st, tolerance=0.01, select="test")
    assert val["selection"] == "validation" and test["selection"] == "test"
    best_val = next(e for e in val["experiments"][0]["best"] if e["method"] == "regularizer")
    best_test = next(e for e in test["experiments"][0]["best"] if e["method"] == "regularizer")
    assert best_val["params"]["sigma"] == 1.0 and best_val["robustness"] == 0.80  # test numbers of Y
    assert best_val["selection_robustness"] == 0.80 and best_val["d_robustness"] == pytest.approx(0.30)
    assert best_test["params"]["sigma"] == 2.0 and best_test["robustness"] == 0.95  # Z, eligible on test
    reasons = {c["params"].get("sigma"): c["reason"] for c in val["experiments"][0]["configurations"]}
    assert reasons[2.0] == "validation accuracy 85.00% below a0 - tolerance = 87.00%"
    assert reasons[5.0] is None and reasons[1.0] is None
    # a store trained before validation robustness was recorded cannot be selected on validation
    st2 = Store(tmp_path / "old")
    rid = add(st2, "O", "baseline", 0.9, 0.5)
    res = st2.get(rid).result()
    del res["val_robustness"]
    atomic_write_json(st2.get(rid).file("result.json"), res)
    rec = report.fair_table(st2)["experiments"][0]
    assert rec["best"] == [] and "use --select test" in rec["configurations"][0]["reason"]
    assert report.fair_table(st2, select="test")["experiments"][0]["best"][0]["method"] == "baseline"


def test_seed_spread_standard_errors_and_noisy_accuracy_by_hand(tmp_path):
    st = Store(tmp_path / "runs")
    add(st, "S", "baseline", 0.90, 0.50, seed=0, noisy=[0.9, 0.1])
    add(st, "S", "baseline", 0.92, 0.60, seed=1, noisy=[0.92, 0.2])
    for seed, r in enumerate((0.7, 0.8, 0.9)):
        add(st, "S", "regularizer", 0.90, r, seed=seed, noisy=[0.9, 0.3], sigma=0.5, alpha=1)
    add(st, "S", "augment", 0.91, 0.52, sigma=0.5, folds=1, noisy=[0.91, 0.2])
    rec = report.fair_table(st, tolerance=0.02)["experiments"][0]
    b = rec["baseline"]
    assert b["runs"] == 2 and b["accuracy"] == pytest.approx(0.91) and b["accuracy_std"] == pytest.approx(0.0141421, 1e-5)
    assert b["robustness_std"] == pytest.approx(0.0707107, 1e-5)
    assert b["noisy_accuracy"] == pytest.approx((0.5 + 0.56) / 2)  # trapezoid over [0, 0.5]: (a0 + a1) / 2
    reg = next(e for e in rec["best"] if e["method"] == "regularizer")
    assert reg["seeds"] == 3 and reg["robustness"] == pytest.approx(0.8) and reg["robustness_std"] == pytest.approx(0.1)
    se = (0.1 ** 2 / 3 + 0.0707107 ** 2 / 2) ** 0.5  # 0.0764
    assert reg["standard_error"] == pytest.approx(se, 1e-5) and reg["exceeds_2se"] is True
    assert reg["noisy_accuracy"] == pytest.approx(0.6) and reg["d_noisy_accuracy"] == pytest.approx(0.6 - 0.53)
    aug = next(e for e in rec["best"] if e["method"] == "augment")
    assert aug["seeds"] == 1 and aug["exceeds_2se"] is None and aug["robustness_std"] is None
    assert rec["warnings"] == ["the compared configurations have different seed counts "
                               "(baseline 2, augment 1, regularizer 3)"]
    md = report.render_markdown({"experiments": [rec]})
    # every row of a markdown table has its header's cells: the "|ΔR|" header's pipes are escaped
    # (unescaped, they made 11 header cells over 9 columns and no renderer showed the table)
    blocks = re.findall(r"(?:^\|.*\|$\n?)+", md, flags=re.M)
    assert blocks and all(len({len(re.split(r"(?<!\\)\|", ln)) for ln in b.splitlines()}) == 1 for b in blocks)
    assert "| regularizer | alpha=1 sigma=0.5 | 3 | 90.00 ± 0.00 | -1.00 | 80.00 ± 10.00 | +25.00 | yes | 60.00 |" in md
    assert "regularizer: ΔR +25.00 exceeds two standard errors (2 SE = 15.28)" in md
    assert "warning: the compared configurations have different seed counts" in md


def test_table_all_lists_every_configuration_with_reasons(store):
    out = subprocess.run(cli("table", "--store", store.root, "--experiment", "A", "--all", "--format", "markdown"),
                         capture_output=True, text=True, env=python_env())
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("| ✓") or ln.startswith("| ✗")]
    assert len(lines) == 9  # 1 baseline + 3 augment + 5 regularizer configurations (two seeds are one)
    assert "| ✗ | regularizer | alpha=1 sigma=5 | 0 | - | - | - | - | - | not completed (failed 1) |" in lines
    assert any(ln.startswith("| ✗ | regularizer | alpha=1 sigma=1 |") and
               "validation accuracy 89.99% below a0 - tolerance = 90.00%" in ln for ln in lines)
    assert lines[0].startswith("| ✗ | regularizer | alpha=1 sigma=1 |")  # sorted by R: 0.99 first
    assert lines[-1].startswith("| ✗ | regularizer | alpha=1 sigma=5 |")  # no numbers last
    assert sum(ln.startswith("| ✓") for ln in lines) == 6
    rich = subprocess.run(cli("table", "--store", store.root, "--experiment", "A", "--all"),
                          capture_output=True, text=True, env=python_env(COLUMNS="200"))
    assert "every configuration" in rich.stdout and "✗" in rich.stdout and "not completed" in rich.stdout
