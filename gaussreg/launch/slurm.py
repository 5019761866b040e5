"""Sweeps on a Slurm cluster: Slurm schedules, gaussreg only submits and reads.

One launch is one `sbatch --parsable --array=0-N%K` job; array task i trains the runs
on line i*P .. i*P+P-1 of the launch's run list (P = `per_gpu`, the runs packed on one
task's GPU) through `python -m gaussreg.launch.slurm task`, which `exec`s the worker (P = 1) or
starts P workers and waits. The run directory stays the only contract, so the store must
be on a filesystem shared by the login node and the compute nodes. Only the portable
commands are used: `sbatch --parsable`, `squeue -h -o`, `scancel` (no sacct, no flock
across nodes).

Stopping: Slurm sends SIGTERM both for preemption/time limits and for `scancel`, so
`gaussreg cancel` first writes the run's `cancel_requested` file; a worker under Slurm
that is SIGTERMed without it ends `interrupted` (resumable, requeued by Slurm), with it
`cancelled`."""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from gaussreg.launch.control import GRACE_S, ControlError
from gaussreg.runs.device import worker_environment
from gaussreg.runs.environment import gpu_task
from gaussreg.runs.slurm_settings import (SlurmConfigError, SlurmSettings,  # noqa: F401 - settings: slurm.settings
                                          settings, times_mem)
from gaussreg.runs.store import (FINISHED, LIVE, RunDir, RunFileError, Store, atomic_write_bytes, atomic_write_json,
                                 MAX_PLAN, now_iso, read_bytes_nofollow, read_json)

SQUEUE_MIN_S = 10.0  # never poll squeue more often than this (it loads the controller)
COMMAND_TIMEOUT_S = 60.0  # squeue and scancel: a controller that has not answered by then is not going to
SBATCH_TIMEOUT_S = 120.0  # sbatch of a large array takes longer
JOB_NAME = "gaussreg"
# pending reasons that will not resolve by waiting
FATAL_REASONS = ("PartitionConfig", "ReqNodeNotAvail", "InvalidQOS", "InvalidAccount", "PartitionNodeLimit",
                 "PartitionTimeLimit", "BadConstraints", "DependencyNeverSatisfied")


class SlurmError(Exception):
    """Slurm cannot be used as asked; the message says why in one sentence."""


def require(*commands: str) -> None:
    """Every command must be on PATH (checked before anything is written)."""
    for c in commands:
        if shutil.which(c) is None:
            raise SlurmError(f"`{c}` is not on PATH: run on a Slurm login node (or load its module) "
                             "to use --backend slurm")


def sbatch_command(cfg: SlurmSettings, tasks: int, script: Path, out_dir: Path) -> List[str]:
    """The sbatch command line of one launch (an array of `tasks` tasks)."""
    k = cfg.per_gpu
    array = f"0-{tasks - 1}" + (f"%{cfg.array_parallelism}" if cfg.array_parallelism else "")
    cmd = ["sbatch", "--parsable", f"--array={array}", f"--job-name={JOB_NAME}",
           f"--output={out_dir}/%A_%a.out", "--open-mode=append", f"--signal={cfg.signal}",
           f"--cpus-per-task={cfg.cpus_per_run * k}"]
    cmd += ["--requeue"] if cfg.requeue else ["--no-requeue"]
    if cfg.partition:
        cmd.append(f"--partition={cfg.partition}")
    if cfg.time:
        cmd.append(f"--time={cfg.time}")
    if cfg.gpus_per_run:
        cmd.append(f"--gres=gpu:{cfg.gpus_per_run}")
    if cfg.mem:
        cmd.append(f"--mem={times_mem(cfg.mem, k)}")
    return cmd + list(cfg.sbatch_args) + [str(script)]


# Slurm's job ids and array indices are 32-bit: ASCII digits, at most 10 (str.isdigit and \d
# also take "١٢٣", and 400 digits would be no job of Slurm's)
_ID = r"[0-9]{1,10}"
JOB = re.compile(rf"{_ID}(_{_ID})?")  # a job, or an array task "JOBID_INDEX"


