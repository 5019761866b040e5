"""Issue 30 (hardening, round 3): readers that must not hang, swallow memory or crash on
their output, and output that must not carry the store's control sequences to a terminal.
CLI commands that could hang run as subprocesses with a timeout, so a regression fails
instead of stopping the suite."""

import os
import subprocess
from pathlib import Path

import pytest
from conftest import cli, python_env
from test_tui import add_run

from gaussreg.runs import manifest
from gaussreg.runs.store import Store

ROOT = Path(__file__).resolve().parents[1]


def gaussreg(*args, cwd=None, timeout=60, **kw):
    return subprocess.run(cli(*args), cwd=cwd or ROOT, env=python_env(), capture_output=True, text=True,
                          timeout=timeout, **kw)


# ---------------------------------------------------------------- 7: FIFOs in place of files

def test_fifo_manifest_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "experiments.toml"
    os.mkfifo(fifo)
    with pytest.raises(manifest.ManifestError, match="is a FIFO, not a regular file"):
        manifest.load(fifo)  # the TUI's launch dialog reads it so too
    r = gaussreg("run", fifo, "--dry-run", "--store", tmp_path / "runs")
    assert r.returncode == 2 and "is not a file" in r.stderr, r.stderr


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
