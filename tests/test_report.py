import json
import re
import subprocess

import pytest
from conftest import cli, gaussreg, python_env
from factories import table_run

from gaussreg.runs.spec import resolve
from gaussreg.runs.store import Store, atomic_write_json
from gaussreg.views import report


def spent(steps, cpu, best=5, epochs=5, device="cpu", gpu=None):
    """The cost fields of a worker's result.json (images: a baseline's, 100 clean images a step)."""
    return {"steps": steps, "train_cpu_s": cpu, "train_gpu_s": gpu, "train_time_s": 2.0 * cpu, "device": device,
            "images": {"clean": 100 * steps, "noisy": 0, "expected": 0}, "best_epoch": best, "epochs_run": epochs}


@pytest.fixture
def store(tmp_path):
    st = Store(tmp_path / "runs")
    st.write_experiment("A", {"tolerance": 0.01})
    table_run(st, "A", "baseline", 0.90, 0.50, seed=0)
    table_run(st, "A", "baseline", 0.92, 0.60, seed=1)  # a0 = 0.91, threshold 0.90
    table_run(st, "A", "augment", 0.905, 0.70, sigma=0.25, folds=2)
    table_run(st, "A", "augment", 0.89, 0.95, sigma=0.25, folds=6)  # too inaccurate
    table_run(st, "A", "augment", 0.95, 0.80, sigma=0.5, folds=11)
    table_run(st, "A", "regularizer", 0.91, 0.78, sigma=0.25, alpha=1)
    table_run(st, "A", "regularizer", 0.92, 0.78, sigma=0.5, alpha=1)  # tie on R: the more accurate wins
    table_run(st, "A", "regularizer", 0.8999, 0.99, sigma=1, alpha=1)  # just below the threshold
    table_run(st, "A", "regularizer", 0.93, 0.70, sigma=2, alpha=1, seed=0)
    table_run(st, "A", "regularizer", 0.87, 0.74, sigma=2, alpha=1, seed=1)  # seeds average to 0.90 exactly
    table_run(st, "A", "regularizer", state="failed", sigma=5, alpha=1)
    st.write_experiment("B", {"tolerance": 0.0})
    table_run(st, "B", "baseline", 0.90, 0.50)
    table_run(st, "B", "augment", 0.85, 0.90, sigma=0.5, folds=2)
    table_run(st, "B", "regularizer", 0.80, 0.95, sigma=0.5, alpha=1)
    table_run(st, "C", "baseline", 0.90, 0.50)
    table_run(st, "C", "regularizer", 0.90, 0.90, sigma=0.5, alpha=1)
    table_run(st, "C", "augment", 0.90, 0.50, sigma=0.5, folds=2)
    table_run(st, "C", "augment", 0.91, 0.60, sigma=0.5, folds=21)
    table_run(st, "D", "augment", 0.91, 0.60, sigma=0.5, folds=21)
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


@pytest.mark.process  # a real pipe: Rich sizes the table for it
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
        table_run(st, "G", "baseline", a, r, keys={"max_epochs": epochs})
        table_run(st, "G", "regularizer", a - 0.01, r + 0.2, keys={"max_epochs": epochs}, sigma=0.5, alpha=1)
    table_run(st, "G", "baseline", 0.80, 0.55, keys={"max_epochs": 100, "optimizer": {"lr": 1e-3}})
    table_run(st, "G", "baseline", 0.70, 0.50, keys={"max_epochs": 100, "optimizer": {"lr": 1e-3}}, seed=1)
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
    table_run(st, "F", "baseline", 0.90, 0.50)
    table_run(st, "F", "regularizer", 0.90, 0.80, sigma=0.5, alpha=1)
    table_run(st, "F", "augment", 0.90, 0.70, sigma=0.5, folds=1)   # less robust
    table_run(st, "F", "augment", 0.80, 0.95, sigma=1.0, folds=1)   # lost too much accuracy
    table_run(st, "F", "augment", 0.90, 0.85, sigma=0.5, folds=5)   # as robust: N~ = 6
    table_run(st, "F", "augment", 0.90, 0.60, sigma=0.25, folds=10)  # less robust
    return st


