"""Sweeps on a Slurm cluster: Slurm schedules, gaussreg only submits and reads.

One launch is one `sbatch --parsable --array=0-N%K` job, or several when its tasks
outnumber the cluster's MaxArraySize (each job's script argument F: its index 0 is the
launch's task F); the launch's task t trains the runs on line t*P .. t*P+P-1 of the
launch's run list (P = `per_gpu`, the runs packed on one task's GPU) through
`python -m gaussreg.launch.slurm task`, which `exec`s the worker (P = 1) or starts P
workers and waits. Run directories missing at submission are written after sbatch
(write_runs), and a task that starts first writes its own from the launch's specs.jsonl.
The run directory stays the only contract, so the store must
be on a filesystem shared by the login node and the compute nodes. Only the portable
commands are used: `sbatch --parsable`, `squeue -h -o`, `scancel` (no sacct, no flock
across nodes).

Stopping: Slurm sends SIGTERM both for preemption/time limits and for `scancel`, so
`gaussreg cancel` first writes the run's `cancel_requested` file; a worker under Slurm
that is SIGTERMed without it ends `interrupted` (resumable, requeued by Slurm), with it
`cancelled`."""

from __future__ import annotations

import argparse
import json
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
from dataclasses import asdict, dataclass, field
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


def sbatch_command(cfg: SlurmSettings, tasks: int, script: Path, out_dir: Path, first_task: int = 0,
                   after: Optional[str] = None) -> List[str]:
    """The sbatch command line of one array job of a launch: `tasks` tasks (indices 0..tasks-1),
    the launch's tasks first_task.. (the job script's argument); `after`: the job id of the
    launch's previous array job, which this one waits for so that array_parallelism bounds
    the whole launch."""
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
    if after:
        cmd.append(f"--dependency=afterany:{after}")
    return cmd + list(cfg.sbatch_args) + [str(script), str(first_task)]


DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's own default


def max_array_size() -> int:
    """The cluster's MaxArraySize (`scontrol show config`): an array's indices must be below
    it. Slurm's default when scontrol is missing or does not say (sbatch then tells)."""
    if shutil.which("scontrol") is None:
        return DEFAULT_MAX_ARRAY_SIZE
    p = run_command(["scontrol", "show", "config"], COMMAND_TIMEOUT_S)
    m = re.search(r"^\s*MaxArraySize\s*=\s*([0-9]{1,10})\s*$", p.stdout or "", re.M) if p.returncode == 0 else None
    if not m:
        return DEFAULT_MAX_ARRAY_SIZE
    n = int(m.group(1))
    if n < 1:
        raise SlurmError("this cluster allows no job arrays (MaxArraySize = 0 in `scontrol show config`), "
                         "which --backend slurm submits")
    return n


def arrays(tasks: int, limit: int) -> List[Tuple[int, int]]:
    """A launch's `tasks` array tasks split into array jobs whose indices stay below `limit`:
    (first task of the launch, tasks) of each."""
    return [(first, min(limit, tasks - first)) for first in range(0, tasks, limit)]


# what sbatch says when a per-user (or per-account) limit on submitted jobs refuses a job
LIMIT_WORDS = ("MaxSubmitJob", "job submit limit", "SubmitJobLimit")


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
    job_id: Optional[str]  # the first array job's
    submitted: List[str]
    skipped: Dict[str, str]  # run id -> why
    script: Optional[Path] = None
    job_ids: List[str] = field(default_factory=list)  # every array job of the launch (MaxArraySize splits it)


def unwritten_runs(store: Store, live: Dict[str, Task]) -> Dict[str, str]:
    """Run id -> array task, for the runs of launches Slurm still has: a run whose directory
    is not written yet (a big launch writes them after sbatch) may be queued all the same."""
    jobs = {t.split("_")[0] for t in live}
    out: Dict[str, str] = {}
    launches = store.root / "_slurm"
    for d in sorted(launches.iterdir()) if jobs and launches.is_dir() else []:
        try:
            job = read_json(d / "job.json")
            if not isinstance(job, dict) or not jobs & set(job.get("job_ids") or []):
                continue
            for i, rid in enumerate(job["runs"]):
                task = "_".join(map(str, task_of(i, job)))
                if task in live:
                    out[rid] = task
        except (OSError, RunFileError, KeyError, TypeError, ValueError):
            continue  # a damaged or older record: its runs have their directories
    return out


