import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import cli, python_env, wait_for
from conftest import gaussreg as in_process
from factories import queued_run, written_run

from gaussreg.runs import reader
from gaussreg.runs.store import RunFileError, Store

DEMO = """
[[experiment]]
name = "cli"
dataset = "synthetic"
model = "mlp"
max_epochs = 1
batch_size = 200
train_subset = 400
test_subset = 100
robustness = { sigmas = [0.0, 0.25] }
methods.baseline = {}
methods.regularizer = { sigma = 0.25, alpha = [0.5, 1.0] }
"""


def run(*args, **env):
    """`gaussreg ARGS` as a process: for what only a process shows (its entry point, its workers)."""
    return subprocess.run(cli(*args), capture_output=True, text=True, env=python_env(COLUMNS="200", **env))


def gaussreg(*args, **env):
    """`gaussreg ARGS` in this process, 200 columns wide as run() is."""
    return in_process(*args, **{"COLUMNS": "200", **env})


@pytest.mark.process
def test_help_and_version(tmp_path):
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("run", "table", "ls", "show", "cancel", "eval", "train", "data", "tui"):
        assert cmd in out.stdout
    assert run("--version").stdout.startswith("gaussreg 0.")
    # `gaussreg tui` as a process too (the other commands are elsewhere): a bad store is refused before the app starts
    (tmp_path / "afile").write_text("")
    out = run("tui", "--store", tmp_path / "afile")
    assert out.returncode == 2 and out.stderr.strip() == f"error: --store {tmp_path / 'afile'} is a file, not a folder"


@pytest.mark.process
def test_numbers_that_size_the_slots_are_bounded_by_the_machine(tmp_path):
    from gaussreg.launch.gpus import usable_cpus
    from gaussreg.launch.request import MAX_RUNS_PER_CORE
    (tmp_path / "m.toml").write_text(DEMO)
    limit = MAX_RUNS_PER_CORE * usable_cpus()
    # 2,000,000 first: a build without the bound makes that many slots (seconds, not the whole memory)
    for flag, value in [("--max-parallel", "2000000"), ("--max-parallel", "99999999999999999999"),
                        ("--per-gpu", str(limit + 1)), ("--per-gpu", "99999999999999999999")]:
        t0 = time.time()
        out = run("run", tmp_path / "m.toml", "--store", tmp_path / "runs", flag, value, "--dry-run")
        assert out.returncode == 2 and time.time() - t0 < 60, (flag, value, out.stdout[-300:])
        said = " ".join(out.stderr.split())
        if len(value) > 10:  # past 32 bits: refused as the flag is parsed, before anything is planned
            assert f"{flag} must be at most 2147483647, not {value}" in said, out.stderr
        else:
            assert f"{flag} {value} is more runs at once than this machine can run: at most {limit}" in said, out.stderr
        assert "Traceback" not in out.stderr
    out = run("run", tmp_path / "m.toml", "--store", tmp_path / "runs", "--max-parallel", str(limit), "--dry-run")
    assert out.returncode == 0 and f"on {limit} slots" in " ".join(out.stdout.split()), out.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_flags_exit_2_with_one_sentence(tmp_path):
    (tmp_path / "m.toml").write_text(DEMO)
    m = tmp_path / "m.toml"
    for args, needle in [(("--gpus", "first"), "--gpus must be"), (("--per-gpu", "0"), "(--per-gpu) must be a whole number ≥ 1"),
                         (("--max-parallel", "0"), "(--max-parallel) must be a whole number ≥ 1"),
                         (("--only", "nomatch*"), "matches no run")]:
        out = gaussreg("run", m, "--store", tmp_path / "runs", *args)
        assert out.exit_code == 2 and needle in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()
    assert gaussreg("ls", "--store", tmp_path, "--state", "sleeping").exit_code == 2
    assert gaussreg("show", "nope", "--store", tmp_path).exit_code == 2


