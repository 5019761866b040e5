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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .store import FINISHED, RunDir, RunFileError, Store, atomic_write_json, now_iso, try_lock

GRACE_S = 30.0  # how long a SIGTERMed worker gets to write last.pt before SIGKILL


@dataclass
class Slot:
    index: int
    gpu: Optional[str]  # CUDA_VISIBLE_DEVICES of the runs in this slot; None on CPU (workers get "")
    threads: Optional[int] = None
    shares: int = 1  # --per-gpu: runs of all launches of a store that may share this slot's GPU


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
    """'auto' and 'all' (every visible GPU; none on a CPU box: launch.resolve_gpus refuses
    an explicit 'all' there), 'none', or a list like '0,1'."""
    arg = arg.strip()
    if arg in ("auto", "all"):
        return detect_gpus()
    if arg == "none":
        return []
    parts = [p.strip() for p in arg.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"--gpus must be 'auto', 'all', 'none' or GPU indices like '0,1', not {arg!r}")
    return list(dict.fromkeys(parts))


def usable_cpus() -> int:
    """The cores this process may run on: a Slurm job's or taskset's cpuset, not the
    machine's (os.cpu_count counts every core of a 128-core login node)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def exclusive_gpus(gpus: List[str]) -> List[str]:
    """Those of `gpus` (indices or UUIDs as in CUDA_VISIBLE_DEVICES) that nvidia-smi reports
    in EXCLUSIVE_PROCESS compute mode, where a second process cannot open the GPU."""
    if not gpus or not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,compute_mode", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    exclusive = set()
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[2].replace("_", " ").lower() == "exclusive process":
            exclusive.update(parts[:2])
    return [g for g in gpus if g in exclusive]


def make_slots(gpus: List[str], per_gpu: int = 1, max_parallel: Optional[int] = None,
               cpus: Optional[int] = None) -> List[Slot]:
    """`per_gpu` slots on each GPU (capped by max_parallel); without GPUs, max_parallel
    CPU slots (default: one) sharing the cores evenly."""
    if per_gpu < 1:
        raise ValueError("--per-gpu must be >= 1")
    if max_parallel is not None and max_parallel < 1:
        raise ValueError("--max-parallel must be >= 1")
    cpus = cpus or usable_cpus()
    if gpus:
        slots = [Slot(i, g) for i, (g, _) in enumerate((g, k) for k in range(per_gpu) for g in gpus)]
        slots = slots[:max_parallel] if max_parallel else slots
        threads = max(1, cpus // len(slots))
    else:
        n = max_parallel or 1
        slots = [Slot(i, None) for i in range(n)]
        threads = max(1, cpus // n)
    for s in slots:
        s.threads, s.shares = threads, per_gpu
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


def start_worker(run: RunDir, resume: bool, gpu: Optional[str] = None, threads: Optional[int] = None,
                 lock_fd: Optional[int] = None, argv: Optional[List[str]] = None,
                 watch_parent: bool = False, hold_fds: tuple = ()) -> subprocess.Popen:
    """One worker process for a run, in its own session (so a terminal's Ctrl-C reaches
    only its parent), with its output appended to worker.log. A held lock is passed on.
    With watch_parent the worker stops (saving last.pt, as on SIGTERM) when this process
    dies: a scheduler that dies must not leave workers training for nobody. hold_fds: more
    locks the worker holds until it exits (its share of a GPU)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("GAUSSREG_LOCK_FD", None)
    env.pop("GAUSSREG_PARENT_PID", None)
    if watch_parent:
        env["GAUSSREG_PARENT_PID"] = str(os.getpid())
    if lock_fd is not None:
        env["GAUSSREG_LOCK_FD"] = str(lock_fd)
    env.pop("GAUSSREG_GPU", None)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
        if gpu:  # a GPU slot: the worker must get CUDA or refuse (worker.pick_device)
            env["GAUSSREG_GPU"] = gpu
            # GPU indices are nvidia-smi's, which counts by PCI bus; CUDA's default order
            # (fastest first) could make "1" another GPU (a user's own setting wins)
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if threads:
        env["GAUSSREG_THREADS"] = env["OMP_NUM_THREADS"] = str(threads)
    cmd = (argv or [sys.executable, "-m", "gaussreg.worker"]) + [str(run.path)] + (["--resume"] if resume else [])
    fd = os.open(run.file("worker.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                pass_fds=((lock_fd,) if lock_fd is not None else ()) + tuple(hold_fds),
                                start_new_session=True)


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
                 poll_s: float = 0.5, grace_s: float = GRACE_S, specs: Optional[Dict[str, dict]] = None):
        """`specs` (run id -> spec) are runs whose directories this scheduler creates: each
        one when it is launched, and the others by a thread while the first runs train, so
        the first run of a 10,000-run grid starts at once (a directory costs ~20 ms of fsyncs)."""
        self.store, self.slots, self.rerun = store, slots, rerun
        self.queue = [RunDir(store.root / r) for r in run_ids]
        self.specs = dict(specs or {})
        self.all_created = threading.Event()  # every directory of `specs` exists (or the sweep stopped)
        self._halt_create = threading.Event()
        self.worker_argv = worker_argv  # None: python -m gaussreg.worker
        self.on_change = on_change or (lambda sched, what, run: None)
        self.poll_s, self.grace_s = poll_s, grace_s
        self.active: Dict[int, Active] = {}  # slot index -> active run
        self.summary = Summary()
        self.stopping = False
        self.view_error: Optional[str] = None  # the first error of the view (on_change); it never stops the sweep
        # GPUs on which a run ran out of memory: nothing more starts there until one of the
        # runs still on it ends (else the next run would run out of memory too)
        self.oom_hold: set = set()
        self.share_error: Optional[str] = None  # why GPU shares could not be locked (then not counted)

    def stop(self, *_args) -> None:
        """First Ctrl-C (or SIGTERM): launch nothing more and cancel the running workers."""
        self.stopping = True

    def _notify(self, what: str, run: Optional[RunDir]) -> None:
        """The view is told what happened; a view that cannot show it (a closed pipe, a
        corrupt file it reads) never stops the sweep."""
        try:
            self.on_change(self, what, run)
        except Exception as e:  # noqa: BLE001 - the sweep outlives its view
            if self.view_error is None:
                self.view_error = f"{type(e).__name__}: {e}"

    def _gpu_share(self, slot: Slot) -> Optional[int]:
        """For a GPU slot, a lock on one of its GPU's --per-gpu places in this store (see
        Store.lock_gpu_share); -1 for a CPU slot; None while other launches fill the GPU."""
        if not slot.gpu:
            return -1
        try:
            return self.store.lock_gpu_share(slot.gpu, slot.shares)
        except (OSError, RunFileError) as e:  # no flock, an unwritable store: shares cannot be counted
            if self.share_error is None:
                self.share_error = str(e)
            return -1

    def _launch(self, run: RunDir, slot: Slot, share_fd: int = -1) -> bool:
        """Start one run; any problem of that run (a corrupt file, a lock that is a
        directory, a full disk) makes that run failed and the sweep goes on."""
        try:
            return self._launch_one(run, slot, share_fd)
        except Exception as e:  # noqa: BLE001
            why = str(e) if isinstance(e, (RunFileError, ControlError)) else f"{type(e).__name__}: {e}"
            self.summary.outcomes[run.id] = Outcome(run.id, "failed", error=f"not started: {why}")
            self._notify("failed", run)
            return False

    def _create(self, run_id: str) -> None:
        spec = self.specs.get(run_id)
        if spec is not None:
            self.store.create(spec, run_id)
            self.specs.pop(run_id, None)

    def _create_ahead(self) -> None:
        """Create the directories of the runs not launched yet, in launch order, so `ls`
        and the TUI list the pending runs; a problem is left for that run's launch to report."""
        try:
            for run in list(self.queue):
                if self.stopping or self._halt_create.is_set():
                    return
                try:
                    self._create(run.id)
                except Exception:  # noqa: BLE001 - _launch fails that run with the reason
                    pass
        finally:
            self.all_created.set()

    def _launch_one(self, run: RunDir, slot: Slot, share_fd: int = -1) -> bool:
        try:
            return self._launch_locked(run, slot, share_fd)
        finally:
            if share_fd >= 0:
                os.close(share_fd)  # the worker holds its copy; a run not started gives the place back

    def _launch_locked(self, run: RunDir, slot: Slot, share_fd: int) -> bool:
        self._create(run.id)
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
                                lock_fd=fd, argv=self.worker_argv, watch_parent=True,
                                hold_fds=(share_fd,) if share_fd >= 0 else ())
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
        gpu = a.slot.gpu
        if gpu:
            if status.get("out_of_memory"):
                self.oom_hold.add(gpu)
            else:
                self.oom_hold.discard(gpu)
            if not any(o.slot.gpu == gpu for o in self.active.values()):
                self.oom_hold.discard(gpu)  # nothing left to wait for: the GPU is free
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
        creator = None
        try:
            while (self.queue and not self.stopping) or self.active:
                if self.stopping:
                    self._terminate_all()
                    break
                for slot in self.slots:
                    while (slot.index not in self.active and self.queue and not self.stopping
                           and slot.gpu not in self.oom_hold):
                        share = self._gpu_share(slot)
                        if share is None:
                            break  # other launches of this store fill the GPU: try again next tick
                        self._launch(self.queue.pop(0), slot, share)
                if creator is None:  # only once the first runs are off
                    creator = threading.Thread(target=self._create_ahead, name="create-runs", daemon=True)
                    creator.start()
                self._poll()
                self._notify("tick", None)
                time.sleep(self.poll_s)
            self.summary.interrupted = self.stopping
            for run in self.queue:
                self.summary.outcomes.setdefault(run.id, Outcome(run.id, "queued"))
        finally:
            self._halt_create.set()  # after the directory it is writing (the queue is empty unless stopped)
            if creator is not None:
                creator.join()
            self.all_created.set()
            for s, h in old.items():
                signal.signal(s, h)
        return self.summary


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