def _plan(store: Store, run_ids: List[str], rerun: bool, live: Dict[str, Task]) -> Tuple[List[RunDir], dict]:
    todo, skipped = [], {}
    unwritten = None
    for rid in run_ids:
        run = RunDir(store.root / rid)
        if not os.path.lexists(run.path):  # a new run of a big grid, or one whose directory is still to be written
            unwritten = unwritten_runs(store, live) if unwritten is None else unwritten
            if rid in unwritten:
                skipped[rid] = f"already queued in Slurm job {unwritten[rid]} (its directory is still to be written)"
            else:
                todo.append(run)
            continue
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


def queued_status(job_id: str, index: int, per_task: int, launch: str) -> dict:
    """The status of a run submitted as task `index` of array job `job_id`."""
    return {"state": "queued", "backend": "slurm", "slurm_job_id": job_id, "slurm_array_index": index,
            "slurm_job": f"{job_id}_{index}", "slurm_runs_per_task": per_task, "slurm_launch": launch,
            "submitted_at": now_iso(), "updated_at": now_iso(), "error": None}


def task_of(i: int, job: dict) -> Tuple[str, int]:
    """(array job id, array index) of line i of a launch's runs.txt, from its job.json."""
    t = i // job["per_task"]
    for a in job["arrays"]:
        if a["first_task"] <= t < a["first_task"] + a["tasks"]:
            return a["job_id"], t - a["first_task"]
    raise ValueError(f"run {i} of the launch is in no array job of it")


INLINE_RUNS = 200  # more new run directories than this are written by a detached process after sbatch


def _write_launch(store: Store, todo: List[RunDir], new: set, specs: Dict[str, dict], cfg: SlurmSettings,
                  python: str) -> Path:
    """A launch's directory STORE/_slurm/LAUNCH: runs.txt, specs.jsonl and the job script."""
    k = cfg.per_gpu
    # its own directory even for two submissions of one process in one second (the TUI's
    # `r` on two runs): a shared one would make the first job train the second's runs
    (store.root / "_slurm").mkdir(parents=True, exist_ok=True)
    sub = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-",
                                dir=store.root / "_slurm"))
    runs_file = sub / "runs.txt"
    root = str(store.root.resolve())  # once: a run directory is never a link (RunDir.check_dir)
    atomic_write_bytes(runs_file, "".join(f"{os.path.join(root, r.id)}\n" for r in todo).encode())
    # line i: the spec of line i of runs.txt when its directory is still to be written, else null
    atomic_write_bytes(sub / SPECS_FILE, "".join(json.dumps({"id": r.id, "spec": specs[r.id] if r.id in new else None})
                                                 + "\n" for r in todo).encode())
    script = sub / "job.sh"
    atomic_write_bytes(script, (
        "#!/bin/bash\n"
        "# written by gaussreg: array task i of the array job whose first task is $1 trains lines\n"
        "# ($1+i)*P.. of runs.txt (P runs per task)\n"
        f"export GAUSSREG_BACKEND=slurm PYTHONUNBUFFERED=1 GAUSSREG_SLURM_LAUNCH={_q(sub.name)} "
        f"GAUSSREG_SLURM_GPUS={cfg.gpus_per_run}\n"
        f"exec {_q(python)} -m gaussreg.launch.slurm task {_q(str(runs_file.resolve()))} --per-task {k} "
        "--first-task \"${1:-0}\"\n").encode())
    script.chmod(0o755)
    return sub


def _sbatch_arrays(store: Store, cfg: SlurmSettings, tasks: int, limit: int, sub: Path):
    """sbatch each array job of a launch, in order, until one is refused: (the accepted jobs
    as {job_id, first_task, tasks}, their commands, the refusal or None). A refusal of the
    first is raised, with the launch's directory removed: nothing was submitted."""
    done: List[dict] = []
    commands: List[List[str]] = []
    for first, n in arrays(tasks, limit):
        cmd = sbatch_command(cfg, n, (sub / "job.sh").resolve(), sub.resolve(), first,
                             after=done[-1]["job_id"] if done and cfg.array_parallelism else None)
        try:
            p = run_command(cmd, SBATCH_TIMEOUT_S, cwd=str(store.root),
                            after=" Slurm may have queued the job anyway: check `squeue --me` and scancel it")
            if p.returncode != 0:
                why = (p.stderr or p.stdout).strip()[:500]
                limit_hit = any(w.lower() in why.lower() for w in LIMIT_WORDS)
                raise SlurmError(f"sbatch refused the job{' (a limit on the jobs you may submit)' if limit_hit else ''}"
                                 f": {why}")
            done.append({"job_id": parse_job_id(p.stdout), "first_task": first, "tasks": n})
            commands.append(cmd)
        except SlurmError as e:
            if not done:
                shutil.rmtree(sub, ignore_errors=True)  # nothing was submitted: leave no launch behind
                raise
            return done, commands, e
    return done, commands, None