def test_missing_dataset_stops_before_anything_is_written(tmp_path):
    (tmp_path / "m.toml").write_text(DEMO.replace('"synthetic"', '"cifar10"').replace('"mlp"', '"lenet"'))
    out = gaussreg("run", tmp_path / "m.toml", "--store", tmp_path / "runs", "--data-dir", tmp_path / "empty")
    assert out.exit_code == 2
    assert "Dataset 'cifar10' was not found" in out.stderr and "gaussreg data download cifar10" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_dry_run_lists_ids_and_launches_nothing(tmp_path):
    (tmp_path / "m.toml").write_text(DEMO)
    out = gaussreg("run", tmp_path / "m.toml", "--store", tmp_path / "runs", "--dry-run")
    assert out.exit_code == 0
    from gaussreg.runs import manifest
    for r in manifest.load(tmp_path / "m.toml").runs():
        assert r.id in out.stdout
    assert not (tmp_path / "runs").exists()


def test_dry_run_says_per_experiment_what_is_new_and_whether_data_is_there(tmp_path):
    two = DEMO + DEMO.replace('"cli"', '"cif"').replace('"synthetic"', '"cifar10"').replace('"mlp"', '"lenet"')
    (tmp_path / "m.toml").write_text(two)
    out = gaussreg("run", tmp_path / "m.toml", "--store", tmp_path / "runs", "--dry-run", "--data-dir", tmp_path / "empty")
    assert out.exit_code == 0, out.stderr
    lines = out.stdout.replace("\n", " ")
    assert "cli: 3 new, 0 done, 0 to resume or retry; data present" in lines
    assert "cif: 3 new, 0 done, 0 to resume or retry; data MISSING: cifar10" in lines
    assert "Dataset 'cifar10' was not found" in lines and not (tmp_path / "runs").exists()


@pytest.mark.process  # asks nvidia-smi where it is installed
def test_gpus_asked_on_a_machine_without_them_is_an_error(tmp_path):
    (tmp_path / "m.toml").write_text(DEMO)
    for extra in ((), ("--dry-run",), ("--detach",)):
        out = gaussreg("run", tmp_path / "m.toml", "--store", tmp_path / "runs", "--gpus", "0", *extra,
                       CUDA_VISIBLE_DEVICES="")
        assert out.exit_code == 2 and "--gpus 0 asks for GPUs, but this machine shows none" in out.stderr
    out = gaussreg("run", tmp_path / "m.toml", "--store", tmp_path / "runs", "--gpus", "1", "--dry-run",
                   CUDA_VISIBLE_DEVICES="5")  # one GPU visible, numbered 0
    assert out.exit_code == 2 and "GPU 1 does not exist; this process sees 1 GPU(s)" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_run_experiment_option_picks_experiments_by_name(tmp_path):
    (tmp_path / "m.toml").write_text(DEMO + DEMO.replace('"cli"', '"other"'))
    out = gaussreg("run", tmp_path / "m.toml", "--store", tmp_path / "runs", "--dry-run", "--experiment", "other")
    assert out.exit_code == 0 and "other-" in out.stdout and "cli-" not in out.stdout
    out = gaussreg("run", tmp_path / "m.toml", "--store", tmp_path / "runs", "--dry-run", "--experiment", "nope")
    assert out.exit_code == 2 and "experiment 'nope' is not in" in out.stderr