def test_failed_or_cancelled_augment_runs_change_nothing_in_equivalent_folds(tmp_path):
    st = _folds_store(tmp_path)
    before = report.fair_table(st, tolerance=0.0)["experiments"][0]["equivalent_folds"]
    assert before["n_tilde"] == 6 and before["folds"] == 5 and before["text"] == "Ñ = 6"
    assert before["augment_configs"] == 4 and before["augment_less_accurate"] == 1
    assert before["augment_less_robust"] == 2
    table_run(st, "F", "augment", state="failed", sigma=0.5, folds=20)
    table_run(st, "F", "augment", state="cancelled", sigma=0.5, folds=2)
    table_run(st, "F", "augment", state="failed", sigma=0.5, folds=5, seed=1)
    assert report.fair_table(st, tolerance=0.0)["experiments"][0]["equivalent_folds"] == before
    # and with no augment run as robust, the largest *completed* augmentation is the bound
    st2 = Store(tmp_path / "runs2")
    table_run(st2, "F", "baseline", 0.90, 0.50)
    table_run(st2, "F", "regularizer", 0.90, 0.80, sigma=0.5, alpha=1)
    table_run(st2, "F", "augment", 0.90, 0.70, sigma=0.5, folds=5)
    table_run(st2, "F", "augment", state="cancelled", sigma=0.5, folds=20)
    ef = report.fair_table(st2, tolerance=0.0)["experiments"][0]["equivalent_folds"]
    assert ef["text"] == "Ñ > 6" and ef["max_n_tilde_tried"] == 6 and ef["augment_less_robust"] == 1


def test_equivalent_folds_per_noise_mode_and_never_below_the_smallest_tried(tmp_path):
    st = Store(tmp_path / "runs")
    table_run(st, "G", "baseline", 0.90, 0.50)
    table_run(st, "G", "regularizer", 0.90, 0.80, sigma=1.0, alpha=1)
    # shared noise: Ñ = 2 less robust than the regularizer, Ñ = 6 more
    table_run(st, "G", "augment", 0.90, 0.75, sigma=0.5, folds=1, noise="shared")
    table_run(st, "G", "augment", 0.90, 0.82, sigma=0.5, folds=5, noise="shared")
    # fixed noise: already the smallest tried is as robust, so only N~ <= 2 is known
    table_run(st, "G", "augment", 0.90, 0.80, sigma=0.5, folds=1, noise="fixed")
    # fresh noise (the old spelling): never as robust
    table_run(st, "G", "augment", 0.90, 0.70, sigma=0.5, folds=1, fresh_noise=True)
    ef = report.fair_table(st, tolerance=0.0)["experiments"][0]["equivalent_folds"]
    assert ef["text"] == "shared noise Ñ = 6, fixed noise Ñ ≤ 2 (the smallest tried), fresh noise Ñ > 2"
    assert ef["by_noise"]["shared"]["n_tilde"] == 6 and ef["by_noise"]["fresh"]["max_n_tilde_tried"] == 2
    assert ef["n_tilde"] == 2 and ef["text"].count("Ñ") == 3  # all modes together: the smallest tried matches
    st2 = Store(tmp_path / "runs2")
    table_run(st2, "H", "baseline", 0.90, 0.50)
    table_run(st2, "H", "regularizer", 0.90, 0.80, sigma=1.0, alpha=1)
    table_run(st2, "H", "augment", 0.90, 0.85, sigma=0.5, folds=1)
    table_run(st2, "H", "augment", 0.90, 0.90, sigma=0.5, folds=5)
    ef = report.fair_table(st2, tolerance=0.0)["experiments"][0]["equivalent_folds"]
    assert ef["text"] == "Ñ ≤ 2 (the smallest tried)" and "by_noise" not in ef
    assert report.noise_mode({"fresh_noise": False}) == "fixed"


def test_validation_selection_picks_a_different_winner_than_test_selection(tmp_path):
    st = Store(tmp_path / "runs")
    table_run(st, "V", "baseline", 0.90, 0.50, val=(0.88, 0.52))
    # X looks best on test, Y on validation; Z is accurate on test but not on validation
    table_run(st, "V", "regularizer", 0.90, 0.90, val=(0.88, 0.70), sigma=0.5, alpha=1)  # X
    table_run(st, "V", "regularizer", 0.90, 0.80, val=(0.88, 0.80), sigma=1.0, alpha=1)  # Y
    table_run(st, "V", "regularizer", 0.90, 0.95, val=(0.85, 0.99), sigma=2.0, alpha=1)  # Z
    table_run(st, "V", "regularizer", 0.85, 0.99, val=(0.88, 0.60), sigma=5.0, alpha=1)  # W: accurate on val only
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
    rid = table_run(st2, "O", "baseline", 0.9, 0.5)
    res = st2.get(rid).result()
    del res["val_robustness"]
    atomic_write_json(st2.get(rid).file("result.json"), res)
    rec = report.fair_table(st2)["experiments"][0]
    assert rec["best"] == [] and "use --select test" in rec["configurations"][0]["reason"]
    assert report.fair_table(st2, select="test")["experiments"][0]["best"][0]["method"] == "baseline"