def parse_job_id(out: str) -> str:
    """`sbatch --parsable` prints `JOBID` or `JOBID;CLUSTER`."""
    first = out.strip().splitlines()[0] if out.strip() else ""
    jid = first.split(";")[0].strip()
    if not re.fullmatch(_ID, jid):
        raise SlurmError(f"sbatch printed no job id (got {out.strip()[:200]!r})")
    return jid


def store_path_problem(root: Path) -> Optional[str]:
    """Why Slurm cannot be given this store, or None: runs.txt holds one path a line, and
    sbatch expands `%` patterns (%j, %u, ...) in --output, so a newline, another control
    character or a `%` in the store's path would make the job train or write elsewhere."""
    path = str(root.resolve())
    bad = next((c for c in path if c == "%" or ord(c) < 32 or ord(c) == 127), None)
    if bad is None:
        return None
    return (f"the store path {path!r} holds {bad!r}, which Slurm would misread (a newline splits the job's run "
            "list; sbatch expands `%` patterns in --output): use a store path without it for --backend slurm")


@dataclass
class Task:
    job: str  # "JOBID_INDEX"
    state: str  # PENDING, RUNNING, ...
    reason: str


def parse_squeue(out: str) -> Dict[str, Task]:
    """Lines of `squeue -h -r -o %i|%T|%r` by array task ("123_4"); other lines are ignored."""
    tasks = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 3 or not JOB.fullmatch(parts[0]) or "_" not in parts[0]:
            continue
        tasks[parts[0]] = Task(parts[0], parts[1], parts[2])
    return tasks