def _record(store: Store, sub: Path, job: dict, submitted: List[RunDir], new: set, python: str) -> None:
    """The queued status of each submitted run, naming its array task: rewritten for the runs
    that have a directory, written with the directory for the others (by a detached process
    for more than INLINE_RUNS of them)."""
    made = [i for i, r in enumerate(submitted) if r.id in new]
    for i, run in enumerate(submitted):
        if run.id in new:
            continue
        jid, idx = task_of(i, job)
        try:
            old = run.status()
        except RunFileError:
            old = {}
        if old.get("slurm_job") == f"{jid}_{idx}":
            continue  # the task already started and wrote its own status
        keep = {key: old[key] for key in ("epoch", "max_epochs") if key in old}
        run.write_status({**keep, **queued_status(jid, idx, job["per_task"], sub.name)})
    if len(made) > INLINE_RUNS:
        write_runs_detached(sub, python)
    else:
        write_runs(store, sub, made)


def submit(store: Store, run_ids: List[str], cfg: SlurmSettings, rerun: bool = False,
           python: str = sys.executable, specs: Optional[Dict[str, dict]] = None) -> Submission:
    """Submit the runs that need training as array jobs of at most MaxArraySize tasks each;
    write each one's queued status with its array task. Runs already queued or running in
    Slurm are left alone. `specs`: the spec of each run whose directory may not exist yet:
    those directories are written after sbatch (a task that starts first makes its own from
    specs.jsonl), so a big grid is submitted in seconds. A refusal by sbatch after the first
    array job leaves the submitted ones recorded and says which runs were not submitted."""
    problem = store_path_problem(store.root)
    if problem:
        raise SlurmError(problem)
    require("sbatch", "squeue")
    todo, skipped = _plan(store, run_ids, rerun, squeue())
    if not todo:
        return Submission(None, [], skipped)
    limit = max_array_size()
    specs = specs or {}
    new = {r.id for r in todo if r.id in specs and not os.path.lexists(r.spec_file)}
    for run in todo:
        if run.id in new:
            continue
        if rerun and run.state() in FINISHED:
            run.forget_results()
        run.cancel_request.unlink(missing_ok=True)
    k = cfg.per_gpu
    sub = _write_launch(store, todo, new, specs, cfg, python)
    done, commands, refused = _sbatch_arrays(store, cfg, math.ceil(len(todo) / k), limit, sub)
    submitted = todo[:min(len(todo), sum(a["tasks"] for a in done) * k)]
    # the settings, so that a run of this launch can be resubmitted the same way (resubmit)
    job = {"job_id": done[0]["job_id"], "job_ids": [a["job_id"] for a in done], "arrays": done,
           "max_array_size": limit, "runs": [r.id for r in submitted], "per_task": k, "command": commands[0],
           "commands": commands, "submitted_at": now_iso(), "settings": asdict(cfg)}
    atomic_write_json(sub / "job.json", job)
    _record(store, sub, job, submitted, new, python)
    ids = ", ".join(job["job_ids"])
    if refused is not None:
        raise SlurmError(f"{len(submitted)} of {len(todo)} run(s) were submitted as Slurm array job(s) {ids} and "
                         f"recorded, the other {len(todo) - len(submitted)} were not, because {refused}; run the "
                         "same command again later to submit the rest (it skips the submitted ones)")
    return Submission(done[0]["job_id"], [r.id for r in submitted], skipped, sub / "job.sh", job["job_ids"])


SPECS_FILE = "specs.jsonl"
WRITER_LOG = "write-runs.log"