def test_seed_spread_standard_errors_and_noisy_accuracy_by_hand(tmp_path):
    st = Store(tmp_path / "runs")
    table_run(st, "S", "baseline", 0.90, 0.50, seed=0, noisy=[0.9, 0.1])
    table_run(st, "S", "baseline", 0.92, 0.60, seed=1, noisy=[0.92, 0.2])
    for seed, r in enumerate((0.7, 0.8, 0.9)):
        table_run(st, "S", "regularizer", 0.90, r, seed=seed, noisy=[0.9, 0.3], sigma=0.5, alpha=1)
    table_run(st, "S", "augment", 0.91, 0.52, sigma=0.5, folds=1, noisy=[0.91, 0.2])
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
    out = gaussreg("table", "--store", store.root, "--experiment", "A", "--all", "--format", "markdown")
    assert out.exit_code == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("| ✓") or ln.startswith("| ✗")]
    assert len(lines) == 9  # 1 baseline + 3 augment + 5 regularizer configurations (two seeds are one)
    assert "| ✗ | regularizer | alpha=1 sigma=5 | 0 | - | - | - | - | - | — | — | — | not completed (failed 1) |" in lines
    assert any(ln.startswith("| ✗ | regularizer | alpha=1 sigma=1 |") and
               "validation accuracy 89.99% below a0 - tolerance = 90.00%" in ln for ln in lines)
    assert lines[0].startswith("| ✗ | regularizer | alpha=1 sigma=1 |")  # sorted by R: 0.99 first
    assert lines[-1].startswith("| ✗ | regularizer | alpha=1 sigma=5 |")  # no numbers last
    assert sum(ln.startswith("| ✓") for ln in lines) == 6
    rich = gaussreg("table", "--store", store.root, "--experiment", "A", "--all", COLUMNS="200")
    assert "every configuration" in rich.stdout and "✗" in rich.stdout and "not completed" in rich.stdout


def _cost_store(tmp_path):
    st = Store(tmp_path / "runs")
    st.write_experiment("K", {"tolerance": 0.02})
    table_run(st, "K", "baseline", 0.90, 0.50, seed=0, cost=spent(100, 10.0, best=4))
    table_run(st, "K", "baseline", 0.90, 0.50, seed=1, cost=spent(100, 12.0, best=5))  # mean 11 CPU seconds
    table_run(st, "K", "augment", 0.90, 0.90, seed=0, cost=spent(600, 60.0, best=3), sigma=0.5, folds=5)
    table_run(st, "K", "augment", 0.90, 0.90, seed=1, cost=spent(600, 62.0, best=5), sigma=0.5, folds=5)
    table_run(st, "K", "augment", 0.90, 0.70, cost=spent(200, 21.0, best=2), sigma=0.5, folds=1)
    table_run(st, "K", "regularizer", 0.90, 0.80, cost=spent(100, 16.5, best=5), sigma=0.5, alpha=1)
    return st


def test_cost_relative_to_the_baseline_and_still_improving(tmp_path):
    st = _cost_store(tmp_path)
    rec = report.fair_table(st)["experiments"][0]
    assert rec["baseline"]["steps"] == 100 and rec["baseline"]["time_s"] == 11.0
    assert rec["baseline"]["time_kind"] == "cpu"
    best = {e["method"]: e for e in rec["best"]}
    aug, reg = best["augment"], best["regularizer"]
    assert aug["params"]["folds"] == 5 and aug["steps"] == 600 and aug["steps_x"] == 6.0
    assert aug["time_s"] == 61.0 and aug["time_x"] == pytest.approx(61 / 11) and aug["wall_s"] == 122.0
    assert aug["images"] == {"clean": 60000, "noisy": 0, "expected": 0}
    # per seed, in the order of run_ids
    assert [st.get(i).spec()["seed"] for i in aug["run_ids"]] == [1, 0] and aug["best_epochs"] == [5, 3]
    assert aug["epochs_run"] == [5, 5] and aug["still_improving"] == 1
    assert reg["steps_x"] == 1.0 and reg["time_x"] == 1.5 and reg["still_improving"] == 1
    assert best["baseline"]["steps_x"] == best["baseline"]["time_x"] == 1.0
    assert best["baseline"]["still_improving"] == 1  # seed 1's best epoch is its last
    folds1 = next(c for c in rec["configurations"] if c["params"].get("folds") == 1)
    assert folds1["still_improving"] == 0 and folds1["time_x"] == pytest.approx(21 / 11)
    md = report.render_markdown({"experiments": [rec]}, show_all=True)
    assert "| augment | folds=5 sigma=0.5 | 2 | 90.00 ± 0.00 | +0.00 | 90.00 ± 0.00 | +40.00 | yes | - | 6.00 | 5.55 " \
           "| 3-5/5 ↑ |" in md
    assert "| regularizer | alpha=1 sigma=0.5 | 1 | 90.00 | +0.00 | 80.00 | +30.00 | - | - | 1.00 | 1.50 | 5/5 ↑ |" in md
    assert "| ✓ | augment | folds=1 sigma=0.5 | 1 | 90.00 | 70.00 | 90.00 | 70.00 | - | 2.00 | 1.91 | 2/5 |  |" in md
    assert ("↑ still improving (the best validation epoch is the last one run; more epochs may change the "
            "comparison): baseline in 1 of 2 seed(s), augment in 1 of 2 seed(s), regularizer in 1 of 1 seed(s)") in md
    assert "time: CPU seconds of the training epochs" in md and "—" not in md
    rows = list(__import__("csv").DictReader(report.render_csv({"experiments": [rec]}).splitlines()))
    a = next(r for r in rows if r["table"] == "best" and r["method"] == "augment")
    assert (a["steps"], a["steps_ratio"], a["time_s"], a["time_kind"], a["time_ratio"]) == (
        "600.0", "6.0", "61.0", "cpu", str(round(61 / 11, 6)))
    assert (a["best_epochs"], a["epochs_run"], a["still_improving"]) == ("5 3", "5 5", "1")
    assert a["run_ids"] == " ".join(aug["run_ids"])