def run_command(cmd: List[str], timeout: float, after: str = "", **kw) -> subprocess.CompletedProcess:
    """Run one Slurm command (sbatch, squeue, scancel), bounded: a controller that does not
    answer must not hang gaussreg. The command runs in its own session so that it and
    anything it started are killed at the timeout; every failure to run it is a SlurmError
    of one sentence (a refusal by Slurm is the caller's to word); `after` ends the sentence
    of a timeout (what the user should check)."""
    name = cmd[0]
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             text=True, start_new_session=True, **kw)
    except OSError as e:
        raise SlurmError(f"{name} could not be run ({e.strerror or e})") from None
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.communicate()
        raise SlurmError(f"{name} did not answer within {timeout:g} s: is the Slurm controller reachable "
                         f"(try `sinfo`)?{after}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def squeue() -> Dict[str, Task]:
    """This user's gaussreg array tasks that Slurm still knows (pending, running, ...)."""
    require("squeue")
    p = run_command(["squeue", "-h", "-r", "-n", JOB_NAME, "-o", "%i|%T|%r"], COMMAND_TIMEOUT_S)
    if p.returncode != 0:
        raise SlurmError(f"squeue failed: {(p.stderr or p.stdout).strip()[:300]}")
    return parse_squeue(p.stdout)


def scancel(job: str) -> None:
    require("scancel")
    p = run_command(["scancel", job], COMMAND_TIMEOUT_S, after=f" Job {job} may still run; `gaussreg cancel` again "
                    "retries")
    if p.returncode != 0:
        raise SlurmError(f"scancel {job} failed: {(p.stderr or p.stdout).strip()[:300]}")


def is_slurm(status: dict) -> bool:
    return status.get("backend") == "slurm" and bool(status.get("slurm_job"))


@dataclass
class Submission:
    job_id: Optional[str]
    submitted: List[str]
    skipped: Dict[str, str]  # run id -> why
    script: Optional[Path] = None


def _plan(store: Store, run_ids: List[str], rerun: bool, live: Dict[str, Task]) -> Tuple[List[RunDir], dict]:
    todo, skipped = [], {}
    for rid in run_ids:
        run = RunDir(store.root / rid)
        try:
            status = run.status()
            state = run.state(status)
        except RunFileError as e:
            skipped[rid] = str(e)
            continue
        if is_slurm(status) and state in LIVE and status["slurm_job"] in live:
            skipped[rid] = f"already {state} in Slurm job {status['slurm_job']}"
        elif is_slurm(status) and state == "interrupted" and status["slurm_job"] in live:
            skipped[rid] = f"interrupted, and Slurm job {status['slurm_job']} requeues it"
        elif state == "running":
            skipped[rid] = f"running on {status.get('host')}"
        elif state in FINISHED and not rerun:
            skipped[rid] = state
        else:
            todo.append(run)
    return todo, skipped


def submit(store: Store, run_ids: List[str], cfg: SlurmSettings, rerun: bool = False,
           python: str = sys.executable) -> Submission:
    """Submit the runs that need training as one array job; write each one's queued
    status with the job id. Runs already queued or running in Slurm are left alone."""
    problem = store_path_problem(store.root)
    if problem:
        raise SlurmError(problem)
    require("sbatch", "squeue")
    todo, skipped = _plan(store, run_ids, rerun, squeue())
    if not todo:
        return Submission(None, [], skipped)
    for run in todo:
        if rerun and run.state() in FINISHED:
            run.forget_results()
        run.cancel_request.unlink(missing_ok=True)
    k = cfg.per_gpu
    tasks = math.ceil(len(todo) / k)
    # its own directory even for two submissions of one process in one second (the TUI's
    # `r` on two runs): a shared one would make the first job train the second's runs
    (store.root / "_slurm").mkdir(parents=True, exist_ok=True)
    sub = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-",
                                dir=store.root / "_slurm"))
    runs_file = sub / "runs.txt"
    atomic_write_bytes(runs_file, "".join(f"{r.path.resolve()}\n" for r in todo).encode())
    script = sub / "job.sh"
    atomic_write_bytes(script, (
        "#!/bin/bash\n"
        "# written by gaussreg: array task i trains lines i*P.. of runs.txt (P runs per task)\n"
        f"export GAUSSREG_BACKEND=slurm PYTHONUNBUFFERED=1 GAUSSREG_SLURM_LAUNCH={_q(sub.name)} "
        f"GAUSSREG_SLURM_GPUS={cfg.gpus_per_run}\n"
        f"exec {_q(python)} -m gaussreg.launch.slurm task {_q(str(runs_file.resolve()))} --per-task {k}\n").encode())
    script.chmod(0o755)
    cmd = sbatch_command(cfg, tasks, script.resolve(), sub.resolve())
    try:
        p = run_command(cmd, SBATCH_TIMEOUT_S, cwd=str(store.root),
                        after=" Slurm may have queued the job anyway: check `squeue --me` and scancel it")
        if p.returncode != 0:
            raise SlurmError(f"sbatch refused the job: {(p.stderr or p.stdout).strip()[:500]}")
        jid = parse_job_id(p.stdout)
    except SlurmError:
        shutil.rmtree(sub, ignore_errors=True)  # nothing was submitted: leave no launch behind
        raise
    # the settings, so that a run of this launch can be resubmitted the same way (resubmit)
    atomic_write_json(sub / "job.json", {"job_id": jid, "runs": [r.id for r in todo], "per_task": k,
                                         "command": cmd, "submitted_at": now_iso(), "settings": asdict(cfg)})
    for i, run in enumerate(todo):
        job = f"{jid}_{i // k}"
        try:
            old = run.status()
        except RunFileError:
            old = {}
        if old.get("slurm_job") == job:
            continue  # the task already started and wrote its own status
        keep = {key: old[key] for key in ("epoch", "max_epochs") if key in old}
        run.write_status({**keep, "state": "queued", "backend": "slurm", "slurm_job_id": jid,
                          "slurm_array_index": i // k, "slurm_job": job, "slurm_runs_per_task": k,
                          "slurm_launch": sub.name,
                          "submitted_at": now_iso(), "updated_at": now_iso(), "error": None})
    return Submission(jid, [r.id for r in todo], skipped, script)


def _q(s: str) -> str:
    return shlex.quote(s)