@pytest.mark.process
def test_run_then_read_the_store(tmp_path):
    (tmp_path / "m.toml").write_text(DEMO.replace("alpha = [0.5, 1.0]", "alpha = 1.0"))  # two runs
    out = run("run", tmp_path / "m.toml", "--store", tmp_path / "runs", "--max-parallel", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cli · synthetic · mlp" in out.stdout and "equivalent augmentation" in out.stdout
    ls = json.loads(run("ls", "--store", tmp_path / "runs", "--format", "json").stdout)
    for r in ls:  # piped: a line per epoch per run between "started" and "completed" (no live table)
        line = next(x for x in out.stdout.splitlines() if x.startswith(f"epoch 1/1 {r['id']}  loss "))
        assert f"val acc {r['result']['best_val_accuracy'] * 100:.2f}%" in line
        lines = out.stdout.splitlines()
        assert (lines.index(next(x for x in lines if x.startswith("started") and r["id"] in x)) < lines.index(line)
                < lines.index(next(x for x in lines if x.startswith("completed") and r["id"] in x)))
    assert len(ls) == 2 and {r["state"] for r in ls} == {"completed"}
    rid = ls[0]["id"]
    show = run("show", rid[:-3], "--store", tmp_path / "runs")  # a unique prefix is enough
    assert show.returncode == 0 and "test accuracy" in show.stdout and "completed" in show.stdout
    # so is the TUI's short id (a prefix of the hash part)
    assert rid in run("show", rid.rsplit("-", 1)[-1][:6], "--store", tmp_path / "runs").stdout
    log = tmp_path / "runs" / rid / "worker.log"  # a file in a run directory that is no checkpoint
    bad = run("eval", log)
    assert bad.returncode == 2 and f"{log} is not a gaussreg checkpoint" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "weights_only" not in bad.stderr
    # a completed run is in no phase (phases are what a running worker does)
    assert json.loads((tmp_path / "runs" / rid / "status.json").read_text())["phase"] is None
    ev = run("eval", rid, "--store", tmp_path / "runs", "--sigmas", "0,0.1,0.2", "--format", "json")
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout)
    assert res["sigmas"] == [0.0, 0.1, 0.2] and res["per_sigma"][0] == 1.0
    best = next(r for r in ls if r["id"] == rid)["result"]
    assert res["clean_accuracy"] == best["test_accuracy"]
    # without --sigmas: the run's own sigmas, and it says which checkpoint and sigmas it used
    ev = run("eval", rid, "--store", tmp_path / "runs")
    assert ev.returncode == 0, ev.stderr
    assert (f"{rid}: checkpoint {tmp_path / 'runs' / rid / 'best.pt'}, 2 sigmas 0 to 0.25 (the run's own), "
            "1 sample(s)") in ev.stdout
    rows = [x.split("│")[1].strip() for x in ev.stdout.splitlines() if x.count("│") == 4]
    assert rows == ["0.0000", "0.2500"], ev.stdout  # one row per sigma
    assert f"robustness R {best['robustness'] * 100:.2f}%" in ev.stdout  # the same number as training's
    again = run("run", tmp_path / "m.toml", "--store", tmp_path / "runs")
    assert again.returncode == 0 and again.stdout.count("skipped") == 2
    assert run("cancel", rid, "--store", tmp_path / "runs").returncode == 2  # not running


def test_corrupt_run_files_are_named(tmp_path):
    st = Store(tmp_path / "runs")
    r = queued_run(st, experiment="x")
    r.file("status.json").write_text("{not json")
    out = gaussreg("show", r.id, "--store", st.root)
    assert out.exit_code == 2 and "status.json is not valid JSON (line 1" in out.stderr
    ls = gaussreg("ls", "--store", st.root, "--format", "json")
    assert ls.exit_code == 0 and json.loads(ls.stdout)[0]["state"] == "corrupt"
    assert gaussreg("table", "--store", st.root).exit_code == 0


def _running(tmp_path, phase, epochs=()):
    import time
    r = written_run(Store(tmp_path / "runs"), status={"state": "running", "phase": phase, "epoch": len(epochs),
                                                       "max_epochs": 4},
                    events=[{"type": "epoch", "epoch": e, "train_loss": 0.5 / e, "val_loss": 0.6, "val_accuracy": 0.8,
                             "lr": 1e-3, "images_per_s": 100.0} for e in epochs], experiment="x", max_epochs=4)
    from gaussreg.launch.scheduler import ActiveRun, Snapshot
    return r, Snapshot((ActiveRun(r, None, time.time() - 10),), 0, {}, False)


def _view(lines):
    import io

    from rich.console import Console

    from gaussreg.views.live_view import LiveView
    out = io.StringIO()
    return LiveView(1, Console(file=out, width=200), lines=lines), out


def test_live_view_names_the_phase_instead_of_an_eta(tmp_path):
    r, snap = _running(tmp_path, "evaluating", epochs=(1, 2, 3, 4))
    view, out = _view(lines=False)
    view.on_change(snap, "started", r)
    view.on_change(snap, "tick", None)
    view.console.print(view.render(snap))
    row = next(x for x in out.getvalue().splitlines() if x.strip().startswith(r.id))
    assert row.split()[-1] == "R" and "evaluating R" in row and "4/4" in row and "≤" not in row
    r.write_status({"state": "running", "phase": "training", "epoch": 4, "max_epochs": 4})
    view.on_change(snap, "tick", None)
    view.console.print(view.render(snap))
    assert out.getvalue().splitlines()[-2].split()[-1] == "≤0s"  # training again: an ETA