def test_budget_lets_only_configurations_within_a_multiple_of_the_baselines_time_compete(tmp_path):
    st = _cost_store(tmp_path)
    rec = report.fair_table(st, budget=2)["experiments"][0]
    best = {e["method"]: e for e in rec["best"]}
    # folds=5 (5.55x) is over the budget: the cheaper, less robust folds=1 (1.91x) is augment's best
    assert best["augment"]["params"]["folds"] == 1 and best["regularizer"]["time_x"] == 1.5
    reasons = {c["params"].get("folds"): c["reason"] for c in rec["configurations"] if c["method"] == "augment"}
    assert reasons == {5: "training time 5.55x the baseline's, over the budget of 2x", 1: None}
    assert rec["budget"] == {"limit": 2, "time_kind": "cpu", "over": 1, "not_comparable": 0}
    assert rec["counts"]["augment"]["eligible"] == 1
    # "which is more robust at equal cost?": the regularizer (R 0.80) beats the augmentation it costs as much as
    assert rec["equivalent_folds"]["text"] == "Ñ > 2" and rec["equivalent_folds"]["augment_outside_budget"] == 1
    assert ("augment configurations: 1 completed within the budget, 0 lost too much accuracy, 1 eligible but less "
            "robust than the regularizer; 1 outside the budget") in report.render_markdown(report.fair_table(st, budget=2))
    # the same from exported runs (`gaussreg table --from`)
    from gaussreg.views.export import export
    lines = [json.loads(x) for x in export(st, "runs", "jsonl").splitlines()]
    assert report.table_of_export(lines, budget=2) == report.fair_table(st, budget=2)
    # a budget equal to a configuration's ratio keeps it
    at = report.fair_table(st, budget=61 / 11)["experiments"][0]
    assert {e["method"]: e["params"].get("folds") for e in at["best"]}["augment"] == 5
    md = report.render_markdown(report.fair_table(st, budget=2), True)
    assert "budget 2× the baseline's time" in md.splitlines()[0]
    assert ("budget: only configurations whose training time is at most 2× the baseline's compete; 1 over it and 0 "
            "without a comparable time are left out") in md
    out = gaussreg("table", "--store", st.root, "--budget", "2", "--format", "json")
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout) == json.loads(json.dumps(report.fair_table(st, budget=2)))
    for bad in ("0", "-1", "inf", "nan"):
        out = gaussreg("table", "--store", st.root, "--budget", bad)
        assert out.exit_code == 2 and len(out.stderr.strip().splitlines()) == 1, bad
        assert "--budget must be a finite number > 0 (times the baseline's training time), not" in out.stderr, bad
    assert report.budget_problem(True) and report.budget_problem("2") and report.budget_problem(0.5) is None