# ---------------------------------------------------------------- control

def cancel(run: RunDir) -> str:
    """Cancel a Slurm run: mark it, then scancel its array task (when the task trains only
    this run; a task packing several runs stops just this worker). Returns what was done."""
    try:
        status = run.status()
        state = run.state(status)
    except RunFileError as e:
        raise ControlError(str(e)) from None
    if state not in LIVE:
        raise ControlError(f"run {run.id} is {state}, neither queued nor running")
    job = status["slurm_job"]
    if not isinstance(job, str) or not JOB.fullmatch(job):  # never hand scancel an option or a stranger's words
        raise ControlError(f"run {run.id} names no Slurm job that scancel can take ({str(job)[:40]!r}); "
                           "its status.json is damaged")
    atomic_write_json(run.cancel_request, {"requested_at": now_iso()})
    shared = status.get("slurm_runs_per_task", 1) > 1
    if not shared:
        try:
            scancel(job)
        except SlurmError as e:
            raise ControlError(str(e)) from None
    if state == "queued":
        try:
            now = run.status()
        except RunFileError:
            now = status
        if now.get("state") == "queued":  # no worker will ever say so
            run.write_status({**now, "state": "cancelled", "finished_at": now_iso(), "updated_at": now_iso(),
                              "error": "cancelled before it started"})
    return (f"scancel {job}" if not shared else f"asked the task {job} to stop it") + f" ({state})"


def resubmit(run: RunDir) -> Submission:
    """Train a Slurm run that is not queued or running again, through Slurm, with the
    settings of the launch that submitted it (alone in its array task): a diverged one from
    scratch, any other from its last.pt. ControlError says why not."""
    try:
        status = run.status()
        state = run.state(status)
    except RunFileError as e:
        raise ControlError(str(e)) from None
    if state in LIVE:
        raise ControlError(f"run {run.id} is {state} in Slurm job {status.get('slurm_job')}; cancel it first")
    if state == "completed":
        raise ControlError(f"run {run.id} is completed; use `gaussreg run --rerun --backend slurm` to train it again")
    launch = status.get("slurm_launch")
    store = Store(run.path.parent)
    if not isinstance(launch, str) or not launch or "/" in launch or launch.startswith("."):
        raise ControlError(f"run {run.id} has no record of its Slurm settings (submitted by an older gaussreg); "
                           "resubmit it with `gaussreg run MANIFEST --backend slurm`")
    path = store.root / "_slurm" / launch / "job.json"
    try:
        job = read_json(path)
        recorded = job.get("settings") if isinstance(job, dict) else None
        cfg = settings({k: v for k, v in recorded.items() if v is not None} if isinstance(recorded, dict) else None)
    except (RunFileError, SlurmConfigError) as e:
        raise ControlError(f"the Slurm settings of run {run.id} cannot be read ({e})") from None
    if not isinstance(job, dict) or not isinstance(job.get("settings"), dict):
        raise ControlError(f"{path} does not hold the Slurm settings of run {run.id}")
    cfg.per_gpu, cfg.array_parallelism = 1, None  # one run: one task with one run's resources
    try:
        sub = submit(store, [run.id], cfg, rerun=state == "diverged")
    except SlurmError as e:
        raise ControlError(str(e)) from None
    if not sub.job_id:
        raise ControlError(f"run {run.id} was not resubmitted: {sub.skipped.get(run.id, 'nothing to do')}")
    return sub


# ---------------------------------------------------------------- the array task

