import csv
import io
import json
import subprocess
from pathlib import Path

import pytest
from conftest import cli, gaussreg, python_env
from factories import SIGMAS, figure_run

from gaussreg.runs.store import Store, atomic_write_json

@pytest.fixture
def store(tmp_path):
    st = Store(tmp_path / "runs")
    st.write_experiment("P", {"tolerance": 0.02})
    figure_run(st, "baseline", 0.90, 0.50)
    figure_run(st, "baseline", 0.91, 0.52, seed=1)
    figure_run(st, "augment", 0.90, 0.70, sigma=0.25, folds=1)
    figure_run(st, "augment", 0.89, 0.75, sigma=0.5, folds=5)
    figure_run(st, "regularizer", 0.90, 0.78, sigma=0.25, alpha=1)
    figure_run(st, "regularizer", 0.88, 0.85, sigma=1.0, alpha=1)
    figure_run(st, "regularizer", 0.7663000000000002, 0.9, sigma=5.0, alpha=1)
    figure_run(st, "regularizer", 0.0, 0.0, state="failed", sigma=10.0, alpha=1)
    return st


MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "svg": b"<svg", "pdf": b"%PDF-"}


@pytest.mark.process
@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_plot_writes_three_valid_figures(store, tmp_path, fmt):
    pytest.importorskip("matplotlib")
    out = subprocess.run(cli("plot", "--store", store.root, "--out", tmp_path / "fig", "--format", fmt),
                         capture_output=True, text=True, env=python_env())
    assert out.returncode == 0, out.stderr
    files = sorted((tmp_path / "fig").iterdir())
    assert [f.name for f in files] == [f"P-{n}.{fmt}" for n in ("accuracy-vs-robustness", "curves", "per-sigma")]
    for f in files:
        data = f.read_bytes()
        assert len(data) > 5000, f
        assert (MAGIC[fmt] in data[:400]) if fmt == "svg" else data.startswith(MAGIC[fmt]), f
        if fmt == "png":
            from PIL import Image
            with Image.open(f) as im:
                im.verify()
            with Image.open(f) as im:
                assert im.size[0] > 600 and im.size[1] > 400


def _records_drawn(plots, monkeypatch) -> list:
    """The comparison records the figures are drawn from, one per comparison drawn."""
    drawn = []
    real = plots._fig_scatter

    def spy(plt, rec, *rest):
        drawn.append(rec)
        return real(plt, rec, *rest)
    monkeypatch.setattr(plots, "_fig_scatter", spy)
    return drawn