def test_old_runs_without_cost_show_a_dash_and_a_budget_says_why_they_are_left_out(tmp_path):
    st = _cost_store(tmp_path)
    table_run(st, "K", "randsign", 0.90, 0.85, eps=0.1)  # trained before gaussreg recorded cost
    table_run(st, "K", "fgsm", 0.90, 0.60, cost=spent(100, 0.5, device="cuda:0", gpu=30.0), eps=0.1)  # other device
    rec = report.fair_table(st)["experiments"][0]
    best = {e["method"]: e for e in rec["best"]}
    assert best["randsign"]["steps_x"] is None and best["randsign"]["time_x"] is None
    assert best["fgsm"]["steps_x"] == 1.0 and best["fgsm"]["time_x"] is None  # GPU against CPU seconds
    md = report.render_markdown({"experiments": [rec]})
    assert "| randsign | eps=0.1 | 1 | 90.00 | +0.00 | 85.00 | +35.00 | - | - | — | — | — |" in md
    assert "| fgsm | eps=0.1 | 1 | 90.00 | +0.00 | 60.00 | +10.00 | - | - | 1.00 | — | 5/5 ↑ |" in md
    assert "—: not recorded (runs from before gaussreg recorded cost) or not comparable" in md
    rec = report.fair_table(st, budget=10)["experiments"][0]
    assert {e["method"] for e in rec["best"]} == {"baseline", "augment", "regularizer"}
    reasons = {c["method"]: c["reason"] for c in rec["configurations"]}
    assert reasons["randsign"] == ("no training time comparable to the baseline's (its runs recorded no training time "
                                   "(trained before gaussreg recorded cost)): outside the budget")
    assert reasons["fgsm"] == ("no training time comparable to the baseline's (its time is GPU seconds, the "
                               "baseline's CPU seconds): outside the budget")
    assert rec["budget"]["not_comparable"] == 2 and rec["budget"]["over"] == 0
    # a configuration with one seed that recorded cost and one that did not has no cost (not a one-seed mean)
    table_run(st, "K", "randsign", 0.90, 0.85, seed=1, cost=spent(100, 11.0), eps=0.1)
    rs = next(c for c in report.fair_table(st)["experiments"][0]["configurations"] if c["method"] == "randsign")
    assert rs["seeds"] == 2 and rs["steps"] is None and rs["time_x"] is None and rs["best_epochs"] == [None, 5]
    # a store from before cost: the table works as before, and a budget says that only the baseline can compete
    old = report.fair_table(Store(tmp_path / "old") if False else _old_store(tmp_path), budget=3)["experiments"][0]
    assert [e["method"] for e in old["best"]] == ["baseline"]
    assert old["warnings"] == ["budget 3x: the baseline's runs recorded no training time (trained before gaussreg "
                               "recorded cost), so no other configuration can be held to it"]


def _old_store(tmp_path):
    st = Store(tmp_path / "old")
    table_run(st, "O", "baseline", 0.90, 0.50)
    table_run(st, "O", "regularizer", 0.90, 0.80, sigma=0.5, alpha=1)
    return st


def test_the_cert_columns_say_on_how_many_images_and_draws_they_were_measured(tmp_path):
    st = Store(tmp_path / "runs")
    st.write_experiment("c", {"tolerance": 0.05})
    base = table_run(st, "c", "baseline", 0.90, 0.50)
    reg = table_run(st, "c", "regularizer", 0.90, 0.80, sigma=0.25, alpha=1.0)
    for rid, n in ((base, 1000), (reg, 1000)):
        per_image = [{"index": i, "label": 0, "prediction": 0 if i < 150 else -1, "radius": 0.3 if i < 150 else 0.0,
                      "correct": i < 150} for i in range(200)]
        atomic_write_json(st.get(rid).file("certify-0.25.json"),
                          {"sigma": 0.25, "n0": 100, "n": n, "alpha": 0.001, "images": 200, "per_image": per_image})
    out = gaussreg("table", "--store", st.root, "--format", "markdown")
    assert out.exit_code == 0, out.stderr
    assert "| cert@0 % | cert@0.25 % | cert@0.5 % |" in out.stdout
    assert ("- cert@r: certified accuracy (%) within L2 radius r by randomized smoothing (the best over the sigmas "
            "certified at; mean over certified seeds), measured on 200 test images, n = 1000 noise draws each, "
            "alpha 0.001") in out.stdout.splitlines()
    shown = gaussreg("table", "--store", st.root, COLUMNS="200")
    assert "measured on 200 test images, n = 1000 noise draws each" in " ".join(shown.stdout.split())
    rec = json.loads(gaussreg("table", "--store", st.root, "--format", "json").stdout)["experiments"][0]
    assert rec["best"][0]["certified"]["measured"] == [{"sigma": 0.25, "images": 200, "n": 1000, "alpha": 0.001}]
    assert rec["best"][0]["certified"]["accuracy"]["0.25"] == 0.75