def _task(runs_file: Path, per_task: int) -> int:
    idx = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    lines = [l for l in read_bytes_nofollow(runs_file, MAX_PLAN).decode().splitlines() if l.strip()]
    mine = [RunDir(p) for p in lines[idx * per_task:(idx + 1) * per_task]]
    todo = []
    for run in mine:
        try:
            status = run.status()
            state = run.state(status)
        except RunFileError as e:
            print(f"skipping {run.path}: {e}", flush=True)
            continue
        if state in FINISHED:
            print(f"skipping {run.id}: {state}", flush=True)
        elif run.cancel_request.exists():
            print(f"skipping {run.id}: cancel requested", flush=True)
        else:
            todo.append(run)
    if not todo:
        return 0
    env = {**worker_environment(str(todo[0].path.parent)), **os.environ,
           "GAUSSREG_BACKEND": "slurm", "GAUSSREG_RUNS_PER_TASK": str(per_task)}
    env.pop("GAUSSREG_GPU", None)
    if gpu_task():
        # the workers are on GPU slots: they get CUDA or refuse, never train on the CPU
        # while the task holds a GPU (a spec with device = "cpu" is still allowed)
        env["GAUSSREG_GPU"] = os.environ.get("CUDA_VISIBLE_DEVICES") or "allocated by Slurm"
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit() and "GAUSSREG_THREADS" not in os.environ:
        env["GAUSSREG_THREADS"] = env["OMP_NUM_THREADS"] = str(max(1, int(cpus) // len(todo)))
    argv = lambda r: [sys.executable, "-m", "gaussreg.runs.worker", str(r.path), "--resume"]
    print(f"{now_iso()} task {idx} on {os.uname().nodename}: {' '.join(r.id for r in todo)}", flush=True)
    if len(todo) == 1:
        # exec: the worker is the batch step's process, so B:TERM reaches it directly
        fd = os.open(todo[0].log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.execve(sys.executable, argv(todo[0]), env)
    procs = {}
    for run in todo:
        with open(run.log_file, "ab") as log:
            procs[run.id] = (run, subprocess.Popen(argv(run), env=env, stdout=log, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL))

    def forward(signum, _frame):
        for _, p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    stopped: Dict[str, float] = {}  # run id -> when it was asked to stop
    while any(p.poll() is None for _, p in procs.values()):
        for rid, (run, p) in procs.items():  # gaussreg cancel of one packed run
            if rid not in stopped and p.poll() is None and run.cancel_request.exists():
                p.send_signal(signal.SIGTERM)
                stopped[rid] = time.monotonic()
            elif rid in stopped and p.poll() is None and time.monotonic() - stopped[rid] > GRACE_S:
                # stuck in its own code: the cancel is honoured anyway, last.pt kept (as gaussreg cancel does locally)
                print(f"{now_iso()} {rid} did not stop within {GRACE_S:g} s of SIGTERM; killing it (SIGKILL)",
                      flush=True)
                p.kill()
                p.wait()
                try:
                    now = run.status()  # the file, not state(): a dead worker's run reads as interrupted
                    if now.get("state") in LIVE:
                        run.write_status({**now, "state": "cancelled", "finished_at": now_iso(),
                                          "updated_at": now_iso(), "error": f"cancelled; the worker did not stop "
                                          f"within {GRACE_S:g} s of SIGTERM (stuck in its own code?), so it was "
                                          "killed with SIGKILL; last.pt keeps the last finished epoch"})
                except (OSError, RunFileError):
                    pass
        time.sleep(1.0)
    return 0 if all(p.returncode == 0 for _, p in procs.values()) else 1


# ---------------------------------------------------------------- follow

def pending_reasons(run_ids: List[str], store: Store, live: Dict[str, Task]) -> Dict[str, str]:
    """Run id -> Slurm's pending reason, for queued runs whose task is pending."""
    out = {}
    for rid in run_ids:
        try:
            status = RunDir(store.root / rid).status()
        except RunFileError:
            continue
        t = live.get(status.get("slurm_job", ""))
        if t and t.state == "PENDING":
            out[rid] = t.reason
    return out


def fatal(reason: str) -> bool:
    return any(reason.startswith(r) for r in FATAL_REASONS)




def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gaussreg.launch.slurm")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("task", help="run this array task's runs (called by the job script)")
    t.add_argument("runs_file")
    t.add_argument("--per-task", type=int, default=1)
    args = ap.parse_args(argv)
    return _task(Path(args.runs_file), args.per_task)


if __name__ == "__main__":
    sys.exit(main())