def test_piped_live_view_prints_each_epoch_and_the_long_phases(tmp_path):
    r, snap = _running(tmp_path, "training", epochs=(1,))
    view, out = _view(lines=True)
    view.on_change(snap, "started", r)
    view.on_change(snap, "tick", None)
    with open(r.file("events.jsonl"), "a") as f:
        f.write(json.dumps({"type": "epoch", "epoch": 2, "train_loss": 0.125, "val_loss": 0.6, "val_accuracy": 0.8125,
                            "lr": 1e-3, "images_per_s": 100.0}) + "\n")
    r.write_status({"state": "running", "phase": "certifying", "epoch": 2, "max_epochs": 4})
    view.on_change(snap, "tick", None)
    view.on_change(snap, "tick", None)
    lines = out.getvalue().splitlines()
    assert lines[1:] == [f"epoch 1/4 {r.id}  loss 0.5000  val acc 80.00%",
                         f"epoch 2/4 {r.id}  loss 0.1250  val acc 81.25%", f"certifying {r.id}"]


def test_small_ones_store_missing_plural_param_order_eval_target(tmp_path):
    for cmd in ("ls", "table", "export", "plot"):
        out = gaussreg(cmd, "--store", tmp_path / "nope")
        assert out.exit_code == 2 and f"the store {tmp_path / 'nope'} does not exist" in out.stderr, (cmd, out.stderr)
    out = gaussreg("show", "abc", "--store", tmp_path / "nope")
    assert out.exit_code == 2 and "does not exist" in out.stderr
    (tmp_path / "m.toml").write_text(DEMO)
    dry = gaussreg("run", tmp_path / "m.toml", "--store", tmp_path / "runs", "--dry-run", "--only", "*baseline*")
    assert dry.exit_code == 0 and "1 run from" in dry.stdout and "1 runs" not in dry.stdout
    dry = gaussreg("run", tmp_path / "m.toml", "--store", tmp_path / "runs", "--dry-run")
    st = Store(tmp_path / "runs")
    from gaussreg.runs import manifest
    for r in manifest.load(tmp_path / "m.toml").runs():
        st.create(r.spec, r.id)  # spec.json has sorted keys: ls must read the same as the dry run
    ls = gaussreg("ls", "--store", tmp_path / "runs")
    assert "3 runs in" in ls.stdout
    for words in ("alpha=0.5 sigma=0.25", "alpha=1 sigma=0.25"):
        assert words in dry.stdout and words in ls.stdout
    out = gaussreg("eval", "README.md", "--store", tmp_path / "runs")
    assert out.exit_code == 2 and "README.md is not a run id or a checkpoint inside a run directory" in out.stderr
    # a store that is a file, an experiment with no runs, an empty --sigmas: one sentence, exit 2,
    # and nothing written
    (tmp_path / "afile").write_text("")
    for cmd in ("tui", "export"):
        out = gaussreg(cmd, "--store", tmp_path / "afile")
        assert out.exit_code == 2 and out.stderr.strip() == f"error: --store {tmp_path / 'afile'} is a file, not a folder"
    for cmd in (("export",), ("plot", "--out", tmp_path / "figs")):
        out = gaussreg(*cmd, "--store", tmp_path / "runs", "--experiment", "nope")
        assert out.exit_code == 2 and "no runs of experiment 'nope' in" in out.stderr, (cmd, out.stderr)
    assert not (tmp_path / "figs").exists()
    from gaussreg.runs import reader
    for name in ("cli", "nope"):  # the cheap check export makes agrees with listing the runs
        assert reader.has_runs(st, name) == bool(reader.list_runs(st, name)) == (name == "cli")
    assert gaussreg("export", "--store", tmp_path / "runs", "--experiment", "cli").stdout.count("\n") == 4  # header + 3
    out = gaussreg("eval", tmp_path / "gone.pt", "--store", tmp_path / "runs")
    assert out.exit_code == 2 and f"{tmp_path / 'gone.pt'} does not exist (and is no run id of store" in out.stderr
    out = gaussreg("eval", ls_ids(st)[0], "--store", tmp_path / "runs", "--sigmas", "")
    assert out.exit_code == 2 and "--sigmas must be a list like" in out.stderr
    out = gaussreg("ls", "--store", tmp_path / "runs", "--state", "sleeping")
    assert out.exit_code == 2 and "corrupt" in out.stderr
    # a run by a prefix of its id or of its hash part; ambiguous says which
    a, b = sorted(ls_ids(st))[:2]
    assert st.get(a.rsplit("-", 1)[-1][:6]).id == a and st.get(a[:-2]).id == a
    with pytest.raises(RunFileError, match="is ambiguous"):
        st.get("cli-")