def test_plot_tolerance_overrides_the_manifests_as_the_table_does(store, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from gaussreg.views import plot as plots
    drawn = _records_drawn(plots, monkeypatch)
    for tolerance in (None, 0.2):
        plots.plot(store, tmp_path / "fig", fmt="svg", tolerance=tolerance)
    best = [{b["method"]: b["params"].get("sigma") for b in rec["best"]} for rec in drawn]
    # 0.02 (the experiment's) keeps the sigma-5 regularizer (76.6 %) out; 0.2 lets it win on R
    assert [rec["tolerance"] for rec in drawn] == [0.02, 0.2]
    assert [b["regularizer"] for b in best] == [0.25, 5.0]
    bad = gaussreg("plot", "--store", store.root, "--out", tmp_path / "bad", "--tolerance", "2")
    assert bad.exit_code == 2 and "--tolerance must be a fraction in [0, 1], not 2.0" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_plot_budget_chooses_as_the_table_does(store, tmp_path, monkeypatch):
    """These runs recorded no training time, so under a budget only the baseline competes,
    as in `gaussreg table --budget`; a budget that is not a finite number > 0 is refused."""
    pytest.importorskip("matplotlib")
    from gaussreg.views import plot as plots
    from gaussreg.views import report
    drawn = _records_drawn(plots, monkeypatch)
    plots.plot(store, tmp_path / "fig", fmt="svg", budget=3)
    (rec,) = drawn
    assert rec == report.fair_table(store, budget=3)["experiments"][0]
    assert [e["method"] for e in rec["best"]] == ["baseline"] and rec["budget"]["not_comparable"] == 5
    bad = gaussreg("plot", "--store", store.root, "--out", tmp_path / "bad", "--budget", "0")
    assert bad.exit_code == 2 and "--budget must be a finite number > 0" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def _drawn_axes(plots, monkeypatch, name) -> list:
    """The (first) axes of each figure `name` draws, looked at before the figure is closed."""
    seen = []
    real = getattr(plots, name)

    def spy(*args):
        fig = real(*args)
        ax = fig.axes[0]
        band = [p for p in ax.patches if p.get_label().startswith("test accuracy ≥")]
        seen.append({"xlim": ax.get_xlim(), "xticks": [t.get_text() for t in ax.get_xticklabels()],
                     "band": [p.get_window_extent().transformed(ax.transData.inverted()).x1 for p in band],
                     "xlabel": ax.get_xlabel()})
        return fig
    monkeypatch.setattr(plots, name, spy)
    return seen


def test_the_tolerance_band_reaches_the_right_edge(store, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from gaussreg.views import plot as plots
    seen = _drawn_axes(plots, monkeypatch, "_fig_scatter")
    plots.plot(store, tmp_path / "fig", fmt="png")
    (ax,) = seen
    (right,) = ax["band"]
    assert right == pytest.approx(ax["xlim"][1], abs=1e-6)


def test_one_training_sigma_gives_an_honest_per_sigma_axis(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from gaussreg.views import plot as plots
    st = Store(tmp_path / "runs")
    st.write_experiment("P", {"tolerance": 0.05})
    figure_run(st, "baseline", 0.90, 0.50)
    figure_run(st, "regularizer", 0.90, 0.78, sigma=0.25, alpha=1)
    figure_run(st, "regularizer", 0.89, 0.80, sigma=0.25, alpha=2)
    seen = _drawn_axes(plots, monkeypatch, "_fig_per_sigma")
    plots.plot(st, tmp_path / "fig", fmt="png")
    (ax,) = seen
    assert ax["xticks"] == ["0.25"] and ax["xlim"] == (0, 0.5)
    assert "only one training sigma (0.25) is eligible" in ax["xlabel"]
    figure_run(st, "regularizer", 0.90, 0.85, sigma=1.0, alpha=1)
    plots.plot(st, tmp_path / "fig2", fmt="png")
    assert seen[-1]["xticks"] == ["0.25", "1"] and "one training sigma" not in seen[-1]["xlabel"]


def test_plots_default_folder_is_git_ignored_like_the_store():
    """`gaussreg plot` writes into ./figures unless told otherwise: like ./runs, output, not source."""
    import inspect
    from pathlib import Path

    from gaussreg import cli as gaussreg_cli
    default = inspect.signature(gaussreg_cli.plot).parameters["out"].default.default
    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().splitlines()
    assert f"/{default}/" in ignored and "/runs/*" in ignored


@pytest.mark.process
def test_plot_without_matplotlib_says_how_to_get_it(store, tmp_path):
    fake = tmp_path / "nompl"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = python_env()
    env["PYTHONPATH"] = f"{fake}:{env.get('PYTHONPATH', '')}"
    out = subprocess.run(cli("plot", "--store", store.root, "--out", tmp_path / "fig"), capture_output=True,
                         text=True, env=env)
    assert out.returncode == 2
    assert 'pip install "gaussreg[plots]"' in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "fig").exists()


@pytest.mark.process
def test_export_long_formats_read_back(store):
    def export(*args):
        out = subprocess.run(cli("export", "--store", store.root, *args), capture_output=True, text=True,
                             env=python_env())
        assert out.returncode == 0, out.stderr
        return out.stdout
    runs = list(csv.DictReader(io.StringIO(export())))
    assert len(runs) == 8 and {r["state"] for r in runs} == {"completed", "failed"}
    odd = next(r for r in runs if r["param_sigma"] == "5")
    assert odd["test_accuracy"] == "0.7663" and odd["val_robustness"] == "0.9"  # rounded, not 0.7663000000000002
    assert odd["test_noisy_accuracy"] == "0.6413"  # trapezoid of [0.7663, 0.6663, 0.4663] on [0, .25, .5]
    failed = next(r for r in runs if r["state"] == "failed")
    assert failed["test_accuracy"] == "" and failed["param_sigma"] == "10"
    base = [r for r in runs if r["method"] == "baseline"]
    assert base[0]["config"] == base[1]["config"] and {b["seed"] for b in base} == {"0", "1"}
    epochs = list(csv.DictReader(io.StringIO(export("--what", "epochs"))))
    assert len(epochs) == 16 and {e["epoch"] for e in epochs} == {"1", "2"}
    assert next(e for e in epochs if e["epoch"] == "1")["train_loss"] == "1"
    sig = [json.loads(line) for line in export("--what", "sigmas", "--format", "jsonl").splitlines()]
    assert len(sig) == 7 * 2 * 3  # completed runs x (test, val) x sigmas
    one = [s for s in sig if s["run_id"] == odd["run_id"] and s["split"] == "val"]
    assert [s["sigma"] for s in one] == SIGMAS and [s["consistency"] for s in one] == [1.0, 0.9, pytest.approx(0.78)]
    pd = pytest.importorskip("pandas")
    frame = pd.read_csv(io.StringIO(export()))
    assert len(frame) == 8 and frame["test_accuracy"].max() == pytest.approx(0.91)


def test_the_fair_table_is_recomputed_from_the_exported_runs(store, tmp_path):
    """`export --what runs --format jsonl` carries whole runs (spec, result with its
    per-sigma curves, certificates, the experiment's tolerance): report.table_of_export
    and `gaussreg table --from` give the store's table from that file alone."""
    from gaussreg.views import report
    from gaussreg.views.export import export
    reg = next(r for r in store.runs() if json.loads(r.spec_file.read_text())["params"].get("sigma") == 1.0)
    reg.write_certification({"sigma": 0.5, "per_image": [{"correct": True, "radius": 0.6},
                                                          {"correct": True, "radius": 0.3}, {"correct": False}]})
    f = tmp_path / "runs.jsonl"
    f.write_text(export(store, "runs", "jsonl"))
    lines = [json.loads(x) for x in f.read_text().splitlines()]
    assert len(lines) == 8 and all(x["tolerance"] == 0.02 for x in lines)
    one = next(x for x in lines if x["run_id"] == reg.id)
    assert one["result"]["per_sigma"] == [1.0, 0.85, pytest.approx(0.75)] and one["spec"]["params"]["alpha"] == 1.0
    assert one["certified"]["accuracy"] == {"0": pytest.approx(2 / 3), "0.25": pytest.approx(2 / 3),
                                            "0.5": pytest.approx(1 / 3)}
    for tol, select in ((None, "validation"), (0.0, "test"), (0.05, "validation")):
        want = report.fair_table(store, None, tol, select)
        got = report.table_of_export(lines, tol, select)
        assert got == want, (tol, select)
        assert report.render_markdown(got, True) == report.render_markdown(want, True)
    best = {e["method"]: e for e in want["experiments"][0]["best"]}
    assert best["regularizer"]["params"]["sigma"] == 1.0  # the certified run
    assert best["regularizer"]["certified"]["accuracy"]["0.5"] == pytest.approx(1 / 3)
    out = gaussreg("table", "--from", f, "--format", "markdown", "--all", "--tolerance", "0.05")
    assert out.exit_code == 0, out.stderr
    assert out.stdout == report.render_markdown(want, True) + "\n" and "cert@0.5 %" in out.stdout
    f.write_text(f.read_text() + "not json\n")
    out = gaussreg("table", "--from", f)
    assert out.exit_code == 2 and f"{f}:9: not a JSON line" in " ".join(out.stderr.split())


def test_export_carries_each_runs_cost(store):
    """Steps, passes by kind and training seconds, in CSV and JSON lines; empty (null) for a
    run from before gaussreg recorded them."""
    from gaussreg.views.export import export
    reg = next(r for r in store.runs() if json.loads(r.spec_file.read_text())["params"].get("sigma") == 1.0)
    atomic_write_json(reg.file("result.json"), {**reg.result(), "steps": 120, "train_cpu_s": 12.5,
                                                  "train_gpu_s": None, "train_time_s": 14.0,
                                                  "images": {"clean": 6000, "noisy": 0, "expected": 6000}})
    rows = {r["run_id"]: r for r in csv.DictReader(io.StringIO(export(store, "runs", "csv")))}
    got = rows[reg.id]
    assert (got["steps"], got["train_cpu_s"], got["train_gpu_s"], got["train_time_s"]) == ("120", "12.5", "", "14")
    assert (got["images_clean"], got["images_noisy"], got["images_expected"]) == ("6000", "0", "6000")
    old = next(r for i, r in rows.items() if i != reg.id and r["state"] == "completed")
    assert old["steps"] == old["train_cpu_s"] == old["images_clean"] == ""
    lines = {x["run_id"]: x for x in map(json.loads, export(store, "runs", "jsonl").splitlines())}
    assert lines[reg.id]["images_expected"] == 6000 and lines[reg.id]["train_cpu_s"] == 12.5
    assert lines[reg.id]["result"]["images"] == {"clean": 6000, "noisy": 0, "expected": 6000}
    assert lines[old["run_id"]]["steps"] is None and lines[old["run_id"]]["images_noisy"] is None


def _export_file(store, path, *args):
    """`gaussreg export ARGS` (in this process) written to `path`, as a user redirects it."""
    out = gaussreg("export", "--store", store.root, *args)
    assert out.exit_code == 0, out.stderr
    path.write_text(out.stdout)
    return path


@pytest.mark.parametrize("what", ["runs", "epochs", "sigmas"])
def test_every_json_line_has_every_column_in_one_order(store, tmp_path, what):
    """A reader that takes its columns from the first lines (polars' read_ndjson) lost
    param_alpha of a mixed-method export whose first run was an augment run: now every line
    has every column, null where its run has none, in the CSV's order; the param_* columns
    come sorted right after `params` whatever method comes first."""
    pd = pytest.importorskip("pandas")
    f = _export_file(store, tmp_path / f"{what}.jsonl", "--what", what, "--format", "jsonl")
    lines = [json.loads(x) for x in f.read_text().splitlines()]
    assert lines[0]["method"] == "augment" and lines[0]["param_alpha"] is None  # an augment run comes first
    keys = list(lines[0])
    assert all(list(x) == keys for x in lines)
    i = keys.index("params")
    assert keys[i + 1:i + 5] == ["param_alpha", "param_folds", "param_fresh_noise", "param_sigma"]
    assert not any(k.startswith("param_") for k in keys[i + 5:])
    frame = pd.read_json(f, lines=True)
    assert list(frame.columns) == keys
    reg = frame[frame["method"] == "regularizer"]
    assert set(reg["param_alpha"]) == {1.0} and frame[frame["method"] != "regularizer"]["param_alpha"].isna().all()
    csv_file = _export_file(store, tmp_path / f"{what}.csv", "--what", what)
    header = list(pd.read_csv(csv_file).columns)
    assert header == [k for k in keys if k not in ("spec", "result", "certified")]  # JSON lines of runs: whole runs
    if what == "epochs":  # the loss's terms: a family of columns too, after the epoch's own
        assert keys[keys.index("best") + 1:] == ["train_ce"]


def test_params_text_labels_every_export(store, tmp_path):
    pd = pytest.importorskip("pandas")
    labels = {"runs": {"", "folds=1 sigma=0.25", "folds=5 sigma=0.5", "alpha=1 sigma=0.25", "alpha=1 sigma=1",
                       "alpha=1 sigma=5", "alpha=1 sigma=10"}}
    labels["epochs"] = labels["runs"]
    labels["sigmas"] = labels["runs"] - {"alpha=1 sigma=10"}  # the failed run has no curves
    for what, want in labels.items():
        frame = pd.read_csv(_export_file(store, tmp_path / f"{what}.csv", "--what", what))
        assert set(frame["params"].fillna("")) == want, what  # the baseline's: empty
        five = frame[frame["params"] == "folds=5 sigma=0.5"]
        assert set(five["method"]) == {"augment"} and set(five["param_folds"]) == {5}
        assert set(five["param_sigma"]) == {0.5} and five["param_alpha"].isna().all()
    curves = pd.read_csv(tmp_path / "sigmas.csv")
    test = curves[curves["split"] == "test"].pivot_table(index="sigma", columns="params", values="consistency")
    assert list(test["alpha=1 sigma=1"]) == [1.0, 0.85, pytest.approx(0.75)]


def test_export_from_an_export_file(store, tmp_path):
    """`export --from runs.jsonl`, as `table --from`: the same rows as from the store (runs and
    sigmas; an export of runs holds no epochs), and in this version's columns from an older file."""
    pd = pytest.importorskip("pandas")
    f = _export_file(store, tmp_path / "runs.jsonl", "--format", "jsonl")
    for args in (["--format", "jsonl"], [], ["--what", "sigmas"], ["--what", "sigmas", "--format", "jsonl"],
                 ["--experiment", "P"]):
        mine = gaussreg("export", "--from", f, *args)
        assert mine.exit_code == 0, mine.stderr
        assert mine.stdout == gaussreg("export", "--store", store.root, *args).stdout, args
    again = pd.read_json(io.StringIO(gaussreg("export", "--from", f, "--format", "jsonl").stdout), lines=True)
    assert len(again) == 8 and again["test_accuracy"].max() == pytest.approx(0.91)
    for args, words in ((["--what", "epochs"], f"--what epochs needs a store: {f}, an export of runs, carries no epochs"),
                        (["--experiment", "nope"], f"no runs of experiment 'nope' in {f}")):
        out = gaussreg("export", "--from", f, *args)
        assert out.exit_code == 2 and words in " ".join(out.stderr.split()) and out.stdout == "", args
    (tmp_path / "bad.jsonl").write_text('{"run_id": "x"}\n')
    out = gaussreg("export", "--from", tmp_path / "bad.jsonl")
    assert out.exit_code == 2 and "bad.jsonl:1: not a run of `gaussreg export" in " ".join(out.stderr.split())
    # the first study's file (5 epochs), exported before `params` existed: now with it
    study = Path(__file__).resolve().parents[1] / "docs" / "study-fmnist" / "runs-5-epochs.jsonl"
    old = json.loads(study.read_text().splitlines()[0])
    assert "params" not in old
    frame = pd.read_csv(io.StringIO(gaussreg("export", "--from", study).stdout))
    assert len(frame) == 52 and "alpha=0.5 sigma=1" in set(frame["params"])
    assert list(frame.columns).index("param_alpha") == list(frame.columns).index("params") + 1
