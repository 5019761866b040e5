"""The worker: the process that trains one run, `python -m gaussreg.runs.worker RUN_DIR [--resume]`.

It holds the run's lock, checks the run can start (spec, data, code), keeps status.json
alive (a heartbeat), turns SIGTERM, SIGINT and its scheduler's death into a cancel that
keeps last.pt, trains (gaussreg.runs.training), and records how the run ended: result.json
or the state and one sentence of why (README: "The run directory")."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import traceback
from contextlib import contextmanager

from gaussreg.data import loading as data
from gaussreg.runs import environment
from gaussreg.runs.environment import orphaned, watch_parent
from gaussreg.runs.device import (apply_worker_environment, make_deterministic, out_of_memory, pick_device,
                                  resolve_precision)
from gaussreg.runs.spec import SpecError, changed_noise_bank, changed_source, resolve
from gaussreg.runs.store import HEARTBEAT_S, RunDir, RunFileError, atomic_write_json, now_iso, read_json, try_lock
from gaussreg.runs.training import Cancelled, Diverged, train

EXIT_BAD_INPUT = 2
EXIT_LOCKED = 3


class Status:
    """status.json, replaced atomically; a heartbeat thread refreshes updated_at and writes
    what `note` was told since."""

    def __init__(self, run: RunDir, **fields):
        self.run, self.fields, self.lock = run, dict(fields), threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def update(self, **fields) -> None:
        with self.lock:
            self.fields.update(fields, updated_at=now_iso())
            self.run.write_status(self.fields)

    def note(self, **fields) -> None:
        """Fields the next heartbeat writes (phase and epoch: no fsync'd write per change)."""
        with self.lock:
            self.fields.update(fields)

    def start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    self.update()
                except OSError:
                    pass  # a full disk must not kill training; the next beat retries
        self._thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


@contextmanager
def _signals(flag: dict, stop_now):
    """SIGTERM and SIGINT ask to stop at the next batch, saying so on stderr (worker.log
    under a scheduler); a second SIGINT (Ctrl-C of `gaussreg train`) calls stop_now(signum):
    a model or loader stuck in its own code never reaches a next batch."""
    def handler(signum, _frame):
        if signum == signal.SIGINT and "signal" in flag:
            stop_now(signum)
        flag.setdefault("signal", signum)
        # os.write: a handler must not re-enter a buffered stream the main thread may be writing
        os.write(2, (f"{signal.Signals(signum).name}: stopping at the next batch (last.pt keeps the last finished "
                     "epoch)" + ("; Ctrl-C again stops at once\n" if signum == signal.SIGINT else "\n")).encode())
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gaussreg.runs.worker", description="Train one run directory.")
    ap.add_argument("run_dir")
    ap.add_argument("--resume", action="store_true", help="continue from last.pt when it exists")
    args = ap.parse_args(argv)
    run = RunDir(args.run_dir)
    try:
        run.check_is_run()  # before the log and the lock: nothing is written into a folder that is no run
    except RunFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    apply_worker_environment(str(run.path.resolve().parent))  # before torch starts CUDA or inductor
    try:
        fd = os.open(run.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                     0o666)
    except OSError as e:
        print(f"error: cannot write {run.log_file} ({e.strerror}); is the run directory writable "
              "and worker.log a plain file?", file=sys.stderr)
        return EXIT_BAD_INPUT
    logf = os.fdopen(fd, "a", buffering=1)
    echo = sys.stderr.isatty()

    def log(msg: str) -> None:
        line = f"{now_iso()} {msg}"
        logf.write(line + "\n")
        if echo:
            print(line, file=sys.stderr)

    parent = watch_parent()
    held = os.environ.pop("GAUSSREG_LOCK_FD", None)  # the scheduler passes the lock it took
    lock_fd = int(held) if held else try_lock(run)
    if lock_fd is None:
        print(f"error: run {run.id} is already being trained by another process", file=sys.stderr)
        return EXIT_LOCKED
    status = Status(run, state="running", pid=os.getpid(), host=socket.gethostname(), device=None,
                    started_at=now_iso(), finished_at=None, epoch=0, max_epochs=None, error=None, phase="training",
                    cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                    gpu_slot=os.environ.get("GAUSSREG_GPU"), **environment.worker_fields())

    def fail(message: str, state: str = "failed", **extra) -> None:
        log(f"{state}: {message}")
        status.update(state=state, error=message, finished_at=now_iso(), **extra)

    def refuse(message: str) -> None:
        """A run that cannot start says why in its status, unless it is completed: then
        only this attempt (`gaussreg train --force`) is refused, and its result stands."""
        try:
            completed = run.state() == "completed"
        except Exception:  # noqa: BLE001 - a corrupt status: nothing to keep
            completed = False
        if completed:
            log(f"refused to train again: {message}")
        else:
            fail(message)

    try:
        checked = _check_run(run, refuse)
        if isinstance(checked, int):
            return checked
        spec, dev = checked
        status.fields.update(device=str(dev), max_epochs=spec["max_epochs"],
                             precision=resolve_precision(spec["precision"], dev))
        status.update()
        status.start_heartbeat()
        log(f"start {run.id} pid {os.getpid()} device {dev} resume={args.resume}")
        return _train_to_the_end(spec, run, dev, args.resume, parent, status, log, logf, fail)
    finally:
        status.stop_heartbeat()
        logf.close()


def _check_run(run: RunDir, fail):
    """(spec, device) when the run can start, else its exit code after saying why."""
    try:
        raw = read_json(run.spec_file)  # resolve() checks it key by key, with its own messages
        if raw is None:
            raise RunFileError(f"{run.spec_file} is missing")
        spec = resolve(raw)
    except (SpecError, RunFileError) as e:
        fail(f"bad spec {run.spec_file}: {e}")
        print(f"error: bad spec {run.spec_file}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if (data.is_builtin(spec["dataset"]) and spec["dataset"] != "synthetic"
            and data.find(spec["dataset"], spec["data_dir"]) is None):
        msg = data.missing_message(spec["dataset"], spec["data_dir"])
    else:
        msg = changed_source(spec) or changed_noise_bank(raw, run.id)
    if msg:
        fail(msg)
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        make_deterministic()
        dev = pick_device(spec["device"], os.environ.get("GAUSSREG_GPU"))
    except SpecError as e:
        fail(str(e))
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return spec, dev


def _train_to_the_end(spec, run: RunDir, dev, resume: bool, parent, status: Status, log, logf, fail) -> int:
    """Train under the stop signals; record the result or how the run ended. The exit code."""
    flag = {}

    def stop_now(signum: int) -> None:
        """A second Ctrl-C: record the cancel and exit now, without waiting for the batch."""
        state, message = environment.stop_state(run, signum)
        try:  # not Status.update: its lock may be held by the code this handler interrupted
            run.write_status({**status.fields, "state": state, "finished_at": now_iso(), "updated_at": now_iso(),
                              "error": f"{message} (stopped at once by a second {signal.Signals(signum).name})"})
        except OSError:
            pass  # the run reads as interrupted, and resumes the same
        os._exit(128 + signum)

    with _signals(flag, stop_now):
        if orphaned(parent):
            flag["signal"] = signal.SIGTERM  # the scheduler died before we could ask to follow it
        try:
            result = train(spec, run, resume, lambda: "signal" in flag or orphaned(parent), status, log)
        except Cancelled:
            sig = flag.get("signal", signal.SIGTERM)
            if orphaned(parent):
                fail(f"its scheduler (pid {parent}) died; last.pt holds the last finished epoch "
                     "(run it again to resume)", "cancelled")
            else:
                state, message = environment.stop_state(run, sig)  # under Slurm, SIGTERM may be preemption
                fail(message, state)
            return 128 + sig
        except Diverged as e:
            fail(str(e), "diverged", diverged_epoch=e.epoch, diverged_term=e.term)
            return 1
        except Exception as e:
            logf.write(traceback.format_exc())
            if out_of_memory(e):
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                fail(f"out of memory on {dev} ({first}); run fewer runs per GPU (--per-gpu), a smaller "
                     "batch_size or a smaller train_subset", out_of_memory=True)
            else:
                fail(f"{type(e).__name__}: {e}")
            return 1
    atomic_write_json(run.result_file, result)
    # phase: what a running worker does; a failed run keeps the one it failed in
    status.update(state="completed", finished_at=now_iso(), error=None, phase=None)
    log(f"completed: test accuracy {result['test_accuracy']:.4f}, robustness {result['robustness']:.4f}")
    return 0


def run_as_script() -> None:
    """`python -m gaussreg.runs.worker` (and the README's `python -m gaussreg.worker`)."""
    code = main()
    # Every file the run writes is closed by now: skip tearing down torch's module graph,
    # which costs about a second per run (a sweep of small runs, the test suite).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_as_script()
