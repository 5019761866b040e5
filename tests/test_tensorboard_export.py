"""`gaussreg export --format tensorboard`: the event files read back with TensorBoard's own
reader hold every number of the store, and the HParams plugin's data names each run's
parameters."""
import json
import sys

import numpy as np
import pytest
from conftest import gaussreg
from factories import SIGMAS, figure_run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

from gaussreg.runs.store import Store
from gaussreg.views.report import run_metrics


@pytest.fixture
def store(tmp_path):
    st = Store(tmp_path / "runs")
    figure_run(st, "baseline", 0.90, 0.50)
    figure_run(st, "baseline", 0.91, 0.52, seed=1)
    figure_run(st, "augment", 0.89, 0.75, sigma=0.5, folds=5)
    figure_run(st, "regularizer", 0.7663000000000002, 0.9, sigma=0.25, alpha=1)
    figure_run(st, "regularizer", 0.0, 0.0, state="failed", sigma=1.0, alpha=1)
    return st


def read(path) -> EventAccumulator:
    acc = EventAccumulator(str(path))
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator) -> dict:
    """tag -> [(step, value)], as TensorBoard's reader gives them."""
    return {tag: [(s.step, s.value) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_scalars(run) -> dict:
    """What the export must hold for `run`, read from the store's own files, as float32
    (TensorBoard's scalar type)."""
    out = {}

    def put(tag, step, value):
        out.setdefault(tag, []).append((step, float(np.float32(value))))
    for e in run.epochs():
        for key in ("train_loss", "val_loss", "val_ce", "val_accuracy"):
            put(key.replace("_", "/", 1), e["epoch"], e[key])
        for key in ("lr", "epoch_time", "images_per_s"):
            put(key, e["epoch"], e[key])
        for term, v in e["train_terms"].items():
            put(f"train/{term}", e["epoch"], v)
    res = run.result()
    if res:
        m = run_metrics(res)
        for key in ("test_accuracy", "test_robustness", "test_noisy_accuracy", "val_accuracy", "val_robustness",
                    "val_noisy_accuracy"):
            put(f"final/{key}", res["epochs_run"], m[key])
        for i, sigma in enumerate(res["sigmas"]):
            for split, cons, accs in (("test", "per_sigma", "accuracy_per_sigma"),
                                      ("val", "val_per_sigma", "val_accuracy_per_sigma")):
                put(f"per_sigma/{split}_consistency", round(1000 * sigma), res[cons][i])
                put(f"per_sigma/{split}_accuracy", round(1000 * sigma), res[accs][i])
    return out


def test_every_number_of_the_store_reads_back_from_the_event_files(store, tmp_path):
    r = gaussreg("export", "--store", store.root, "--format", "tensorboard", "--out", tmp_path / "tb")
    assert r.exit_code == 0, r.stderr
    assert "5 runs written" in r.stdout
    runs = list(store.runs())
    assert sorted(p.name for p in (tmp_path / "tb").iterdir() if p.is_dir()) == sorted(run.id for run in runs)
    for run in runs:
        got = scalars(read(tmp_path / "tb" / run.id))
        want = expected_scalars(run)
        assert got == want, run.id
        if run.result():
            assert len(got["per_sigma/test_accuracy"]) == len(SIGMAS) and got["final/test_accuracy"]
    # the numbers differ from run to run: the files are not one run's written five times
    assert len({tuple(scalars(read(tmp_path / "tb" / run.id)).get("final/test_accuracy", [])) for run in runs}) == 5


def test_the_hparams_plugin_data_names_each_runs_parameters(store, tmp_path):
    assert gaussreg("export", "--store", store.root, "--format", "tensorboard", "--out", tmp_path / "tb").exit_code == 0
    groups = {}
    for run in store.runs():
        spec = run.spec()
        content = read(tmp_path / "tb" / run.id).PluginTagToContent(metadata.PLUGIN_NAME)
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        hp = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
        assert hp["method"] == spec["method"] and hp["experiment"] == "P" and hp["seed"] == spec["seed"]
        assert hp["model"] == "mlp" and hp["dataset"] == "synthetic" and hp["lr"] == spec["optimizer"]["lr"]
        assert {k[len("param_"):]: v for k, v in hp.items() if k.startswith("param_")} == spec["params"]
        assert not start.group_name  # a row of the table per run
        groups.setdefault(hp["config"], []).append((spec["method"], spec["seed"]))
        end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
        state = run.status()["state"]
        assert end.status == {"completed": api_pb2.STATUS_SUCCESS, "failed": api_pb2.STATUS_FAILURE}[state]
    # the seeds of one configuration share their config; every other run has its own
    assert sorted(map(sorted, groups.values())) == [[("augment", 0)], [("baseline", 0), ("baseline", 1)],
                                                    [("regularizer", 0)], [("regularizer", 0)]]
    experiment = metadata.parse_experiment_plugin_data(
        read(tmp_path / "tb").PluginTagToContent(metadata.PLUGIN_NAME)[metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos] == [
        "final/test_accuracy", "final/test_robustness", "final/test_noisy_accuracy", "final/val_accuracy",
        "final/val_robustness", "final/val_noisy_accuracy", "final/train_time_s"]
    infos = {h.name: h for h in experiment.hparam_infos}
    assert {"method", "seed", "param_alpha", "param_sigma", "param_folds", "lr"} <= set(infos)
    assert list(infos["method"].domain_discrete) == ["augment", "baseline", "regularizer"]
    assert infos["param_sigma"].type == api_pb2.DATA_TYPE_FLOAT64 and infos["method"].differs
    assert not infos["model"].differs


def test_exporting_again_replaces_the_runs_event_files(store, tmp_path):
    for _ in range(2):
        assert gaussreg("export", "--store", store.root, "--format", "tensorboard", "--out", tmp_path / "tb",
                        "--experiment", "P").exit_code == 0
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    for run in store.runs():
        files = list((tmp_path / "tb" / run.id).iterdir())
        assert len(files) == 1, files
        assert scalars(read(tmp_path / "tb" / run.id)) == expected_scalars(run)  # no step twice


def test_tensorboard_export_refuses_what_it_cannot_do(store, tmp_path, monkeypatch):
    r = gaussreg("export", "--store", store.root, "--format", "tensorboard")
    assert r.exit_code == 2 and "give it --out DIR" in r.stderr
    r = gaussreg("export", "--store", store.root, "--out", tmp_path / "tb")
    assert r.exit_code == 2 and "--out is for --format tensorboard" in r.stderr
    assert not (tmp_path / "tb").exists()
    runs_jsonl = tmp_path / "runs.jsonl"
    runs_jsonl.write_text(gaussreg("export", "--store", store.root, "--format", "jsonl").stdout)
    r = gaussreg("export", "--from", runs_jsonl, "--format", "tensorboard", "--out", tmp_path / "tb")
    assert r.exit_code == 2 and f"--format tensorboard needs a store: {runs_jsonl}, an export of runs" in r.stderr
    # two sigmas of one grid that one milli-sigma step cannot tell apart
    close = store.get(figure_run(store, "baseline", 0.5, 0.5, seed=7))
    res = close.result()
    res["sigmas"] = [0.0, 0.1, 0.1002]
    close.result_file.write_text(json.dumps(res))
    r = gaussreg("export", "--store", store.root, "--format", "tensorboard", "--out", tmp_path / "tb")
    assert r.exit_code == 2 and "sigmas 0.1 and 0.1002 are closer than 1/1000" in r.stderr
    assert not (tmp_path / "tb").exists()  # checked before anything is written
    # without the optional extra: one sentence
    monkeypatch.delitem(sys.modules, "gaussreg.views.tensorboard_export", raising=False)
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it was never installed
    r = gaussreg("export", "--store", store.root, "--format", "tensorboard", "--out", tmp_path / "tb2")
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: --format tensorboard needs the tensorboard package: pip install -e " \
                               "'.[tensorboard]' in the clone"
    assert not (tmp_path / "tb2").exists()