def ls_ids(st):
    return [r.id for r in st.runs()]


def test_show_names_the_processor(tmp_path):
    import torch

    from gaussreg.runs.device import device_name
    from gaussreg.runs.store import atomic_write_json
    name = device_name(torch.device("cpu"))
    assert name.startswith("cpu (") and name not in ("cpu (x86_64)", "cpu (aarch64)")
    st = Store(tmp_path / "runs")
    r = queued_run(st, experiment="x")
    r.write_status({"state": "completed"})
    atomic_write_json(r.file("result.json"), {"test_accuracy": 0.5, "robustness": 0.7, "device": "cpu",
                                              "device_name": "x86_64"})  # what older workers wrote
    assert "on cpu (x86_64) in fp32" in gaussreg("show", r.id, "--store", st.root).stdout  # older workers: fp32
    atomic_write_json(r.file("result.json"), {"test_accuracy": 0.5, "robustness": 0.7, "device": "cpu",
                                              "device_name": name, "precision": "bf16", "compile": True})
    assert f"on {name} in bf16, compiled" in gaussreg("show", r.id, "--store", st.root).stdout


def test_a_failed_download_does_not_send_you_to_the_same_command(tmp_path, monkeypatch):
    import sys as _sys
    import urllib.error

    import pytest

    from gaussreg.data import download
    from gaussreg.data import loading as data

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setitem(_sys.modules, "torchvision.datasets", None)  # the plain HTTP path
    monkeypatch.setattr(download, "_fetch", offline)
    with pytest.raises(data.DataError) as e:
        download.download("mnist", tmp_path)
    msg = str(e.value)
    assert msg.startswith("Could not download 'mnist'") and "gaussreg data download" not in msg
    assert "run it again where the dataset's site can be reached" in msg
    assert "gaussreg data download mnist" in data.missing_message("mnist", tmp_path)  # elsewhere it is the way


def test_rm_removes_whole_runs_after_asking_and_refuses_live_ones(tmp_path):
    """`gaussreg rm`: asks (no answer removes nothing), refuses a running and a queued run with
    one sentence each, and takes a run's checkpoints and certificates with it; nothing is left
    half-removed (no trash in the store, which `ls` never lists anyway)."""
    from typer.testing import CliRunner

    from gaussreg import cli as gaussreg_cli
    from gaussreg.runs.store import try_lock
    st = Store(tmp_path / "runs")
    done = written_run(st, status={"state": "completed"}, result={"test_accuracy": 0.9, "robustness": 0.5},
                       experiment="a", seed=1)
    for name in ("best.pt", "last.pt", "certify-0.25.json", "worker.log"):
        done.file(name).write_text("x")
    failed = [written_run(st, status={"state": "failed", "error": "boom"}, experiment="a", seed=s).id for s in (2, 3)]
    other = written_run(st, status={"state": "failed"}, experiment="b").id
    queued = queued_run(st, experiment="a", seed=4)
    running = written_run(st, status={"state": "running", "pid": 1, "host": socket.gethostname()},
                          experiment="a", seed=5)
    lock = try_lock(running)  # its worker holds the lock: it is alive
    launch = st.hold_launch()  # and a launch runs, which will start the queued one
    try:
        out = CliRunner().invoke(gaussreg_cli.app, ["rm", "--store", str(st.root), "--state", "failed"], input="n\n")
        assert out.exit_code == 1 and "nothing removed (add --yes" in out.stderr
        assert all(i in out.stdout for i in failed + [other]) and "Remove 3 runs" in out.stdout
        assert len(list(st.runs())) == 6
        out = gaussreg("rm", "--store", st.root, done.id, running.id, queued.id, "--yes")
        assert out.exit_code == 1, out.stdout + out.stderr
        said = " ".join(out.stderr.split())
        assert f"not removed: run {running.id} is running: cancel it first (`gaussreg cancel {running.id}`)" in said
        assert f"not removed: run {queued.id} is queued: a launch will start it" in said
        assert "removed 1 run from" in out.stdout
        assert not done.path.exists() and running.path.is_dir() and queued.path.is_dir()
        out = CliRunner().invoke(gaussreg_cli.app, ["rm", "--store", str(st.root), "--experiment", "a",
                                                    "--state", "failed"], input="y\n")
        assert out.exit_code == 0 and "removed 2 runs" in out.stdout, out.stdout + out.stderr
        assert sorted(r.id for r in st.runs()) == sorted([other, queued.id, running.id])
        assert not any(r["row"].not_launched for r in reader.list_runs(st))
        assert [p.name for p in st.root.iterdir() if p.name.startswith(".")] == []  # no trash left
        st.release_launch(launch)
        launch = None
        # its launch ended without starting it (Ctrl-C): nothing will, so it may go
        out = gaussreg("rm", "--store", st.root, queued.id, "--yes")
        assert out.exit_code == 0 and not queued.path.exists(), out.stderr
    finally:
        os.close(lock)
        if launch:
            st.release_launch(launch)
    out = gaussreg("rm", "--store", st.root, "--experiment", "nope", "--yes")
    assert out.exit_code == 2 and "no runs of experiment 'nope'" in out.stderr
    out = gaussreg("rm", "--store", st.root, other, "--state", "failed")
    assert out.exit_code == 2 and "not both" in out.stderr
    assert gaussreg("rm", "--store", st.root).exit_code == 2
    out = gaussreg("rm", "--store", st.root, "--state", "cancelled", "--yes")
    assert out.exit_code == 0 and "nothing removed" in out.stdout


