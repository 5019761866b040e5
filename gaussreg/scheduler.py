"""The local scheduler: one worker process per run, GPU slots handed out by the parent.

Each worker runs in its own process group with CUDA_VISIBLE_DEVICES set to its GPU;
the parent holds each run's OS lock while launching and passes it to the worker, so
two schedulers on one store never train the same run twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from .store import FINISHED, RunDir, RunFileError, Store, atomic_write_json, now_iso, try_lock

GRACE_S = 30.0  # how long a SIGTERMed worker gets to write last.pt before SIGKILL


@dataclass
class Slot:
    index: int
    gpu: Optional[str]  # CUDA_VISIBLE_DEVICES of the runs in this slot; None on CPU (workers get "")
    threads: Optional[int] = None


def detect_gpus() -> List[str]:
    """The GPUs this process may use: $CUDA_VISIBLE_DEVICES when set, else every GPU."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
            return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]
        except (OSError, subprocess.SubprocessError):
            pass
    return []


def parse_gpus(arg: str) -> List[str]:
    """'all' (every visible GPU, none on a CPU box), 'none', or a list like '0,1'."""
    arg = arg.strip()
    if arg == "all":
        return detect_gpus()
    if arg == "none":
        return []
    parts = [p.strip() for p in arg.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"--gpus must be 'all', 'none' or GPU indices like '0,1', not {arg!r}")
    return list(dict.fromkeys(parts))


