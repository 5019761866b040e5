"""A launch request: what to train, where, and how many at once; validated in-process,
then turned into exactly one scheduler process by `launch`. The CLI (`gaussreg run`)
and the TUI's launch dialog both go through here, so a bad value is refused the same
way before anything says "launched", and one launch owns its GPUs and cores."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .scheduler import Slot, detach_run, detect_gpus, make_slots, parse_gpus
from .store import Store


class LaunchError(Exception):
    """A launch request cannot be carried out; the message says what is wrong, in one sentence."""


@dataclass(frozen=True)
class LaunchRequest:
    manifest: str = "experiments.toml"
    store: str = "runs"
    experiments: Tuple[str, ...] = ()  # exact names; empty: every experiment
    only: Optional[str] = None  # a glob over experiment names, run ids and methods
    gpus: str = "all"
    per_gpu: int = 1
    max_parallel: Optional[int] = None
    rerun: bool = False
    data_dir: Optional[str] = None

    def argv(self) -> List[str]:
        """The `gaussreg run` arguments that carry out this request."""
        a = [str(self.manifest), "--store", str(self.store), "--gpus", self.gpus, "--per-gpu", str(self.per_gpu)]
        for e in self.experiments:
            a += ["--experiment", e]
        a += ["--only", self.only] if self.only else []
        a += ["--max-parallel", str(self.max_parallel)] if self.max_parallel else []
        a += ["--rerun"] if self.rerun else []
        a += ["--yes"]  # whoever made the request accepted its size
        a += ["--data-dir", str(self.data_dir)] if self.data_dir else []
        return a


@dataclass
class Plan:
    request: LaunchRequest
    manifest: object  # manifest.Manifest
    runs: list  # manifest.PlannedRun
    slots: List[Slot]
    missing_data: Dict[str, str] = field(default_factory=dict)  # dataset -> how to get it, one paragraph


def resolve_gpus(arg: str) -> List[str]:
    """The CUDA_VISIBLE_DEVICES value of each GPU asked for. Indices count the GPUs this
    process sees; asking for a GPU that is not there is an error, never a silent CPU run."""
    try:
        asked = parse_gpus(arg)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    if arg.strip() in ("all", "none"):
        return asked
    visible = detect_gpus()
    if not visible:
        raise LaunchError(f"--gpus {arg} asks for GPUs, but this machine shows none (no nvidia-smi GPU and no "
                          f"CUDA_VISIBLE_DEVICES): use --gpus none to train on the CPU")
    beyond = [g for g in asked if int(g) >= len(visible)]
    if beyond:
        raise LaunchError(f"--gpus {arg}: GPU {beyond[0]} does not exist; this machine shows {len(visible)} "
                          f"GPU(s), numbered 0 to {len(visible) - 1}")
    return [visible[int(g)] for g in asked]


def plan(req: LaunchRequest) -> Plan:
    """Everything a launch needs, checked: the manifest, the runs chosen, the slots, the data."""
    from . import data, manifest as mf
    if not Path(req.manifest).is_file():
        raise LaunchError(f"manifest {req.manifest} does not exist or is not a file")
    try:
        m = mf.load(req.manifest, data_dir=str(req.data_dir) if req.data_dir else None)
    except mf.ManifestError as e:
        raise LaunchError(str(e)) from None
    names = [e.name for e in m.experiments]
    unknown = [e for e in req.experiments if e not in names]
    if unknown:
        raise LaunchError(f"experiment {unknown[0]!r} is not in {req.manifest} (it has: {', '.join(names)})")
    runs = [r for r in m.select(req.only) if not req.experiments or r.spec.get("experiment") in req.experiments]
    if not runs:
        what = f"--only {req.only!r}" if req.only else "the experiments chosen"
        raise LaunchError(f"{what} match no run in {req.manifest}")
    if not isinstance(req.per_gpu, int) or req.per_gpu < 1:
        raise LaunchError(f"runs per GPU (--per-gpu) must be a whole number ≥ 1, not {req.per_gpu!r}")
    if req.max_parallel is not None and (not isinstance(req.max_parallel, int) or req.max_parallel < 1):
        raise LaunchError(f"parallel runs (--max-parallel) must be a whole number ≥ 1, not {req.max_parallel!r}")
    try:
        slots = make_slots(resolve_gpus(req.gpus), req.per_gpu, req.max_parallel)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    store = Path(req.store)
    if store.exists() and not store.is_dir():
        raise LaunchError(f"store {req.store} is a file, not a folder")
    missing = {name: data.missing_message(name, req.data_dir)
               for name in sorted({r.spec["dataset"] for r in runs if data.is_builtin(r.spec["dataset"])} - {"synthetic"})
               if data.find(name, req.data_dir) is None}
    return Plan(req, m, runs, slots, missing)


def launch(req: LaunchRequest) -> dict:
    """Check the request, then start one detached scheduler (`gaussreg run --follow`) for all
    of it; recorded under STORE/_launches so it can be listed and cancelled. Returns its
    record (pid, log)."""
    p = plan(req)
    if p.missing_data:
        raise LaunchError(next(iter(p.missing_data.values())))
    label = ", ".join(req.experiments) or req.only or str(req.manifest)
    return detach_run(req.argv(), Store(req.store), label)