def test_a_removal_cut_short_leaves_only_hidden_trash_that_the_next_one_clears(tmp_path):
    st = Store(tmp_path / "runs")
    a, b = (written_run(st, status={"state": "failed"}, seed=s) for s in (1, 2))
    trash = st.root / ".trash-old.1.2"  # what a removal killed between its rename and its delete leaves
    (trash / "sub").mkdir(parents=True)
    (trash / "sub" / "best.pt").write_text("x")
    assert sorted(r.id for r in st.runs()) == sorted([a.id, b.id])  # the trash is no run
    st.remove(a)
    assert not trash.exists() and not a.path.exists() and [r.id for r in st.runs()] == [b.id]
    with pytest.raises(RunFileError, match="is not a run directory of store"):
        st.remove(type(a)(tmp_path / "elsewhere"))


def test_the_launch_line_is_key_value_facts():
    from pathlib import Path

    from gaussreg.cli import launch_line
    from gaussreg.launch.scheduler import Slot
    line = launch_line(3, Path("m.toml"), Path("runs"), [Slot(0, None, 2), Slot(1, None, 2)], "auto")
    head, *facts = line.split("; ")
    assert head == "3 runs from m.toml into runs/"
    assert dict(f.split(": ", 1) for f in facts) == {
        "slots": "cpu, cpu", "threads per run": "2",
        "GPUs visible": "none (so --gpus auto trains on the CPU, and --backend slurm on a cluster's GPUs)"}
    line = launch_line(1, Path("m.toml"), Path("runs"), [Slot(0, "0", 4), Slot(1, "1", 4)], "all")
    assert line == "1 run from m.toml into runs/; slots: gpu 0, gpu 1; threads per run: 4"


def test_text_into_a_pipe_is_not_wrapped_mid_phrase(tmp_path):
    """A pipe or log has no width: a sentence stays one line there (Rich's 80 columns broke
    "no GPU ⏎ visible"), and `data list` prints the data root and each folder whole."""
    import io

    from gaussreg.views.style import CleanConsole
    out = CleanConsole(file=io.StringIO(), width=40)
    sentence = "3 runs from m.toml into runs/; slots: cpu; threads per run: 2; GPUs visible: none"
    out.print(sentence, markup=False)
    assert out.file.getvalue() == sentence + "\n"
    from test_data import make_mnist
    deep = tmp_path / ("a-rather-long-folder-name-" * 3) / "data"
    make_mnist(deep, n_train=40, n_test=10)
    listed = in_process("data", "list", "--data-dir", deep)  # 80 columns, as in a pipe
    assert listed.exit_code == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert f"datasets (data root: {deep})" in lines
    assert any(line.startswith("│ mnist") and str(deep) in line for line in lines), listed.stdout


