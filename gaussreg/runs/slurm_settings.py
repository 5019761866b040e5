"""The `[slurm]` table of a manifest (and the `gaussreg run --backend slurm` flags over it):
its keys, their types and their checks. The manifest checks it; gaussreg.launch.slurm submits
with it."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field, fields
from typing import List, Optional


class SlurmConfigError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass
class SlurmSettings:
    """The `[slurm]` manifest table and the `gaussreg run --backend slurm` flags (flags win)."""
    partition: Optional[str] = None
    time: Optional[str] = None  # Slurm's time format, e.g. 04:00:00 or 1-00:00:00
    gpus_per_run: int = 0  # 0 (the task sees no GPU) or 1: a worker trains on one GPU
    cpus_per_run: int = 1
    mem: Optional[str] = None  # per run, e.g. 16G; a task packing P runs asks for P times this
    array_parallelism: Optional[int] = None
    per_gpu: int = 1
    sbatch_args: List[str] = field(default_factory=list)
    signal: str = "B:TERM@120"  # the worker saves and stops on SIGTERM, 120 s before the time limit
    requeue: bool = True


_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")
MAX_PER_TASK = 256  # runs packed in one array task (--per-gpu): each is a worker process on its node
_MEM = re.compile(r"^(\d+)([KMGT]?)$", re.I)


def settings(table: Optional[dict] = None, overrides: Optional[dict] = None) -> SlurmSettings:
    """Validated settings from a `[slurm]` table, with non-None overrides on top.
    Raises SlurmConfigError naming the key."""
    merged = dict(table or {})
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None and v != []})
    names = {f.name: f for f in fields(SlurmSettings)}
    out = SlurmSettings()
    for key, v in merged.items():
        if key not in names:
            raise SlurmConfigError(key, f"unknown Slurm setting (known: {', '.join(names)})")
        if key in ("gpus_per_run", "cpus_per_run", "array_parallelism", "per_gpu"):
            lo = 0 if key == "gpus_per_run" else 1
            # per_gpu: worker processes one task starts on its node; the others: Slurm's 32-bit counts
            hi = MAX_PER_TASK if key == "per_gpu" else 2 ** 31 - 1
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise SlurmConfigError(key, f"must be an integer from {lo} to {hi}, not {v!r}")
            if key == "gpus_per_run" and v > 1:
                raise SlurmConfigError(key, f"must be 0 or 1, not {v}: a run trains on one GPU, so the other "
                                       f"{v - 1} would sit idle (per_gpu packs several runs on one GPU)")
        elif key == "requeue":
            if not isinstance(v, bool):
                raise SlurmConfigError(key, f"must be true or false, not {v!r}")
        elif key == "sbatch_args":
            if isinstance(v, str):
                v = shlex.split(v)
            if not isinstance(v, list) or not all(isinstance(a, str) for a in v):
                raise SlurmConfigError(key, "must be a list of strings, e.g. [\"--qos=long\"]")
        else:
            if not isinstance(v, str) or not v.strip():
                raise SlurmConfigError(key, f"must be a non-empty string, not {v!r}")
            if key == "time" and not _TIME.match(v):
                raise SlurmConfigError(key, f"must be a Slurm time like 04:00:00 or 1-00:00:00, not {v!r}")
            if key == "mem" and not _MEM.match(v):
                raise SlurmConfigError(key, f"must be a size like 16G or 4000M, not {v!r}")
        setattr(out, key, v)
    return out


def times_mem(mem: str, k: int) -> str:
    """`mem` (one run's) for a task packing k runs."""
    n, unit = _MEM.match(mem).groups()
    return f"{int(n) * k}{unit.upper()}"
