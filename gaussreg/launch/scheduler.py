"""The local scheduler: one worker process per run, GPU slots handed out by the parent.
This is the scheduling loop (slots, queue, reaping, a Snapshot per change for the view);
starting a worker, cancel, restart and detached launches are in gaussreg.launch.control.

Each worker runs in its own process group with CUDA_VISIBLE_DEVICES set to its GPU;
the parent holds each run's OS lock while launching and passes it to the worker, so
two schedulers on one store never train the same run twice."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from gaussreg.launch.control import GRACE_S, ControlError, is_stopped, start_worker
from gaussreg.launch.gpus import canonical_gpu, nvidia_gpus, usable_cpus
from gaussreg.runs.device import oom_kill_count
from gaussreg.runs.store import FINISHED, LIVE, RunDir, RunFileError, Store, now_iso, try_lock


@dataclass
class Slot:
    index: int
    gpu: Optional[str]  # CUDA_VISIBLE_DEVICES of the runs in this slot; None on CPU (workers get "")
    threads: Optional[int] = None
    shares: int = 1  # --per-gpu: runs of all launches of a store that may share this slot's GPU
    place: Optional[str] = None  # the GPU's canonical name (canonical_gpu), which names its places in the store


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
    table = nvidia_gpus() if gpus else []
    for s in slots:
        s.threads, s.shares = threads, per_gpu
        s.place = canonical_gpu(s.gpu, table) if s.gpu else None
    return slots


@dataclass
class Active:
    run: RunDir
    slot: Slot
    proc: subprocess.Popen
    started: float
    oom_kills: Optional[int] = None  # the kernel's OOM-kill count when it started (device.oom_kill_count)


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


class Scheduler:
    def __init__(self, store: Store, run_ids: List[str], slots: List[Slot], rerun: bool = False,
                 worker_argv: Optional[List[str]] = None, on_change: Optional[Callable] = None,
                 poll_s: float = 0.5, grace_s: float = GRACE_S, specs: Optional[Dict[str, dict]] = None,
                 say: Optional[Callable[[str], None]] = None):
        """`specs` (run id -> spec) are runs whose directories this scheduler creates: each
        one when it is launched, and the others by a thread while the first runs train, so
        the first run of a 10,000-run grid starts at once (a directory costs ~20 ms of fsyncs)."""
        self.store, self.slots, self.rerun = store, slots, rerun
        self.queue = [RunDir(store.root / r) for r in run_ids]
        self.specs = dict(specs or {})
        self.all_created = threading.Event()  # every directory of `specs` exists (or the sweep stopped)
        self._halt_create = threading.Event()
        self.worker_argv = worker_argv  # None: python -m gaussreg.runs.worker
        self.on_change = on_change or (lambda snapshot, what, run: None)  # (Snapshot, what, RunDir)
        self.poll_s, self.grace_s = poll_s, grace_s
        # what stopping waits for, in sentences (the CLI prints them on stderr): a stop never waits silently
        self.say = say or (lambda message: None)
        self.kill_now = False  # a second Ctrl-C: stop waiting for the workers
        self.killed: Dict[str, str] = {}  # run id -> why its worker was killed with SIGKILL
        self.active: Dict[int, Active] = {}  # slot index -> active run
        self.summary = Summary()
        self.stopping = False
        self.view_error: Optional[str] = None  # the first error of the view (on_change); it never stops the sweep
        # GPUs on which a run ran out of memory: nothing more starts there until one of the
        # runs still on it ends (else the next run would run out of memory too)
        self.oom_hold: set = set()
        self.share_error: Optional[str] = None  # why GPU shares could not be locked (then not counted)

    def stop(self, *_args) -> None:
        """First Ctrl-C (or SIGTERM): launch nothing more and cancel the running workers;
        a second one: kill them now instead of waiting (a signal handler: only flags here)."""
        if self.stopping:
            self.kill_now = True
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

    def _gpu_share(self, slot: Slot) -> Optional[int]:
        """For a GPU slot, a lock on one of its GPU's --per-gpu places in this store (see
        Store.lock_gpu_share); -1 for a CPU slot; None while other launches fill the GPU."""
        if not slot.gpu:
            return -1
        try:
            return self.store.lock_gpu_share(slot.place or slot.gpu, slot.shares)
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
                run.forget_results()
            run.cancel_request.unlink(missing_ok=True)  # an old `gaussreg cancel` is not about this attempt
            # a CPU slot hides every GPU: inheriting the parent's devices would put each
            # `device = "auto"` worker on GPU 0
            gpu = slot.gpu if slot.gpu is not None else ""
            proc = start_worker(run, resume=run.last_checkpoint.exists(), gpu=gpu, threads=slot.threads,
                                lock_fd=fd, argv=self.worker_argv, watch_parent=True,
                                hold_fds=(share_fd,) if share_fd >= 0 else ())
        finally:
            os.close(fd)  # the worker holds the lock now (same open file description)
        self.active[slot.index] = Active(run, slot, proc, time.time(), oom_kill_count())
        self._notify("started", run)
        return True

    def _reap(self, a: Active) -> None:
        rc = a.proc.returncode
        try:
            status = a.run.status()
        except Exception as e:  # noqa: BLE001 - a corrupt status.json: the worker died badly
            status = {"state": "failed", "error": str(e)}
        state = status.get("state")
        if state in LIVE:
            # the worker died without saying so (crash, SIGKILL, OOM)
            # cancelled: by this scheduler's stop, or by `gaussreg cancel` (which killed a stuck worker)
            state = "cancelled" if self.stopping or a.run.cancel_request.exists() else "failed"
            killed = self.killed.get(a.run.id)
            oom = _oom_killed(rc, a.oom_kills) if not killed else None
            status.update(state=state, finished_at=now_iso(), updated_at=now_iso(), error=_died(rc, a.run, killed, oom))
            if oom:
                status["out_of_memory"] = True
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
        """SIGTERM every worker (SIGCONT too: a stopped one must hear it), wait up to grace_s
        for them to stop at their next batch, saying so, then SIGKILL the ones that did not
        (stuck in user code, or stopped again); a second Ctrl-C ends the wait at once."""
        stopped = [a.run.id for a in self.active.values() if is_stopped(a.proc.pid)]
        for a in self.active.values():
            for sig in (signal.SIGTERM, signal.SIGCONT):
                try:
                    os.killpg(a.proc.pid, sig)
                except ProcessLookupError:
                    pass
        if self.active:
            self.say(f"stopping: waiting up to {self.grace_s:g} s for {len(self.active)} worker(s) to stop at their "
                     f"next batch ({', '.join(a.run.id for a in self.active.values())})"
                     + (f"; {', '.join(stopped)} had been stopped (SIGSTOP) and got SIGCONT" if stopped else "")
                     + "; press Ctrl-C again to kill them now (last.pt is kept)")
        deadline = time.time() + self.grace_s
        while self.active and time.time() < deadline and not self.kill_now:
            self._poll()
            time.sleep(0.1)
        if self.active:
            why = ("killed with SIGKILL at a second Ctrl-C" if self.kill_now else
                   f"did not stop within {self.grace_s:g} s of SIGTERM (stuck in its own model or loader code, or "
                   "stopped), so it was killed with SIGKILL")
            self.say(f"{'second Ctrl-C' if self.kill_now else 'grace period over'}: killing "
                     f"{', '.join(a.run.id for a in self.active.values())} with SIGKILL")
            for a in self.active.values():
                self.killed[a.run.id] = why
                try:
                    os.killpg(a.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for a in self.active.values():
                try:
                    a.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:  # uninterruptible I/O: say so rather than hang
                    self.say(f"worker {a.proc.pid} of {a.run.id} has not died 10 s after SIGKILL; not waiting for it")
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
        # while it runs, its queued runs read as waiting for it (store.launch_alive), not as not launched
        try:
            held = self.store.hold_launch()
        except (OSError, RunFileError):  # no flock or an unwritable store: each run's launch says why it fails
            held = None
        try:
            return self._run()
        finally:
            if held is not None:
                self.store.release_launch(held)

    def _run(self) -> Summary:
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


def _oom_killed(rc: Optional[int], kills_at_start: Optional[int]) -> Optional[str]:
    """How the kernel's OOM killer shows that it killed a worker that died of SIGKILL, or None."""
    if rc != -signal.SIGKILL or kills_at_start is None:
        return None
    now = oom_kill_count()
    if now is None or now <= kills_at_start:
        return None
    return f"/proc/vmstat oom_kill went from {kills_at_start} to {now} while it ran"


def _died(rc: Optional[int], run: RunDir, killed: Optional[str] = None, oom: Optional[str] = None) -> str:
    """Why a worker that never said how it ended is not running: a signal (kill -9, the
    kernel's OOM killer) leaves nothing in worker.log, so say which, and what is kept;
    `killed`: why this scheduler killed it; `oom`: the evidence that the OOM killer did."""
    kept = (" (its last.pt holds the last finished epoch: run it again to resume)"
            if run.last_checkpoint.exists() else "")
    if killed:
        return f"worker {killed}{kept}"
    if oom:
        return (f"worker was killed by the kernel's out-of-memory killer ({oom}): the machine ran out of memory; "
                f"run fewer runs at once or a smaller batch_size or train_subset{kept}")
    if rc is not None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"worker was killed by {name} without finishing{kept}"
    return f"worker exited with code {rc} without finishing; see worker.log{kept}"


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
