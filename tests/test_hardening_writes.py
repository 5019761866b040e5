"""Hardening, round 3 (issue 30): run directories that are symbolic links, `train` on a
folder that is no run, temp files of failed atomic writes, malformed certificates, a
full or read-only store under `certify`, integer flags past 64 bits, an empty --store."""

import errno
import json
import os

import pytest
from conftest import gaussreg as cli
from test_adversarial_input import one_sentence_exit_2

from gaussreg.launch.request import rerun_plan
from gaussreg.runs import reader
from gaussreg.runs.spec import resolve, run_id
from gaussreg.runs.store import RunDir, RunFileError, Store, atomic_write_json, try_lock


def _spec(seed=1):
    return resolve({"dataset": "synthetic", "model": "mlp", "method": "baseline", "seed": seed, "experiment": "h"})


def _files(path):
    return sorted(p.name for p in path.iterdir())


# ---------------------------------------------------------------- 1. run directories that are links

@pytest.fixture
def linked(tmp_path):
    """A store with one real run and one 'run' that is a symbolic link to a run outside it."""
    st = Store(tmp_path / "runs")
    real = st.create(_spec(1), run_id(_spec(1)))
    outside = Store(tmp_path / "outside").create(_spec(2), run_id(_spec(2)))
    atomic_write_json(outside.status_file, {"state": "running", "pid": os.getpid(), "host": "elsewhere"})
    link = RunDir(st.root / outside.id)
    link.path.symlink_to(outside.path, target_is_directory=True)
    return st, real, link, outside


def test_linked_run_directory_is_listed_corrupt(linked):
    st, real, link, outside = linked
    rows = {r["id"]: r for r in reader.list_runs(st)}
    assert rows[real.id]["state"] == "queued"
    assert rows[link.id]["state"] == "corrupt" and "symbolic link" in rows[link.id]["error"]
    shown = json.loads(cli("ls", "--store", st.root, "--format", "json").stdout)
    assert {r["id"]: r["state"] for r in shown} == {real.id: "queued", link.id: "corrupt"}
    one_sentence_exit_2(cli("show", link.id, "--store", st.root), "is a symbolic link")


def test_no_writer_follows_a_linked_run_directory(linked):
    st, real, link, outside = linked
    before = {p.name: p.read_bytes() for p in outside.path.iterdir()}
    one_sentence_exit_2(cli("certify", link.id, "--store", st.root), "is a symbolic link")
    one_sentence_exit_2(cli("cancel", link.id, "--store", st.root), "is a symbolic link")
    one_sentence_exit_2(cli("train", link.path), "is a symbolic link")
    for write in (lambda: try_lock(link), lambda: rerun_plan(link), lambda: link.write_status({"state": "queued"}),
                  lambda: link.forget_results(), lambda: st.create(_spec(2), link.id),
                  lambda: link.write_certification({"sigma": 0.5, "per_image": []})):
        with pytest.raises(RunFileError, match="symbolic link"):
            write()
    assert {p.name: p.read_bytes() for p in outside.path.iterdir()} == before  # the target is untouched
    assert link.events() == ([], 0) and link.log_tail() == ""


# ---------------------------------------------------------------- 2. train on a folder that is no run

def test_train_writes_nothing_into_a_folder_that_is_no_run(tmp_path, monkeypatch):
    from gaussreg.runs import worker
    st = Store(tmp_path / "runs")
    st.create(_spec(1), run_id(_spec(1)))
    empty = tmp_path / "empty"
    empty.mkdir()
    before = _files(st.root)
    for where in (empty, st.root):
        one_sentence_exit_2(cli("train", where), "is not a run directory")
        assert worker.main([str(where)]) == worker.EXIT_BAD_INPUT  # the worker itself refuses as well
    monkeypatch.chdir(empty)
    for where in (".", ""):
        one_sentence_exit_2(cli("train", where), "is not a run directory" if where else "is an empty path")
        assert worker.main([where]) == worker.EXIT_BAD_INPUT
    assert _files(empty) == [] and _files(st.root) == before


# ---------------------------------------------------------------- 3. temp files of failed atomic writes

def _enospc(*args, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_plot_on_a_full_disk_leaves_no_temp_file(tmp_path, monkeypatch):
    from factories import figure_run as add
    st = Store(tmp_path / "runs")
    add(st, "baseline", 0.90, 0.50)
    add(st, "augment", 0.90, 0.70, sigma=0.25, folds=1)
    out = tmp_path / "figures"
    monkeypatch.setattr(os, "replace", _enospc)
    one_sentence_exit_2(cli("plot", "--store", st.root, "--out", out), "No space left on device")
    assert _files(out) == []


@pytest.mark.parametrize("fails", ["fsync", "replace", "link", "fchmod"])
def test_store_writers_remove_their_temp_file_on_every_failure(tmp_path, monkeypatch, fails):
    from gaussreg.runs.store import atomic_create_json
    monkeypatch.setattr(os, fails, _enospc)
    for write in (atomic_write_json, atomic_create_json):
        try:
            write(tmp_path / "f.json", {"a": 1})
        except OSError as e:
            assert e.errno == errno.ENOSPC
    assert [p for p in _files(tmp_path) if p.endswith(".tmp")] == []


def test_a_failed_download_leaves_no_partial_file(tmp_path, monkeypatch):
    from gaussreg.data import download

    class Dropped:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self, *a):
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    monkeypatch.setattr(download.urllib.request, "urlopen", lambda *a, **k: Dropped())
    with pytest.raises(ConnectionResetError):
        download._fetch("http://example.invalid/x.gz", tmp_path / "x.gz", "0" * 32, lambda m: None)
    assert _files(tmp_path) == []


