"""What a worker learns from the environment it was started in: whether a Slurm array task
started it (and which), whether that task was given GPUs, and what a stop signal means there.
gaussreg.launch.slurm sets these variables in the job script; the worker only reads them."""

from __future__ import annotations

import os
import signal
from typing import Tuple

from gaussreg.runs.store import RunDir


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