def make_slots(gpus: List[str], per_gpu: int = 1, max_parallel: Optional[int] = None,
               cpus: Optional[int] = None) -> List[Slot]:
    """`per_gpu` slots on each GPU (capped by max_parallel); without GPUs, max_parallel
    CPU slots (default: one) sharing the cores evenly."""
    if per_gpu < 1:
        raise ValueError("--per-gpu must be >= 1")
    if max_parallel is not None and max_parallel < 1:
        raise ValueError("--max-parallel must be >= 1")
    cpus = cpus or os.cpu_count() or 1
    if gpus:
        slots = [Slot(i, g) for i, (g, _) in enumerate((g, k) for k in range(per_gpu) for g in gpus)]
        slots = slots[:max_parallel] if max_parallel else slots
        threads = max(1, cpus // len(slots))
    else:
        n = max_parallel or 1
        slots = [Slot(i, None) for i in range(n)]
        threads = max(1, cpus // n)
    for s in slots:
        s.threads = threads
    return slots


@dataclass
class Active:
    run: RunDir
    slot: Slot
    proc: subprocess.Popen
    started: float


@dataclass
class Outcome:
    run_id: str
    state: str
    returncode: Optional[int] = None
    error: Optional[str] = None
    log_tail: str = ""


@dataclass
class Summary:
    outcomes: Dict[str, Outcome] = field(default_factory=dict)
    interrupted: bool = False

    def count(self, *states) -> int:
        return sum(1 for o in self.outcomes.values() if o.state in states)

    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.count("failed", "diverged", "cancelled", "interrupted") else 0


@dataclass(frozen=True)
class ActiveRun:
    """A run being trained, as a view sees it."""
    run: RunDir
    gpu: Optional[str]  # None: a CPU slot
    started: float  # time.time() when its worker was started


@dataclass(frozen=True)
class Snapshot:
    """What the scheduler tells its view (the CLI live view) at each change: a copy, so the
    view never reads the scheduler's own attributes while it schedules."""
    active: Tuple[ActiveRun, ...]
    queued: int
    outcomes: Dict[str, Outcome]
    stopping: bool

    def count(self, *states) -> int:
        return sum(1 for o in self.outcomes.values() if o.state in states)


def start_worker(run: RunDir, resume: bool, gpu: Optional[str] = None, threads: Optional[int] = None,
                 lock_fd: Optional[int] = None, argv: Optional[List[str]] = None,
                 watch_parent: bool = False) -> subprocess.Popen:
    """One worker process for a run, in its own session (so a terminal's Ctrl-C reaches
    only its parent), with its output appended to worker.log. A held lock is passed on.
    With watch_parent the worker stops (saving last.pt, as on SIGTERM) when this process
    dies: a scheduler that dies must not leave workers training for nobody."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("GAUSSREG_LOCK_FD", None)
    env.pop("GAUSSREG_PARENT_PID", None)
    if watch_parent:
        env["GAUSSREG_PARENT_PID"] = str(os.getpid())
    if lock_fd is not None:
        env["GAUSSREG_LOCK_FD"] = str(lock_fd)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if threads:
        env["GAUSSREG_THREADS"] = env["OMP_NUM_THREADS"] = str(threads)
    cmd = (argv or [sys.executable, "-m", "gaussreg.worker"]) + [str(run.path)] + (["--resume"] if resume else [])
    fd = os.open(run.file("worker.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                pass_fds=(lock_fd,) if lock_fd is not None else (), start_new_session=True)


class ControlError(Exception):
    """A run or launch cannot be controlled as asked; the message says why."""


def cancel_run(run: RunDir) -> int:
    """SIGTERM a running run's worker (it saves last.pt and becomes cancelled). Checks
    that the pid really is this run's worker on this host. Returns the pid."""
    import socket
    from .store import RunFileError, pid_alive
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
    except OSError:
        cmd = ""
    if not pid_alive(pid) or run.id not in cmd:
        raise ControlError(f"process {pid} of run {run.id} is not its worker any more")
    os.kill(pid, signal.SIGTERM)
    return pid


def rerun(run: RunDir, gpu: Optional[str] = None) -> subprocess.Popen:
    """Train a run that is not running again, detached: a diverged one from scratch
    (it would diverge again from its checkpoint), any other from its last.pt."""
    fd = try_lock(run)
    if fd is None:
        raise ControlError(f"run {run.id} is being trained by another process")
    try:
        state = run.state()
        if state == "completed":
            raise ControlError(f"run {run.id} is completed; use `gaussreg run --rerun` to train it again")
        if state == "diverged":
            _reset(run)
        return start_worker(run, resume=run.file("last.pt").exists(), gpu=gpu, lock_fd=fd)
    finally:
        os.close(fd)


def _is_our_launch(info: dict) -> bool:
    """Whether the recorded pid is still that launch: a pid is reused once its process
    is gone, and signalling a stranger's process must never happen. The process must
    have the recorded start time and run `gaussreg run`."""
    import psutil
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
            info = json.loads(p.read_bytes().decode())
        except (OSError, ValueError):
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


def detach_run(argv_tail: List[str], store: Store, label: str) -> dict:
    """Start `gaussreg run ... --follow` in its own session so it outlives its caller;
    recorded in STORE/_launches so it can be listed and cancelled."""
    logs = store.root / "_launches"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / (time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-{int(time.time() * 1000) % 1000}.log")
    with open(log, "ab") as f:
        p = subprocess.Popen([sys.executable, "-m", "gaussreg", "run", *argv_tail, "--follow"], stdout=f,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                             env=dict(os.environ, COLUMNS="120"))
    import psutil
    info = {"pid": p.pid, "label": label, "log": str(log), "started_at": now_iso(), "argv": argv_tail,
            "create_time": psutil.Process(p.pid).create_time()}
    atomic_write_json(logs / f"{p.pid}.pid", info)
    return info


def _reset(run: RunDir) -> None:
    """Forget a finished run's results (keep its spec) so it trains afresh."""
    for name in ("result.json", "events.jsonl", "best.pt", "last.pt"):
        run.file(name).unlink(missing_ok=True)


class Scheduler:
    def __init__(self, store: Store, run_ids: List[str], slots: List[Slot], rerun: bool = False,
                 worker_argv: Optional[List[str]] = None, on_change: Optional[Callable] = None,
                 poll_s: float = 0.5, grace_s: float = GRACE_S):
        self.store, self.slots, self.rerun = store, slots, rerun
        self.queue = [RunDir(store.root / r) for r in run_ids]
        self.worker_argv = worker_argv  # None: python -m gaussreg.worker
        self.on_change = on_change or (lambda snapshot, what, run: None)  # (Snapshot, what, RunDir)
        self.poll_s, self.grace_s = poll_s, grace_s
        self.active: Dict[int, Active] = {}  # slot index -> active run
        self.summary = Summary()
        self.stopping = False
        self.view_error: Optional[str] = None  # the first error of the view (on_change); it never stops the sweep

    def stop(self, *_args) -> None:
        """First Ctrl-C (or SIGTERM): launch nothing more and cancel the running workers."""
        self.stopping = True

    def snapshot(self) -> Snapshot:
        return Snapshot(tuple(ActiveRun(a.run, a.slot.gpu, a.started) for a in self.active.values()),
                        len(self.queue), dict(self.summary.outcomes), self.stopping)

    def _notify(self, what: str, run: Optional[RunDir]) -> None:
        """The view is told what happened, with a snapshot of the scheduler; a view that
        cannot show it (a closed pipe, a corrupt file it reads) never stops the sweep."""
        try:
            self.on_change(self.snapshot(), what, run)
        except Exception as e:  # noqa: BLE001 - the sweep outlives its view
            if self.view_error is None:
                self.view_error = f"{type(e).__name__}: {e}"

    def _launch(self, run: RunDir, slot: Slot) -> bool:
        """Start one run; any problem of that run (a corrupt file, a lock that is a
        directory, a full disk) makes that run failed and the sweep goes on."""
        try:
            return self._launch_one(run, slot)
        except Exception as e:  # noqa: BLE001
            why = str(e) if isinstance(e, (RunFileError, ControlError)) else f"{type(e).__name__}: {e}"
            self.summary.outcomes[run.id] = Outcome(run.id, "failed", error=f"not started: {why}")
            self._notify("failed", run)
            return False

    def _launch_one(self, run: RunDir, slot: Slot) -> bool:
        fd = try_lock(run)
        if fd is None:
            self.summary.outcomes[run.id] = Outcome(run.id, "elsewhere", error="being trained by another process")
            self._notify("elsewhere", run)
            return False
        try:
            run.spec()  # a spec that cannot be read fails its run here, not in the worker
            state = run.state()
            if state in FINISHED and not self.rerun:
                self.summary.outcomes[run.id] = Outcome(run.id, state)
                self._notify("skipped", run)
                return False
            if self.rerun:  # from scratch: a corrupt last.pt must not fail every rerun
                _reset(run)
            # a CPU slot hides every GPU: inheriting the parent's devices would put each
            # `device = "auto"` worker on GPU 0
            gpu = slot.gpu if slot.gpu is not None else ""
            proc = start_worker(run, resume=run.file("last.pt").exists(), gpu=gpu, threads=slot.threads,
                                lock_fd=fd, argv=self.worker_argv, watch_parent=True)
        finally:
            os.close(fd)  # the worker holds the lock now (same open file description)
        self.active[slot.index] = Active(run, slot, proc, time.time())
        self._notify("started", run)
        return True

    def _reap(self, a: Active) -> None:
        rc = a.proc.returncode
        try:
            status = a.run.status()
        except Exception as e:  # noqa: BLE001 - a corrupt status.json: the worker died badly
            status = {"state": "failed", "error": str(e)}
        state = status.get("state")
        if state in ("running", "queued"):
            # the worker died without saying so (crash, SIGKILL, OOM)
            state = "cancelled" if self.stopping else "failed"
            status.update(state=state, finished_at=now_iso(), updated_at=now_iso(),
                          error=f"worker exited with code {rc} without finishing; see worker.log")
            try:
                a.run.write_status(status)
            except OSError as e:  # a full disk: the status stays as the worker left it, reading as interrupted
                status["error"] += f" (and its status could not be written: {e.strerror})"
        self.summary.outcomes[a.run.id] = Outcome(a.run.id, state, rc, status.get("error"),
                                                  a.run.log_tail(15) if state not in ("completed",) else "")
        self._notify(state, a.run)

    def _terminate_all(self) -> None:
        for a in self.active.values():
            try:
                os.killpg(a.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + self.grace_s
        while self.active and time.time() < deadline:
            self._poll()
            time.sleep(0.1)
        for a in self.active.values():
            try:
                os.killpg(a.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            a.proc.wait()
        self._poll()

    def _poll(self) -> None:
        for idx, a in list(self.active.items()):
            if a.proc.poll() is not None:
                del self.active[idx]
                # the group may hold children of the worker; none may outlive it
                try:
                    os.killpg(a.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                self._reap(a)

    def run(self) -> Summary:
        old = {}
        if _main_thread():
            # SIGHUP (the terminal or tmux session closed) is handled like Ctrl-C: nobody
            # watches any more, so the workers save last.pt and the sweep resumes later
            old = {s: signal.signal(s, self.stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            while (self.queue and not self.stopping) or self.active:
                if self.stopping:
                    self._terminate_all()
                    break
                for slot in self.slots:
                    while slot.index not in self.active and self.queue and not self.stopping:
                        self._launch(self.queue.pop(0), slot)
                self._poll()
                self._notify("tick", None)
                time.sleep(self.poll_s)
            self.summary.interrupted = self.stopping
            for run in self.queue:
                self.summary.outcomes.setdefault(run.id, Outcome(run.id, "queued"))
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return self.summary


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