# ---------------------------------------------------------------- 13. malformed certificates

def test_a_malformed_certificate_is_skipped_with_a_warning(tmp_path):
    from factories import figure_run as add
    st = Store(tmp_path / "runs")
    base = RunDir(st.root / add(st, "baseline", 0.90, 0.50))
    aug = RunDir(st.root / add(st, "augment", 0.90, 0.70, sigma=0.25, folds=1))
    good = {"sigma": 0.25, "per_image": [{"correct": True, "radius": 0.3}, {"correct": False, "radius": 0.0}]}
    atomic_write_json(base.file("certify-0.25.json"), good)
    bad = {"certify-x.json": {"sigma": None, "per_image": []}, "certify-y.json": {"sigma": "0.5", "per_image": []},
           "certify-z.json": {"sigma": [1], "per_image": []}, "certify-w.json": {"sigma": 0.5, "per_image": [1, "a"]}}
    for name, cert in bad.items():
        atomic_write_json(base.file(name), cert)
        atomic_write_json(aug.file(name), cert)
    r = cli("table", "--store", st.root, "--format", "json")
    assert r.exit_code == 0, r.stderr
    by = {e["method"]: e for e in json.loads(r.stdout)["experiments"][0]["configurations"]}
    assert by["baseline"]["certified"]["sigmas"] == [0.25]  # the good one still counts
    assert by["baseline"]["certified"]["accuracy"]["0.25"] == 0.5 and by["augment"]["certified"] is None
    for name in bad:
        assert str(base.file(name)) in " ".join(r.stderr.split()) and str(aug.file(name)) in " ".join(r.stderr.split())
    r = cli("export", "--store", st.root, "--format", "jsonl")
    assert r.exit_code == 0 and r.stderr.count("warning:") == 8, r.stderr
    certified = {json.loads(line)["run_id"]: json.loads(line)["certified"] for line in r.stdout.splitlines()}
    assert certified[base.id]["sigmas"] == [0.25] and certified[aug.id] is None


@pytest.mark.parametrize("sigma", ["inf", "-inf", "nan", "0", "-1"])
def test_certify_refuses_a_sigma_that_is_not_finite_and_positive(tmp_path, sigma):
    st = Store(tmp_path / "runs")
    run = st.create(_spec(1), run_id(_spec(1)))
    one_sentence_exit_2(cli("certify", run.id, "--store", st.root, "--sigma", sigma), "--sigma must be > 0")
    assert not list(run.path.glob("certify-*"))


# ---------------------------------------------------------------- 15. certify on a full or read-only store

@pytest.fixture
def certifiable(tmp_path, monkeypatch):
    """A run with a best.pt and, in place of loading it, a small linear model on 4 test images."""
    import types

    import torch

    from gaussreg import cli as cli_module
    st = Store(tmp_path / "runs")
    run = st.create(_spec(1), run_id(_spec(1)))
    run.best_checkpoint.write_bytes(b"model")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    splits = types.SimpleNamespace(test_x=torch.rand(4, 1, 2, 2), test_y=torch.tensor([0, 1, 2, 0]))
    monkeypatch.setattr(cli_module, "_model_from_checkpoint", lambda *a: (model, splits, "fp32"))
    return st, run


def _certify(st, run):
    return cli("certify", run.id, "--store", st.root, "--sigma", "0.5", "--n", "20", "--n0", "5", "--images", "4")


def test_certify_works_with_the_small_model(certifiable):
    st, run = certifiable
    r = _certify(st, run)
    assert r.exit_code == 0, r.stderr
    assert json.loads(run.file("certify-0.5.json").read_text())["images"] == 4


@pytest.mark.parametrize("fault", [(os, "replace", errno.ENOSPC), (os, "fsync", errno.ENOSPC),
                                   ("tempfile", "mkstemp", errno.EROFS), ("access", None, errno.EROFS)])
def test_certify_on_a_full_or_read_only_store_is_one_sentence(certifiable, monkeypatch, fault):
    import tempfile
    st, run = certifiable
    before = _files(run.path)
    where, name, code = fault
    if where == "access":  # what os.access says on a read-only mount, even to root
        readable = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **k: readable(path, mode) and not mode & os.W_OK)
    else:
        def refuse(*a, **k):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(tempfile if where == "tempfile" else os, name, refuse)
    one_sentence_exit_2(_certify(st, run), "cannot write")
    assert _files(run.path) == before  # no certificate, no temp file