def test_data_download_of_a_dataset_already_there_says_so_once(tmp_path):
    from test_data import make_mnist
    make_mnist(tmp_path, n_train=40, n_test=10)
    out = in_process("data", "download", "mnist", "--data-dir", tmp_path)
    assert out.exit_code == 0, out.stderr
    assert out.stdout.count("available") == 1 and "mnist is already available in " in out.stdout


def test_a_resumed_runs_time_counts_its_epochs_before_the_resume(tmp_path):
    """started_at is the resume's; time_before_s (the worker's record of the epochs before it)
    is added wherever a run's time shows: ls, show, the TUI's runs table and detail."""
    import io

    from rich.console import Console

    from tui.screens.detail import RunDetailScreen
    from tui.watcher import Detail
    st = Store(tmp_path / "runs")
    status = {"state": "completed", "started_at": "2026-01-01T10:00:00.000+00:00",
              "finished_at": "2026-01-01T10:01:00.000+00:00", "time_before_s": 120.0}
    run = written_run(st, status=status, result={"test_accuracy": 0.9, "robustness": 0.5}, experiment="t")
    out = gaussreg("ls", "--store", st.root)
    assert out.exit_code == 0 and "3m00s" in out.stdout, out.stdout
    assert "180.0s in all" in gaussreg("show", run.id, "--store", st.root).stdout
    shown = Console(file=io.StringIO(), width=120, color_system=None)
    shown.print(RunDetailScreen._status(Detail(run.id, [], status, None, None, None, "")))
    assert "0/? done; 3m00s in all" in shown.file.getvalue()
    del status["time_before_s"]  # a run never resumed (or from an older worker): its one attempt
    run.write_status(status)
    assert "1m00s" in gaussreg("ls", "--store", st.root).stdout


def test_a_queued_run_no_launch_will_start_says_so_in_ls_and_the_tui(tmp_path):
    from tui.widgets import cells
    st = Store(tmp_path / "runs")
    run = queued_run(st, experiment="q")
    slurm = written_run(st, status={"state": "queued", "backend": "slurm", "slurm_job": "7_0"}, experiment="q", seed=3)
    out = gaussreg("ls", "--store", st.root)
    assert "queued (not launched)" in out.stdout
    assert "1 queued run not launched: the launch that queued it" in out.stdout
    rows = {r["id"]: r["row"] for r in reader.list_runs(st)}
    assert rows[run.id].not_launched and not rows[slurm.id].not_launched  # Slurm starts its own
    assert cells(rows[run.id])["state"].plain == "queued (not launched)"
    held = st.hold_launch()  # a launch runs: it will start the run
    try:
        assert not any(r["row"].not_launched for r in reader.list_runs(st))
        assert "not launched" not in gaussreg("ls", "--store", st.root).stdout
    finally:
        st.release_launch(held)
    assert {r["id"]: r["row"].not_launched for r in reader.list_runs(st)} == {run.id: True, slurm.id: False}


@pytest.mark.process
def test_a_launch_killed_with_sigkill_leaves_its_queued_runs_not_launched(tmp_path):
    """kill -9 runs no cleanup: the launch's file stays, but its lock dies with it; the next
    launch of the store clears such files."""
    from gaussreg.runs.store import launch_alive
    st = Store(tmp_path / "runs")
    run = queued_run(st, experiment="k")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom gaussreg.runs.store import Store\n"
                               f"Store({str(st.root)!r}).hold_launch()\nprint('held', flush=True)\ntime.sleep(600)"],
                              stdout=subprocess.PIPE, text=True, env=python_env())
    try:
        assert holder.stdout.readline() == "held\n"
        assert launch_alive(st.root) and not reader.list_runs(st)[0]["row"].not_launched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    wait_for(lambda: not launch_alive(st.root), 10, "the killed launch to read as ended")
    assert [r["row"].not_launched for r in reader.list_runs(st)] == [True] and run.path.is_dir()
    left = list((st.root / "_launches").glob("*.live"))
    assert len(left) == 1
    st.release_launch(st.hold_launch())
    assert not list((st.root / "_launches").glob("*.live"))
