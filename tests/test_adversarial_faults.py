"""Faults around the scheduler: one run's problem never kills the parent (that run fails,
the sweep goes on); a closed pipe stops the output, not the sweep; SIGHUP is handled like
Ctrl-C; a parent killed outright takes its workers down with it, leaving resumable runs."""

import errno
import signal
import subprocess
import sys

import psutil
import pytest
import torch
from conftest import cli, python_env, wait_for
from factories import queued_run, queued_runs
from fake_worker import ARGV as FAKE
from fake_worker import CRASH

from gaussreg.launch.scheduler import Scheduler, make_slots
from gaussreg.runs.store import RunDir, Store

pytestmark = pytest.mark.process  # every test here starts a scheduler's workers, a gaussreg process or both


def _three_runs(tmp_path, middle_seed=2):
    return queued_runs(tmp_path / "runs", (1, middle_seed, 3), "f")


def _corrupt_status(run, monkeypatch):
    run.file("status.json").write_bytes(b'{"state": "queued", "error": "\xff"}')


def _lock_is_directory(run, monkeypatch):
    run.file("lock").mkdir()


def _spec_vanishes(run, monkeypatch):
    run.file("spec.json").unlink()
    run.file("spec.json").symlink_to("/nonexistent")


def _disk_full_when_reaping(run, monkeypatch):
    write = RunDir.write_status

    def full(self, status):
        if self.id == run.id and status.get("state") in ("failed", "cancelled"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, status)
    monkeypatch.setattr(RunDir, "write_status", full)


# name -> (fault applied to the middle run, its seed (CRASH makes the fake worker crash), its outcome)
FAULTS = {
    "corrupt-status-of-a-queued-run": (_corrupt_status, 2, "failed"),
    "lock-is-a-directory": (_lock_is_directory, 2, "failed"),
    "spec-is-a-dangling-link": (_spec_vanishes, 2, "failed"),
    "disk-full-writing-a-crashed-run's-status": (_disk_full_when_reaping, CRASH, "failed"),
}


@pytest.mark.parametrize("name", FAULTS)
def test_the_parent_survives_one_runs_fault(tmp_path, monkeypatch, name):
    fault, seed, outcome = FAULTS[name]
    st, ids = _three_runs(tmp_path, seed)
    fault(RunDir(st.root / ids[1]), monkeypatch)
    summary = Scheduler(st, ids, make_slots([], max_parallel=1), worker_argv=FAKE, poll_s=0.05).run()
    assert summary.outcomes[ids[0]].state == "completed" and summary.outcomes[ids[2]].state == "completed"
    assert summary.outcomes[ids[1]].state == outcome and summary.outcomes[ids[1]].error
    assert summary.exit_code() == 1


def test_a_view_that_cannot_write_never_stops_the_sweep(tmp_path):
    st, ids = _three_runs(tmp_path)

    def closed_pipe(sched, what, run):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")
    sched = Scheduler(st, ids, make_slots([]), worker_argv=FAKE, on_change=closed_pipe, poll_s=0.05)
    summary = sched.run()
    assert summary.count("completed") == 3 and "BrokenPipeError" in sched.view_error


TINY = """
[[experiment]]
name = "f"
dataset = "synthetic"
model = "{model}"
max_epochs = {epochs}
batch_size = 100
train_subset = {subset}
test_subset = 100
robustness = {{ sigmas = [0.0, 0.3] }}
methods.baseline = {{}}
{more}
"""


