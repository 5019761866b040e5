"""Issue 30 (hardening, round 3): readers that must not hang, swallow memory or crash on
their output, and output that must not carry the store's control sequences to a terminal.
CLI commands that could hang run as subprocesses with a timeout, so a regression fails
instead of stopping the suite."""

import os
import subprocess
from pathlib import Path

import pytest
from conftest import cli, python_env
from factories import dashboard_run as add_run

from gaussreg.runs import manifest
from gaussreg.runs.store import Store

ROOT = Path(__file__).resolve().parents[1]


def gaussreg(*args, cwd=None, timeout=60, env_extra=None, **kw):
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw}
    return subprocess.run(cli(*args), cwd=cwd or ROOT, env=python_env(**(env_extra or {})), text=True,
                          timeout=timeout, **kw)


# ---------------------------------------------------------------- 7: FIFOs in place of files

@pytest.mark.process
def test_fifo_manifest_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "experiments.toml"
    os.mkfifo(fifo)
    with pytest.raises(manifest.ManifestError, match="is a FIFO, not a regular file"):
        manifest.load(fifo)  # the TUI's launch dialog reads it so too
    r = gaussreg("run", fifo, "--dry-run", "--store", tmp_path / "runs")
    assert r.returncode == 2 and "is not a file" in r.stderr, r.stderr


@pytest.mark.process
def test_fifo_or_device_export_file_is_refused(tmp_path):
    fifo = tmp_path / "runs.jsonl"
    os.mkfifo(fifo)
    for source, kind in ((fifo, "a FIFO"), ("/dev/zero", "a device")):
        r = gaussreg("table", "--from", source)
        assert r.returncode == 2 and f"is {kind}, not a regular file" in r.stderr, r.stderr


def test_fifo_launch_record_and_lock_files(tmp_path):
    """Store files outside the runs: a detached launch's record (the TUI lists launches) and
    a GPU place's lock are refused, not opened blocking."""
    from gaussreg.launch.control import launches
    from gaussreg.runs.store import RunFileError
    st = Store(tmp_path / "runs")
    (st.root / "_launches").mkdir(parents=True)
    os.mkfifo(st.root / "_launches" / "123.pid")
    assert launches(st) == []
    (st.root / "_gpus").mkdir()
    os.mkfifo(st.root / "_gpus" / "0.0.lock")
    with pytest.raises(RunFileError, match="is a FIFO, not a regular file"):
        st.lock_gpu_share("0", 1)


# ---------------------------------------------------------------- 8: files too large to read whole