def _launch_specs(sub: Path) -> List[Optional[dict]]:
    lines = read_bytes_nofollow(sub / SPECS_FILE, MAX_PLAN).decode().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def write_runs(store: Store, sub: Path, lines: Optional[List[int]] = None) -> int:
    """The run directories of a launch that did not exist at submission (those lines of
    runs.txt, default every such line), each with its spec and its queued status naming its
    array task; a directory a task made first is left as it is (create-if-absent)."""
    job = read_json(sub / "job.json")
    specs = _launch_specs(sub)
    lines = range(len(job["runs"])) if lines is None else lines
    n = 0
    for i in lines:
        entry = specs[i]
        if entry.get("spec") is None:
            continue
        jid, idx = task_of(i, job)
        store.create(entry["spec"], entry["id"], queued_status(jid, idx, job["per_task"], sub.name))
        n += 1
    return n


def write_runs_detached(sub: Path, python: str = sys.executable) -> None:
    """write_runs in a process of its own that outlives this one (logout included), so a big
    launch returns once sbatch has answered; its output goes to the launch's write-runs.log."""
    with open(sub / WRITER_LOG, "ab") as log:
        subprocess.Popen([python, "-m", "gaussreg.launch.slurm", "write-runs", str(sub.resolve())],
                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


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

def _make_missing(runs_file: Path, paths: List[str], lines: range) -> None:
    """The directories of this task's runs that the submission has not written yet (it
    writes a big launch's after sbatch), from the launch's specs.jsonl: the task never waits
    for them. Create-if-absent, so the submission's writer and the task can race."""
    try:
        specs = _launch_specs(runs_file.parent)
    except (OSError, RunFileError, ValueError):
        return  # a launch of an older gaussreg: every directory was written before sbatch
    try:  # absent when the task starts before the submission has written it: the worker writes the status
        job = read_json(runs_file.parent / "job.json")
    except RunFileError:
        job = None
    for i in lines:
        entry = specs[i] if i < len(specs) else None
        path = Path(paths[i])
        if not entry or entry.get("spec") is None or entry.get("id") != path.name:
            continue
        if os.path.lexists(RunDir(path).spec_file):
            continue
        try:
            status = queued_status(*task_of(i, job), job["per_task"], runs_file.parent.name) if job else None
        except (KeyError, TypeError, ValueError):
            status = None
        try:
            Store(path.parent).create(entry["spec"], entry["id"], status)
        except (OSError, RunFileError) as e:
            print(f"cannot write the run directory {path}: {e}", flush=True)


def _task(runs_file: Path, per_task: int, first_task: int = 0) -> int:
    idx = first_task + int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    lines = [l for l in read_bytes_nofollow(runs_file, MAX_PLAN).decode().splitlines() if l.strip()]
    _make_missing(runs_file, lines, range(idx * per_task, min(len(lines), (idx + 1) * per_task)))
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
    else:
        # a task given no GPU: on a node without device cgroups every GPU of the node is
        # visible, and device = "auto" would train on GPU 0 beside another job's run
        # (as `--gpus none` hides them locally)
        env["CUDA_VISIBLE_DEVICES"] = ""
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

def pending_reasons(run_ids: List[str], store: Store, live: Dict[str, Task],
                    unwritten: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Run id -> Slurm's pending reason, for queued runs whose task is pending (`unwritten`:
    the array task of each run whose directory is still to be written, unwritten_runs)."""
    out = {}
    for rid in run_ids:
        try:
            status = RunDir(store.root / rid).status()
        except RunFileError:
            continue
        t = live.get(status.get("slurm_job") or (unwritten or {}).get(rid, ""))
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
    t.add_argument("--first-task", type=int, default=0, help="the launch's task that is this array job's index 0")
    w = sub.add_parser("write-runs", help="write the run directories of a submitted launch (started by submit)")
    w.add_argument("launch_dir")
    args = ap.parse_args(argv)
    if args.cmd == "write-runs":
        d = Path(args.launch_dir)
        print(f"{now_iso()} writing the run directories of {d.name}", flush=True)
        n = write_runs(Store(d.parent.parent), d)
        print(f"{now_iso()} wrote {n} run directories", flush=True)
        return 0
    return _task(Path(args.runs_file), args.per_task, args.first_task)


if __name__ == "__main__":
    sys.exit(main())