def test_gaussreg_run_into_a_closed_pipe_finishes_the_sweep(tmp_path):
    (tmp_path / "m.toml").write_text(TINY.format(model="mlp", epochs=1, subset=200,
                                                 more="methods.regularizer = { sigma = 0.1, alpha = 1.0 }"))
    p = subprocess.Popen(cli("run", tmp_path / "m.toml", "--store", tmp_path / "runs"), env=python_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # `gaussreg run | head -0`
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert sorted(r.status()["state"] for r in Store(tmp_path / "runs").runs()) == ["completed", "completed"]


def _start_long_run(tmp_path):
    # early_stop past max_epochs: a plateau on synthetic data must not end the run before the signal
    (tmp_path / "m.toml").write_text(TINY.format(model="mlp", epochs=1000, subset="1000", more="early_stop = 2000"))
    p = subprocess.Popen(cli("run", tmp_path / "m.toml", "--store", tmp_path / "runs"), env=python_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    st = Store(tmp_path / "runs")

    def training():  # its first progress or epoch event
        runs = list(st.runs())
        assert p.poll() is None, p.stderr.read()
        return runs[0] if runs and any(e["type"] in ("progress", "epoch") for e in runs[0].events()[0]) else None
    return p, wait_for(training, 120, "the worker to start training", every=0.1)


def _gone(pid, timeout=60):
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        pass
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_sighup_is_handled_like_ctrl_c(tmp_path):
    p, run = _start_long_run(tmp_path)
    worker = run.status()["pid"]
    p.send_signal(signal.SIGHUP)
    _, err = p.communicate(timeout=90)
    assert p.returncode == 130, err.decode()
    assert _gone(worker)
    assert run.status()["state"] == "cancelled" and "model" in torch.load(run.file("last.pt"), weights_only=True)


def test_workers_stop_when_their_scheduler_is_killed(tmp_path):
    p, run = _start_long_run(tmp_path)
    worker = run.status()["pid"]
    p.kill()  # SIGKILL: no handler runs in the parent
    p.wait(timeout=30)
    assert _gone(worker), "the worker trains on for a dead scheduler"
    status = run.status()
    assert status["state"] == "cancelled" and "scheduler" in status["error"] and "died" in status["error"]
    assert "model" in torch.load(run.file("last.pt"), weights_only=True)  # resumable: `gaussreg run` again


def test_cancel_is_honoured_during_the_final_evaluation(tmp_path):
    from gaussreg.launch.control import cancel_run, start_worker
    st = Store(tmp_path / "runs")
    run = queued_run(st, model="lenet", experiment="f", max_epochs=1, train_subset=200, test_subset=1000,
                     robustness={"samples": 1000})  # minutes of evaluation on 2 cores
    proc = start_worker(run, resume=False, threads=1)
    try:
        def evaluating():
            assert proc.poll() is None, run.log_tail()
            return run.status().get("phase") == "evaluating"
        wait_for(evaluating, 120, "the evaluation phase", every=0.1)
        cancel_run(run)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert run.status()["state"] == "cancelled" and not run.file("result.json").exists()


def test_cancel_launch_never_signals_a_reused_pid(tmp_path):
    from gaussreg.launch.control import ControlError, cancel_launch, launches
    from gaussreg.runs.store import atomic_write_json
    st = Store(tmp_path / "runs")
    (st.root / "_launches").mkdir(parents=True)
    stranger = subprocess.Popen(["sleep", "60"])  # a process that took over a finished launch's pid
    try:
        record = st.root / "_launches" / f"{stranger.pid}.pid"
        atomic_write_json(record, {"pid": stranger.pid, "label": "old", "log": "x", "started_at": "2026-01-01",
                                   "argv": [], "create_time": psutil.Process(stranger.pid).create_time() - 3600})
        assert launches(st) == [] and not record.exists()  # not ours: forgotten, never listed
        with pytest.raises(ControlError):
            cancel_launch(st, stranger.pid)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_rerun_starts_over_from_a_corrupt_last_pt(tmp_path):
    st = Store(tmp_path / "runs")
    run = queued_run(st, experiment="f", max_epochs=1, train_subset=200, test_subset=100,
                     robustness={"sigmas": [0.0]})
    run.file("last.pt").write_bytes(b"\x80\x04 not a checkpoint")
    first = subprocess.run([sys.executable, "-m", "gaussreg.worker", str(run.path), "--resume"], env=python_env(),
                           capture_output=True)
    assert first.returncode == 1
    assert "--rerun" in run.status()["error"] and "cannot resume" in run.status()["error"]
    summary = Scheduler(st, [run.id], make_slots([]), rerun=True, poll_s=0.05).run()
    assert summary.outcomes[run.id].state == "completed", (summary.outcomes[run.id], run.log_tail())
