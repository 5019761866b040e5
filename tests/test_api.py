"""gaussreg.api: a store (or an export of one) as DataFrames, and a trained run's model."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import gaussreg, python_env
from factories import SIGMAS, figure_run, queued_run, table_run

from gaussreg.runs.store import Store

pd = pytest.importorskip("pandas")
import gaussreg.api as gr  # noqa: E402 - after pandas is known to be there

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    """Experiment P (figure runs: epochs and curves; an augment run sorts first) and Q, two
    comparisons (max_epochs 2 and 4) of 2 seeds per configuration, one run certified."""
    st = Store(tmp_path / "runs")
    st.write_experiment("P", {"tolerance": 0.02})
    st.write_experiment("Q", {"tolerance": 0.05})
    figure_run(st, "baseline", 0.90, 0.50)
    figure_run(st, "augment", 0.89, 0.75, sigma=0.5, folds=5)
    figure_run(st, "regularizer", 0.88, 0.85, sigma=1.0, alpha=1)
    figure_run(st, "regularizer", 0.0, 0.0, state="failed", sigma=10.0, alpha=1)
    for epochs, shift in ((2, 0.0), (4, 0.02)):
        keys = {"max_epochs": epochs}
        for seed, d in ((0, 0.0), (1, 0.01)):
            table_run(st, "Q", "baseline", 0.80 + shift + d, 0.40 + d, seed=seed, keys=keys, noisy=[0.8, 0.6])
            table_run(st, "Q", "regularizer", 0.78 + shift + d, 0.60 + 2 * d, seed=seed, keys=keys,
                      noisy=[0.78, 0.7], cost={"steps": 10, "train_cpu_s": 3.0 + d}, sigma=0.5, alpha=1)
            table_run(st, "Q", "augment", 0.70 + d, 0.90, seed=seed, keys=keys, sigma=0.5, folds=1)  # too inaccurate
    reg = next(r for r in st.runs() if r.id.startswith("Q-regularizer") and r.spec()["max_epochs"] == 4)
    reg.write_certification({"sigma": 0.5, "per_image": [{"correct": True, "radius": 0.6},
                                                          {"correct": True, "radius": 0.3}, {"correct": False}]})
    return st


def test_runs_is_a_row_per_run_with_its_parameters_and_numbers(store):
    runs = gr.runs(store.root)
    assert len(runs) == 16 and runs["run_id"].is_unique
    cols = list(runs.columns)
    assert cols[:9] == ["run_id", "experiment", "method", "params", "param_alpha", "param_folds",
                        "param_fresh_noise", "param_sigma", "seed"]
    assert {"state", "test_accuracy", "test_robustness", "test_noisy_accuracy", "val_accuracy", "steps",
            "train_cpu_s", "train_time_s", "wall_time_s", "tolerance", "config"} <= set(cols)
    reg = runs[(runs["experiment"] == "P") & (runs["params"] == "alpha=1 sigma=1")].iloc[0]
    assert reg["method"] == "regularizer" and reg["param_alpha"] == 1.0 and reg["param_sigma"] == 1.0
    assert (reg["test_accuracy"], reg["test_robustness"], reg["tolerance"]) == (0.88, 0.85, 0.02)
    assert reg["test_noisy_accuracy"] == pytest.approx(((0.88 + 0.78) / 2 * 0.25 + (0.78 + 0.58) / 2 * 0.25) / 0.5)
    failed = runs[runs["state"] == "failed"].iloc[0]
    assert failed["param_sigma"] == 10.0 and pd.isna(failed["test_accuracy"])
    q = gr.runs(store.root, experiment="Q")
    assert len(q) == 12 and set(q["max_epochs"]) == {2, 4} and set(q["tolerance"]) == {0.05}
    assert q[q["method"] == "regularizer"]["steps"].tolist() == [10] * 4
    assert q.groupby("config").size().tolist() == [2] * 6  # the seeds of one configuration share a config id
    # a Store object, a str and a Path are the same store
    pd.testing.assert_frame_equal(gr.runs(Store(store.root)), gr.runs(str(store.root)))


def test_epochs_and_sigmas_are_the_long_formats_of_export(store):
    ep = gr.epochs(store.root, experiment="P")
    assert len(ep) == 8 and set(ep["epoch"]) == {1, 2}  # 4 runs x 2 epochs
    one = ep[(ep["params"] == "folds=5 sigma=0.5") & (ep["epoch"] == 2)].iloc[0]
    assert (one["train_loss"], one["train_ce"], one["val_loss"]) == (pytest.approx(0.5), 0.5, 0.55)
    sig = gr.sigmas(store.root, experiment="P")
    assert len(sig) == 3 * 2 * len(SIGMAS)  # completed runs x (test, val) x sigmas
    curve = sig[(sig["method"] == "regularizer") & (sig["split"] == "test")].sort_values("sigma")
    assert curve["sigma"].tolist() == SIGMAS and curve["consistency"].tolist() == [1.0, 0.85, pytest.approx(0.75)]
    assert curve["param_alpha"].tolist() == [1.0] * 3 and curve["accuracy"].tolist()[0] == 0.88
    # the same as `gaussreg export --what sigmas --format jsonl`, read back
    out = gaussreg("export", "--store", store.root, "--what", "sigmas", "--format", "jsonl", "--experiment", "P")
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert list(sig.columns) == list(lines[0]) and len(lines) == len(sig)
    assert sig["consistency"].tolist() == [x["consistency"] for x in lines]


def _json_table(store, *args):
    out = gaussreg("table", "--store", store.root, "--format", "json", *args)
    assert out.exit_code == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("args,kw", [((), {}), (("--tolerance", "0.2", "--select", "test"),
                                                {"tolerance": 0.2, "select": "test"}),
                                     (("--budget", "1.5"), {"budget": 1.5})])
def test_fair_table_has_the_numbers_of_gaussreg_table_json(store, tmp_path, args, kw):
    want = _json_table(store, *args)
    frame = gr.fair_table(store.root, **kw)
    recs = [(rec, e) for rec in want["experiments"] for e in rec["best"]]
    assert len(frame) == len(recs) > 0
    for (_, row), (rec, e) in zip(frame.iterrows(), recs):
        assert (row["experiment"], row["dataset"], row["model"]) == (rec["experiment"], rec["dataset"], rec["model"])
        assert (row["tolerance"], row["selection"], row["method"]) == (rec["tolerance"], rec["selection"], e["method"])
        for k in ("seeds", "accuracy", "accuracy_std", "d_accuracy", "robustness", "robustness_std", "d_robustness",
                  "noisy_accuracy", "d_noisy_accuracy", "selection_accuracy", "selection_robustness",
                  "exceeds_2se", "standard_error", "steps", "steps_x", "time_s", "time_x", "still_improving"):
            got, exp = row[k], e.get(k)
            assert (pd.isna(got) and exp is None) or got == exp, (k, got, exp)
        assert row["run_ids"] == e["run_ids"] and row["best_epochs"] == e["best_epochs"]
        for r, name in ((0, "certified_0"), (0.25, "certified_0.25"), (0.5, "certified_0.5")):
            c = e["certified"]
            assert (pd.isna(row[name]) and c is None) or row[name] == c["accuracy"][f"{r:g}"]
        for p, v in e["params"].items():
            assert row[f"param_{p}"] == v
    # the comparisons of Q differ in max_epochs: a column of its own
    q = frame[frame["experiment"] == "Q"]
    assert set(q["max_epochs"]) == {2, 4} and frame[frame["experiment"] == "P"]["max_epochs"].isna().all()
    if not args:
        assert q["max_epochs"].tolist() == [2, 2, 4, 4] and q["method"].tolist() == ["baseline", "regularizer"] * 2
        reg = q[q["max_epochs"] == 4].iloc[1]  # certified on 3 images: 2 correct at radius 0.3, 1 at 0.6
        assert reg["certified_0"] == pytest.approx(2 / 3) and reg["certified_0.5"] == pytest.approx(1 / 3)
        assert reg["params"] == "alpha=1 sigma=0.5" and reg["accuracy"] == pytest.approx(0.805)
        assert reg["d_robustness"] == pytest.approx(0.205) and reg["time_x"] is None  # the baseline has no time
    # from an export file: the same frame
    f = tmp_path / "runs.jsonl"
    f.write_text(gaussreg("export", "--store", store.root, "--format", "jsonl").stdout)
    pd.testing.assert_frame_equal(gr.fair_table(f, **kw), frame)


def test_fair_table_other_tables_and_bad_arguments(store):
    want = _json_table(store, "--all")
    per_sigma = gr.fair_table(store.root, which="best_per_sigma")
    assert len(per_sigma) == sum(len(r["best_per_sigma"]) for r in want["experiments"])
    assert per_sigma["sigma"].tolist() == [e["sigma"] for r in want["experiments"] for e in r["best_per_sigma"]]
    bad = next(r for r in store.runs() if r.id.startswith("Q-baseline")).write_certification({"sigma": 0.25})  # no per_image: left out, with a warning
    with pytest.warns(UserWarning, match=re.escape(str(bad))):
        every = gr.fair_table(store.root, experiment="Q", which="all")
    assert len(every) == 6 and every["eligible"].tolist().count(False) == 2
    aug = every[every["method"] == "augment"]
    assert aug["reason"].str.contains("accuracy").all() and not aug["eligible"].any()
    for kw, words in (({"tolerance": 2}, "tolerance must be a fraction in [0, 1], not 2"),
                      ({"select": "best"}, "select must be one of validation, test, not 'best'"),
                      ({"budget": 0}, "budget must be a finite number > 0"),
                      ({"which": "some"}, "which must be one of best, best_per_sigma, all, not 'some'"),
                      ({"experiment": "nope"}, f"no runs of experiment 'nope' in {store.root}")):
        with pytest.raises(gr.ApiError, match=re.escape(words)):
            gr.fair_table(store.root, **kw)
    with pytest.raises(gr.ApiError, match="the store .*nowhere does not exist"):
        gr.runs(store.root.parent / "nowhere")
    export = store.root.parent / "runs.jsonl"
    export.write_text(gaussreg("export", "--store", store.root, "--format", "jsonl").stdout)
    with pytest.raises(gr.ApiError, match="is an export of runs, which carries no epochs"):
        gr.epochs(export)
    pd.testing.assert_frame_equal(gr.sigmas(export), gr.sigmas(store.root))
    export.write_text("not json\n")
    with pytest.raises(gr.ApiError, match=re.escape(f"{export}:1: not a JSON line")):
        gr.runs(export)
    (store.root.parent / "empty").mkdir()
    assert gr.runs(store.root.parent / "empty").empty


def test_without_pandas_the_api_says_how_to_install_it(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` now raises ImportError
    with pytest.raises(gr.ApiError) as e:
        gr.runs(store.root)
    assert str(e.value) == 'gaussreg.api needs pandas, which is not installed: pip install "gaussreg[api]"'


@pytest.mark.process
def test_reading_a_store_through_the_api_never_imports_torch(store, tmp_path):
    code = ("import sys, gaussreg.api as gr; s = sys.argv[1]; "
            "n = [len(gr.runs(s)), len(gr.epochs(s)), len(gr.sigmas(s)), len(gr.fair_table(s))]; "
            "print(n, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(store.root)], capture_output=True, text=True,
                         env=python_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[16,", "8,", "50,", "7]", "False"]


def _trained_run(st, experiment="T"):
    """A synthetic run with a best.pt of a randomly initialised model of its spec (no training)."""
    import torch

    from gaussreg.science.models import build_model
    run = queued_run(st, experiment=experiment, test_subset=50)
    torch.manual_seed(3)
    model = build_model("mlp", "synthetic")
    torch.save({"model": model.state_dict(), "spec": run.spec()}, run.best_checkpoint)
    return run, model.eval()


def test_load_trained_gives_the_runs_model_in_eval_mode_on_the_cpu(store, tmp_path):
    import torch
    run, want = _trained_run(store)
    x = torch.rand(4, 1, 28, 28)  # synthetic images
    for target in (run.id, run.id[:-3], run.path, run.best_checkpoint):
        model = gr.load_trained(target, store=store.root)
        assert isinstance(model, torch.nn.Module) and not model.training
        assert {p.device.type for p in model.parameters()} == {"cpu"}
        got = model.state_dict()
        assert got.keys() == want.state_dict().keys()
        assert all(torch.equal(got[k], v) for k, v in want.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), want(x))
    # a gaussreg error of one sentence, never an exit
    plain = queued_run(store, experiment="T", test_subset=50, seed=1)
    for target, words in ((f"{run.id}-nope", "no run"), (plain.id, "has not finished an epoch")):
        with pytest.raises(gr.TrainedRunError, match=words) as e:
            gr.load_trained(target, store=store.root)
        assert "\n" not in str(e.value)


def _readme_block(n: int) -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(rf"<!-- api: example {n} -->\n```python\n(.*?)```", text, re.S).group(1)


def test_the_readmes_notebook_examples_run_as_written(store, monkeypatch):
    """Example 1 on the study's runs in the repository; example 2 on a store named runs
    whose demo-fmnist runs have a best.pt (as after the Quickstart)."""
    monkeypatch.chdir(ROOT)
    names: dict = {}
    exec(_readme_block(1), names)
    study = (ROOT / "docs" / "study-fmnist" / "runs.jsonl").read_text().splitlines()
    assert len(study) > 40 and len(names["runs"]) == len(study) and names["table"]["method"].tolist()[0] == "baseline"
    assert names["curves"]["split"].unique().tolist() == ["test"]
    monkeypatch.chdir(store.root.parent)
    run, want = _trained_run(store, "demo-fmnist")
    exec(_readme_block(2), names)
    assert names["runs"]["run_id"].tolist() == [run.id] and list(names["losses"].index) == [1, 2]
    assert not names["model"].training and names["model"].state_dict().keys() == want.state_dict().keys()
