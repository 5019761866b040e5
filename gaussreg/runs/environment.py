"""What a worker learns from the environment it was started in: whether a Slurm array task
started it (and which), whether that task was given GPUs, and what a stop signal means there.
gaussreg.launch.slurm sets these variables in the job script; the worker only reads them."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Optional, Tuple

from gaussreg.runs.store import RunDir


def watch_parent(signum: int = signal.SIGTERM) -> Optional[int]:
    """The process that started this one (GAUSSREG_PARENT_PID), made to stop us when it
    dies: Linux sends `signum` on its death (PR_SET_PDEATHSIG); elsewhere the caller
    checks `orphaned`. None when no parent asked to be watched. Used by the worker (SIGTERM:
    a cancel that keeps last.pt) and by the dry-run's check of user code (SIGKILL: nothing
    to keep, and a user's code may catch SIGTERM)."""
    parent = os.environ.pop("GAUSSREG_PARENT_PID", None)
    if not parent or not parent.isdigit():
        return None
    if sys.platform.startswith("linux"):
        try:
            PR_SET_PDEATHSIG = 1
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the caller's own check of orphaned() still stops it
    return int(parent)


def orphaned(parent: Optional[int]) -> bool:
    """Whether the watched parent died (we were re-parented); also covers a parent that
    died before watch_parent asked the kernel to follow it."""
    return parent is not None and os.getppid() != parent


def stop_state(run: RunDir, signum: int) -> Tuple[str, str]:
    """How a worker stopped by `signum` ends: under Slurm a SIGTERM nobody asked for
    through `gaussreg cancel` is preemption or the time limit, so the run is
    `interrupted` (Slurm requeues it; it resumes from last.pt)."""
    name = signal.Signals(signum).name
    if (os.environ.get("GAUSSREG_BACKEND") == "slurm" and signum == signal.SIGTERM
            and not run.cancel_request.exists()):
        return "interrupted", (f"stopped by Slurm ({name}: preemption or time limit); "
                               "last.pt holds the last finished epoch and a requeue resumes from it")
    return "cancelled", f"cancelled by {name}; last.pt holds the last finished epoch"


def worker_fields() -> dict:
    """What a worker started by an array task records in status.json."""
    if os.environ.get("GAUSSREG_BACKEND") != "slurm":
        return {}
    jid, idx = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    out = {"backend": "slurm", "slurm_job_id": jid or os.environ.get("SLURM_JOB_ID"),
           "slurm_array_index": int(idx) if idx and idx.isdigit() else None,
           "slurm_runs_per_task": int(os.environ.get("GAUSSREG_RUNS_PER_TASK", "1")),
           "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
           "slurm_launch": os.environ.get("GAUSSREG_SLURM_LAUNCH")}  # STORE/_slurm/<this>/job.json: its settings
    out["slurm_job"] = f"{jid}_{idx}" if jid and idx else out["slurm_job_id"]
    return out


def gpu_task() -> bool:
    """Whether this array task was given GPUs (`gpus_per_run` > 0, written into the job script)."""
    n = os.environ.get("GAUSSREG_SLURM_GPUS", "0")
    return n.isdigit() and int(n) > 0