def huge(path: Path, size: int = 3 << 30) -> Path:
    """A file of `size` bytes that takes no disk (a hole)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.mark.process
def test_huge_run_files_make_their_run_corrupt_and_the_rest_readable(tmp_path):
    from gaussreg.runs.reader import list_runs
    st = Store(tmp_path / "runs")
    st.write_experiment("fx", {"tolerance": 0.01})
    good = add_run(st, "baseline", 0.9, 0.5)
    bad = add_run(st, "regularizer", 0.92, 0.7, seed=1, sigma=0.5, alpha=1.0)
    huge(bad.file("result.json"))
    huge(good.file("certify-0.5.json"))
    rows = {r["id"]: r for r in list_runs(st)}
    assert rows[good.id]["state"] == "completed"
    assert rows[bad.id]["state"] == "corrupt"
    assert "result.json is too large (3072 MB; at most 4 MB is read)" in rows[bad.id]["error"]
    r = gaussreg("ls", "--store", st.root, "--format", "json")
    assert r.returncode == 0 and "is too large" in r.stdout
    r = gaussreg("table", "--store", st.root, "--format", "csv")
    assert r.returncode == 0 and "0.9" in r.stdout, r.stderr  # the certificate is left out, the table stands


@pytest.mark.process
def test_huge_manifest_and_export_file_are_refused(tmp_path):
    with pytest.raises(manifest.ManifestError, match="is too large"):
        manifest.load(huge(tmp_path / "experiments.toml"))
    r = gaussreg("table", "--from", huge(tmp_path / "runs.jsonl"))
    assert r.returncode == 2 and "is too large (3072 MB; at most 1024 MB is read)" in r.stderr, r.stderr
    one_line = tmp_path / "line.jsonl"  # small enough as a file, but one line without an end
    with open(one_line, "wb") as f:
        f.write(b"{" * (65 << 20))
    r = gaussreg("table", "--from", one_line)
    assert r.returncode == 2 and "line.jsonl:1: the line is too large" in r.stderr, r.stderr


# ---------------------------------------------------------------- 9: a large events.jsonl

def _big_events(run, mb: int) -> int:
    """events.jsonl grown to `mb` MB of progress events between epochs 1..3, as a long
    training writes it; returns its size."""
    import json
    progress = "".join(json.dumps({"type": "progress", "epoch": 2, "batch": b, "batches": 10 ** 6, "loss": 0.5})
                       + "\n" for b in range(10_000))
    head = run.file("events.jsonl").read_text().splitlines(keepends=True)
    with open(run.file("events.jsonl"), "w") as f:
        f.write(head[0])
        while f.tell() < mb << 20:
            f.write(progress)
        f.writelines(head[1:])
    return run.file("events.jsonl").stat().st_size


def _peak(fn):
    import tracemalloc
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_large_events_file_is_read_in_flat_memory(tmp_path, monkeypatch):
    from gaussreg.runs import store as store_module
    from gaussreg.runs.reader import RunReader
    from gaussreg.views.export import export_lines
    st = Store(tmp_path / "runs")
    st.write_experiment("fx", {"tolerance": 0.01})
    run = add_run(st, "baseline", state="interrupted", epochs=3)
    # pieces of 16 kB instead of 1 MB, so that a file of 2 MB (quick to parse under tracemalloc)
    # is ~130 pieces: read whole, it would need far more than a few of them
    monkeypatch.setattr(store_module, "EVENT_CHUNK", 16 << 10)
    monkeypatch.setattr(store_module, "MAX_EVENT_LINE", 16 << 10)
    size = _big_events(run, 2)
    assert size > 2 << 20
    flat = 256 << 10  # a few pieces, whatever the file's size

    last, peak = _peak(run.last_epoch)  # what `gaussreg show` prints
    assert last["epoch"] == 3 and peak < flat, peak
    epochs, peak = _peak(run.epochs)
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and peak < flat, peak
    row, peak = _peak(lambda: RunReader(run).update())  # `ls`, `table` and the TUI's row
    assert row.state == "interrupted" and row.epoch == 3 and peak < flat, peak
    lines, peak = _peak(lambda: list(export_lines(st, "epochs", "jsonl")))
    assert len(lines) == 3 and peak < flat, peak
    (events, restarted), peak = _peak(run.tail().read)  # the live view and the TUI's detail screen
    assert [e["type"] for e in events] == ["epoch", "progress", "epoch", "epoch"] and peak < flat, peak


# ---------------------------------------------------------------- 14: standard output on a full disk

@pytest.mark.process
@pytest.mark.parametrize("args", [["ls"], ["ls", "--format", "json"], ["table"], ["table", "--format", "csv"],
                                  ["export"], ["export", "--what", "epochs", "--format", "jsonl"], ["show", "fx-"]])
def test_full_disk_on_stdout_is_one_sentence(tmp_path, args):
    st = Store(tmp_path / "runs")
    st.write_experiment("fx", {"tolerance": 0.01})
    add_run(st, "baseline", 0.9, 0.5)
    with open("/dev/full", "w") as full:
        r = gaussreg(*args, "--store", st.root, stdout=full)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: cannot write the output: No space left on device", r.stderr


# ---------------------------------------------------------------- 18: control sequences from the store

@pytest.mark.process
def test_store_text_reaches_no_terminal_with_its_control_sequences(tmp_path):
    import json

    from gaussreg.runs.store import atomic_write_json
    st = Store(tmp_path / "runs")
    st.write_experiment("fx", {"tolerance": 0.01})
    good = add_run(st, "baseline", 0.9, 0.5)
    spec = json.loads(good.file("spec.json").read_text())
    atomic_write_json(good.file("spec.json"), {**spec, "model": "mlp\x1b[2J"})  # clears the screen
    bad = add_run(st, "regularizer", 0.92, 0.7, seed=1, sigma=0.5, alpha=1.0)
    status = json.loads(bad.file("status.json").read_text())
    atomic_write_json(bad.file("status.json"), {**status, "state": "failed", "error": "boom \x1b]0;owned\x07 end"})
    os.rename(bad.path, st.root / "fx-\x1b[5mblink-0a1b2c3d4e")  # a run id that makes the terminal blink
    evil = ("\x1b[2J", "\x1b]0;", "\x1b[5m")
    for args in (["ls"], ["table"], ["table", "--format", "markdown"], ["table", "--format", "csv"],
                 ["export"], ["show", "fx-"], ["show", "fx-baseline"]):
        r = gaussreg(*args, "--store", st.root, env_extra={"FORCE_COLOR": "1"})  # styles on, as in a terminal
        out = r.stdout + r.stderr
        assert not [e for e in evil if e in out], (args, out)
        assert "\x1b[" in out or args[-1] in ("csv", "markdown") or args[0] == "export", (args, "no colour at all?")
    r = gaussreg("ls", "--store", st.root)
    assert "fx-blink-0a1b2c3d4e" in r.stdout and "mlp" in r.stdout  # what is left is still shown


# ---------------------------------------------------------------- 19: data errors are the dataset's

def _data_problems(dataset, tmp_path):
    from gaussreg.runs.check import check
    return check({"dataset": dataset, "model": "mlp", "depths": [], "python_path": [str(tmp_path)]})


def _npz(path, n_train=20, **extra):
    import numpy as np
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.random((n_train, 1, 4, 4), dtype=np.float32), y_train=np.arange(n_train) % 2,
             x_test=rng.random((4, 1, 4, 4), dtype=np.float32), y_test=np.arange(4) % 2, **extra)
    return path


def test_bad_npz_files_are_the_datasets_fault_at_dry_run(tmp_path):
    import zipfile

    import numpy as np
    good = _npz(tmp_path / "good.npz")
    assert _data_problems(f"npz:{good}", tmp_path) == []
    whole = good.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "bogus.npz").write_bytes(b"not a zip archive at all\n" * 10)
    np.save(tmp_path / "one.npy", np.zeros(3))
    with zipfile.ZipFile(tmp_path / "giant.npz", "w") as z:  # declares 2**22 x 2**22 x 4 float32, holds nothing
        with z.open("x_train.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                     "shape": (1 << 22, 1 << 22, 4)})
    expect = {"truncated.npz": "is not a readable .npz file", "empty.npz": "is not a readable .npz file",
              "bogus.npz": "is not a readable .npz file", "one.npy": "is a .npy file (one array)",
              "giant.npz": "x_train.npy declares an array of shape (4194304, 4194304, 4)"}
    for name, words in expect.items():
        problems = _data_problems(f"npz:{tmp_path / name}", tmp_path)
        assert len(problems) == 1 and problems[0][0] == "dataset" and words in problems[0][1], (name, problems)


def test_loader_with_nan_std_and_too_few_images_are_refused(tmp_path):
    (tmp_path / "myloader.py").write_text(
        "import numpy as np\n"
        "def load(n=20, std=0.5):\n"
        "    r = np.random.default_rng(0)\n"
        "    return {'x_train': r.random((n, 1, 4, 4), dtype=np.float32), 'y_train': np.arange(n) % 2,\n"
        "            'x_test': r.random((4, 1, 4, 4), dtype=np.float32), 'y_test': np.arange(4) % 2,\n"
        "            'mean': [0.5], 'std': [std]}\n")
    from gaussreg.data import loading
    assert _data_problems("myloader:load", tmp_path) == []
    with pytest.raises(loading.DataError, match=r"one finite value per channel.*std \[nan\]"):
        loading.load_custom("myloader:load", {"std": float("nan")}, [str(tmp_path)])
    with pytest.raises(loading.DataError, match="needs at least 6 training images"):
        loading.load_custom("myloader:load", {"n": 2}, [str(tmp_path)])
    (problem,) = _data_problems(f"npz:{_npz(tmp_path / 'two.npz', n_train=2)}", tmp_path)
    assert problem[0] == "dataset" and "needs at least 6 training images (a tenth of them" in problem[1]
    assert _data_problems(f"npz:{_npz(tmp_path / 'six.npz', n_train=6)}", tmp_path) == []


# ---------------------------------------------------------------- 20: user code writing to file descriptor 1

@pytest.mark.process
def test_factory_writing_to_fd_1_passes_the_dry_run_check(tmp_path):
    (tmp_path / "noisy.py").write_text(
        "import os\n"
        "from gaussreg.science.models import mlp\n"
        "def make(info):\n"
        "    os.write(1, b'[not json from a C library\\n')\n"
        "    os.system('echo from a child process')\n"
        "    print('and a print')\n"
        "    return mlp(info)\n")
    (tmp_path / "experiments.toml").write_text(
        'python_path = ["."]\n[defaults]\ndataset = "synthetic"\nmodel = "noisy:make"\npreset = "lenet"\nmax_epochs = 1\n'
        '[[experiment]]\nname = "e"\nmethods.baseline = {}\n')
    assert manifest.check_code(manifest.load(tmp_path / "experiments.toml")) == []
    (tmp_path / "noisy.py").write_text(  # and a real fault is still found, under the model key
        "import os\n"
        "def make(info):\n"
        "    os.write(1, b'noise\\n')\n"
        "    raise RuntimeError('no such layer')\n")
    (err,) = manifest.check_code(manifest.load(tmp_path / "experiments.toml"))
    assert "model" in str(err) and "RuntimeError: no such layer" in str(err), str(err)


def test_tui_cells_and_detail_values_carry_no_control_sequences():
    from rich.console import Console
    from rich.text import Text

    from gaussreg.runs.reader import RunRow
    from tui.screens.detail import _Pairs
    from tui.widgets import cells
    row = RunRow("fx-baseline-0a1b2c3d4e", experiment="fx\x1b]0;owned\x07", model="mlp\x1b[2J", params="a=1\x1b[5m")
    shown = " ".join(str(v) for v in cells(row).values())
    assert "\x1b" not in shown and "mlp" in shown and "a=1" in shown
    out = Console(file=__import__("io").StringIO(), width=80, color_system=None)
    out.print(_Pairs([("error", Text("boom \x1b[2J", style="red")), ("model", "mlp\x1b]0;x\x07")]))
    assert "\x1b" not in out.file.getvalue() and "boom" in out.file.getvalue()


def test_a_grid_or_store_above_the_yes_threshold_is_listed_as_plain_lines(tmp_path, monkeypatch):
    """Rich took most of a minute to lay out a 100,000-run table: above BIG_GRID runs, --dry-run
    and ls print one tab-separated line per run (and dry-run says launching needs --yes)."""
    from conftest import gaussreg
    from factories import queued_run

    from gaussreg import cli as gaussreg_cli
    monkeypatch.setattr(gaussreg_cli, "BIG_GRID", 3)
    m = tmp_path / "m.toml"
    m.write_text('[[experiment]]\nname = "g"\ndataset = "synthetic"\nmodel = "mlp"\n'
                 'methods.regularizer = { sigma = [0.1, 0.2], alpha = [1.0, 2.0] }\n')
    out = gaussreg("run", m, "--store", tmp_path / "runs", "--dry-run")
    assert out.exit_code == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("4 runs from") and "more than 3: one line each" in lines[0]
    assert lines[1].split("\t") == ["run id", "dataset", "model", "method", "params", "state"]
    body = [ln.split("\t") for ln in lines[2:6]]
    assert [b[3] for b in body] == ["regularizer"] * 4 and {b[5] for b in body} == {"new"}
    assert "4 runs is more than 3: launching them needs --yes" in out.stdout
    st = Store(tmp_path / "store")
    ids = sorted(queued_run(st, seed=s).id for s in range(4))
    out = gaussreg("ls", "--store", st.root)
    assert out.exit_code == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "4 runs in" in lines[0] and lines[1].split("\t")[:4] == ["run id", "data/model", "params", "state"]
    assert sorted(ln.split("\t")[0] for ln in lines[2:]) == ids and all(ln.split("\t")[3] == "queued" for ln in lines[2:])
