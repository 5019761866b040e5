"""Run control, apart from the scheduling loop (gaussreg.launch.scheduler): starting one worker,
cancelling or rerunning a run, and the detached launches of a store (list, cancel, start).
The CLI, the TUI and the scheduler's loop all go through here."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import psutil

from gaussreg.launch.gpus import GpuPlaceError, take_gpu_place, wants_gpu
from gaussreg.runs.device import worker_environment
from gaussreg.runs.store import (LIVE, RunDir, RunFileError, Store, atomic_write_json, now_iso, pid_alive, read_json,
                                 try_lock)

GRACE_S = 30.0  # how long a SIGTERMed worker gets to stop (at its next batch) before SIGKILL


def start_worker(run: RunDir, resume: bool, gpu: Optional[str] = None, threads: Optional[int] = None,
                 lock_fd: Optional[int] = None, argv: Optional[List[str]] = None,
                 watch_parent: bool = False, hold_fds: tuple = ()) -> subprocess.Popen:
    """One worker process for a run, in its own session (so a terminal's Ctrl-C reaches
    only its parent), with its output appended to worker.log. A held lock is passed on.
    With watch_parent the worker stops (saving last.pt, as on SIGTERM) when this process
    dies: a scheduler that dies must not leave workers training for nobody. hold_fds: more
    locks the worker holds until it exits (its share of a GPU)."""
    # the worker sets these defaults itself too; here they are in place before torch even loads
    env = {**worker_environment(str(run.path.parent)), **os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("GAUSSREG_LOCK_FD", None)
    env.pop("GAUSSREG_PARENT_PID", None)
    if watch_parent:
        env["GAUSSREG_PARENT_PID"] = str(os.getpid())
    if lock_fd is not None:
        env["GAUSSREG_LOCK_FD"] = str(lock_fd)
    env.pop("GAUSSREG_GPU", None)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
        if gpu:  # a GPU slot: the worker must get CUDA or refuse (device.pick_device)
            env["GAUSSREG_GPU"] = gpu
            # GPU indices are nvidia-smi's, which counts by PCI bus; CUDA's default order
            # (fastest first) could make "1" another GPU (a user's own setting wins)
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if threads:
        env["GAUSSREG_THREADS"] = env["OMP_NUM_THREADS"] = str(threads)
    cmd = (argv or [sys.executable, "-m", "gaussreg.runs.worker"]) + [str(run.path)] + (["--resume"] if resume else [])
    fd = os.open(run.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                pass_fds=((lock_fd,) if lock_fd is not None else ()) + tuple(hold_fds),
                                start_new_session=True)


class ControlError(Exception):
    """A run or launch cannot be controlled as asked; the message says why."""


def cancel_run(run: RunDir, grace_s: float = GRACE_S) -> str:
    """Stop a running run's worker: SIGTERM (and SIGCONT, so a stopped worker hears it);
    it stops at its next batch and becomes cancelled. A worker that has not stopped after
    `grace_s` (stuck in its own model or loader code) is killed with SIGKILL, its last.pt
    kept and the run marked cancelled. Checks that the pid really is this run's worker on
    this host. Returns what was done, in one sentence."""
    try:
        status = run.status()
    except RunFileError as e:
        raise ControlError(str(e)) from None
    state, pid = run.state(status), status.get("pid")
    if state != "running":
        raise ControlError(f"run {run.id} is {state}, not running")
    if status.get("host") != socket.gethostname():
        raise ControlError(f"run {run.id} runs on host {status.get('host')}, not here")
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        proc = psutil.Process(pid)
    except (OSError, psutil.Error):
        cmd, proc = "", None
    if proc is None or not pid_alive(pid) or run.id not in cmd:
        raise ControlError(f"process {pid} of run {run.id} is not its worker any more")
    # a scheduler reaping the killed worker reads this: the run was cancelled, not failed
    atomic_write_json(run.cancel_request, {"requested_at": now_iso(), "by": "gaussreg cancel"})
    was_stopped = is_stopped(pid)
    _signal_all([proc], signal.SIGTERM)
    _signal_all([proc], signal.SIGCONT)
    first = f"sent SIGTERM to the worker of {run.id} (pid {pid}" + (", which was stopped: SIGCONT too)" if was_stopped
                                                                    else ")")
    if _await_exit(proc, grace_s):
        return f"{first}; it stopped"
    _kill_tree(proc)
    kept = "; its last.pt is kept (run it again to resume)" if run.last_checkpoint.exists() else ""
    why = (f"did not stop within {grace_s:g} s of `gaussreg cancel`'s SIGTERM (stuck in its own model or "
           f"loader code?), so it was killed with SIGKILL{kept}")
    try:
        now = run.status()  # the file, not state(): a killed worker's run reads as interrupted
        if now.get("state") in LIVE:  # nobody else (a scheduler reaping it) said how it ended
            run.write_status({**now, "state": "cancelled", "finished_at": now_iso(), "updated_at": now_iso(),
                              "error": f"the worker {why}"})
    except (OSError, RunFileError):
        pass  # the run reads as interrupted, which a rerun resumes just the same
    return f"{first}; it {why}"


def is_stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP, Ctrl-Z): it hears no SIGTERM until SIGCONT."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def _signal_all(procs, sig) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass  # gone already


def _gone(proc: psutil.Process) -> bool:
    """Exited, for a process that may be another's child (a zombie until its parent reaps it)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _await_exit(proc: psutil.Process, timeout: float) -> bool:
    """Whether the worker exited within `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(proc):
            return True
        time.sleep(0.1)
    return _gone(proc)


def _kill_tree(proc: psutil.Process, wait_s: float = 10.0) -> None:
    """SIGKILL a worker and whatever it started (a loader's subprocesses), then wait for them."""
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        procs = [proc]
    _signal_all(procs, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not all(_gone(p) for p in procs):
        time.sleep(0.05)


def restart(run: RunDir, gpu: Optional[str] = None) -> subprocess.Popen:
    """Train a run that is not running and not completed again, detached (the TUI's
    rerun key; retraining completed runs is `gaussreg run --rerun`): a diverged one from
    scratch (it would diverge again from its checkpoint), any other from its last.pt. Without `gpu`,
    on a GPU box it takes a free GPU place of its store (take_gpu_place) and that GPU."""
    fd = try_lock(run)
    if fd is None:
        raise ControlError(f"run {run.id} is being trained by another process")
    place = None
    try:
        state = run.state()
        if state == "completed":
            raise ControlError(f"run {run.id} is completed; use `gaussreg run --rerun` to train it again")
        if gpu is None and wants_gpu(run):
            try:
                place = take_gpu_place(Store(run.path.parent))
            except GpuPlaceError as e:
                raise ControlError(str(e)) from None
            if place is not None:
                gpu = place[0]
        if state == "diverged":
            run.forget_results()
        return start_worker(run, resume=run.last_checkpoint.exists(), gpu=gpu, lock_fd=fd,
                            hold_fds=(place[1],) if place else ())
    finally:
        os.close(fd)
        if place is not None:
            os.close(place[1])  # the worker holds its own copy until it exits


def _is_our_launch(info: dict) -> bool:
    """Whether the recorded pid is still that launch: a pid is reused once its process
    is gone, and signalling a stranger's process must never happen. The process must
    have the recorded start time and run `gaussreg run`."""
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created, cmd = proc.create_time(), proc.cmdline()
    except (psutil.Error, OSError):
        return False
    want = info.get("create_time")
    if not isinstance(want, (int, float)) or abs(created - want) > 0.05:
        return False
    return "gaussreg" in cmd and "run" in cmd


def launches(store: Store) -> List[dict]:
    """Detached `gaussreg run` processes of this store that are still alive; the records
    of launches that ended are removed."""
    out = []
    for p in sorted((store.root / "_launches").glob("*.pid")):
        try:
            info = read_json(p)
        except RunFileError:
            continue
        if isinstance(info, dict) and _is_our_launch(info):
            out.append(info)
        else:
            try:
                p.unlink()  # the launch ended (or the record is not ours to trust): forget it
            except OSError:
                pass
    return out


def cancel_launch(store: Store, pid: int) -> None:
    """Stop a detached launch: its scheduler cancels its running workers and exits."""
    if not any(info["pid"] == pid for info in launches(store)):
        raise ControlError(f"no running launch with pid {pid} in {store.root}")
    os.kill(pid, signal.SIGTERM)


def detach_plan(save, store: Store, label: str) -> dict:
    """Start `gaussreg run --plan FILE --follow` in its own session so it outlives its caller,
    after `save(FILE)` wrote the checked plan it carries out; recorded in STORE/_launches
    (the plan and the log beside the record) so it can be listed and cancelled."""
    logs = store.root / "_launches"
    logs.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-{int(time.time() * 1000) % 1000}"
    log, plan_file = logs / f"{stem}.log", logs / f"{stem}.plan.json"
    save(plan_file)
    with open(log, "ab") as f:
        p = subprocess.Popen([sys.executable, "-m", "gaussreg", "run", "--plan", str(plan_file), "--follow"],
                             stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                             env=dict(os.environ, COLUMNS="120"))
    info = {"pid": p.pid, "label": label, "log": str(log), "plan": str(plan_file), "started_at": now_iso(),
            "create_time": psutil.Process(p.pid).create_time()}
    atomic_write_json(logs / f"{p.pid}.pid", info)
    return info