def test_cancel_of_a_slurm_run_on_a_read_only_store_is_one_sentence(tmp_path, monkeypatch):
    import tempfile
    st = Store(tmp_path / "runs")
    run = st.create(_spec(1), run_id(_spec(1)))
    atomic_write_json(run.status_file, {"state": "queued", "backend": "slurm", "slurm_job": "12_0"})
    before = {p.name: p.read_bytes() for p in run.path.iterdir()}

    def refuse(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr("gaussreg.launch.slurm.subprocess.run", lambda *a, **k: (_ for _ in ()).throw(
        FileNotFoundError(errno.ENOENT, "scancel")))
    one_sentence_exit_2(cli("cancel", run.id, "--store", st.root), "Read-only file system")
    assert {p.name: p.read_bytes() for p in run.path.iterdir()} == before


@pytest.mark.process
def test_train_on_a_full_disk_is_one_sentence(tmp_path, monkeypatch):
    st = Store(tmp_path / "runs")
    run = st.create(_spec(1), run_id(_spec(1)))
    monkeypatch.setattr(RunDir, "write_status", _enospc)
    one_sentence_exit_2(cli("train", run.path), "No space left on device")
    assert not [p for p in _files(run.path) if p.endswith(".tmp")]


# ---------------------------------------------------------------- 17. integer flags past 64 bits

HUGE = str(2**64 + 1)  # 18446744073709551617


def test_certify_seed_past_64_bits_is_one_sentence(certifiable):
    st, run = certifiable
    one_sentence_exit_2(cli("certify", run.id, "--store", st.root, "--seed", HUGE, "--n", "20", "--n0", "5"),
                        f"--seed must be from 0 to {2**63 - 1}, not {HUGE}")
    one_sentence_exit_2(cli("certify", run.id, "--store", st.root, "--seed", "-1"), "--seed must be from 0")
    assert not list(run.path.glob("certify-*"))


@pytest.mark.parametrize("args", [
    ["certify", "RUN", "--n", HUGE], ["certify", "RUN", "--n0", HUGE], ["certify", "RUN", "--images", HUGE],
    ["certify", "RUN", "--batch", HUGE], ["eval", "RUN", "--seed", HUGE], ["eval", "RUN", "--samples", HUGE],
    ["run", "M", "--per-gpu", HUGE], ["run", "M", "--max-parallel", HUGE], ["run", "M", "--backend", "slurm",
    "--gpus-per-run", HUGE], ["run", "M", "--backend", "slurm", "--cpus-per-run", HUGE],
    ["run", "M", "--backend", "slurm", "--array-parallelism", HUGE]])
def test_every_integer_flag_is_range_checked(tmp_path, args):
    st = Store(tmp_path / "runs")
    run = st.create(_spec(1), run_id(_spec(1)))
    (tmp_path / "m.toml").write_text('[[experiment]]\nname = "x"\ndataset = "synthetic"\nmodel = "mlp"\n'
                                     'methods.baseline = {}\n')
    args = [{"RUN": run.id, "M": tmp_path / "m.toml"}.get(a, a) for a in args]
    flag = next(a for a in args if str(a).startswith("--") and a != "--backend")
    bound = f"from 0 to {2**63 - 1}" if flag == "--seed" else f"at most {2**31 - 1}"
    one_sentence_exit_2(cli(*args, "--store", st.root), f"{flag} must be {bound}, not {HUGE}")
    assert _files(st.root) == [run.id] and _files(run.path) == ["spec.json", "status.json"]


# ---------------------------------------------------------------- 23. an empty --store

@pytest.mark.parametrize("args", [
    ["ls", "--store", ""], ["table", "--store", ""], ["export", "--store", ""], ["plot", "--store", ""],
    ["show", "x", "--store", ""], ["cancel", "x", "--store", ""], ["certify", "x", "--store", ""],
    ["eval", "x", "--store", ""], ["tui", "--store", ""], ["run", "M", "--store", ""],
    ["run", "M", "--store", "", "--dry-run"], ["run", "M", "--store", "", "--backend", "slurm"],
    ["run", "M", "--data-dir", ""], ["run", ""], ["table", "--from", ""], ["plot", "--out", ""], ["train", ""],
    ["tui", "--manifest", ""], ["data", "list", "--data-dir", ""]])
def test_an_empty_path_is_refused(tmp_path, monkeypatch, args):
    from gaussreg.launch.request import LaunchError, LaunchRequest, plan
    (tmp_path / "m.toml").write_text('[[experiment]]\nname = "x"\ndataset = "synthetic"\nmodel = "mlp"\n'
                                     'methods.baseline = {}\n')
    monkeypatch.chdir(tmp_path)
    args = ["m.toml" if a == "M" else a for a in args]
    i = args.index("")
    one_sentence_exit_2(cli(*args), f"{args[i - 1] if args[i - 1].startswith('--') else ''} is an empty path".strip())
    assert _files(tmp_path) == ["m.toml"]  # nothing made in the current folder
    with pytest.raises(LaunchError, match="empty path"):
        plan(LaunchRequest("m.toml", ""))
