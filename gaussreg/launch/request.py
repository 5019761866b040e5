"""A launch request: what to train, where, and how many at once; validated in-process,
then turned into exactly one scheduler process by `launch`. The CLI (`gaussreg run`)
and the TUI's launch dialog both go through here, so a bad value is refused the same
way before anything says "launched", and one launch owns its GPUs and cores."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from gaussreg.data import loading as data
from gaussreg.launch import slurm
from gaussreg.launch.control import detach_plan
from gaussreg.launch.gpus import (CPU_PLACE, canonical_gpu, detect_gpus, exclusive_gpus, mps_running, nvidia_gpus,
                                  parse_gpus, usable_cpus)
from gaussreg.launch.scheduler import Slot, make_slots
from gaussreg.runs import manifest as mf
from gaussreg.runs.manifest import PlannedRun
from gaussreg.runs.store import MAX_PLAN, RunDir, RunFileError, Store, atomic_write_json, read_json, try_lock


class LaunchError(Exception):
    """A launch request cannot be carried out; the message says what is wrong, in one sentence."""


@dataclass(frozen=True)
class LaunchRequest:
    manifest: str = "experiments.toml"
    store: str = "runs"
    experiments: Tuple[str, ...] = ()  # exact names; empty: every experiment
    only: Optional[str] = None  # a glob over experiment names, run ids and methods
    gpus: str = "auto"
    per_gpu: int = 1
    max_parallel: Optional[int] = None
    rerun: bool = False
    data_dir: Optional[str] = None
    backend: str = "local"  # or "slurm": one sbatch array job instead of a local scheduler
    # Slurm settings over the manifest's [slurm] table (gaussreg.launch.slurm.settings keys; None: the table's)
    slurm: Dict[str, object] = field(default_factory=dict, hash=False)


PLAN_VERSION = 1
# --max-parallel and --per-gpu start a worker process per run: more than this many per core only
# thrashes (and a huge number would build that many slots before anything runs)
MAX_RUNS_PER_CORE = 4


@dataclass
class Plan:
    """A checked launch: what `plan` found once (the manifest read, the GPUs asked of
    nvidia-smi) and everything after it uses, the detached scheduler included (`save`/`load`)."""
    request: LaunchRequest
    manifest: object  # manifest.Manifest; None in a plan loaded from its file
    runs: list  # manifest.PlannedRun
    slots: List[Slot]  # none on Slurm: the login node's GPUs say nothing about the cluster's
    missing_data: Dict[str, str] = field(default_factory=dict)  # dataset -> how to get it, one paragraph
    slurm: object = None  # slurm.SlurmSettings of a Slurm launch
    experiments: List[dict] = field(default_factory=list)  # the chosen experiments' records (name, tolerance, manifest)

    def save(self, path: Path) -> None:
        """The plan as the detached `gaussreg run --plan FILE` reads it (written atomically)."""
        atomic_write_json(path, {"version": PLAN_VERSION, "request": asdict(self.request),
                                 "runs": [{"id": r.id, "spec": r.spec} for r in self.runs],
                                 "slots": [asdict(s) for s in self.slots], "experiments": self.experiments})

    @classmethod
    def load(cls, path: Path) -> "Plan":
        """A plan written by `save`; LaunchError naming the file when it is not one."""
        try:
            d = read_json(Path(path), MAX_PLAN)
        except RunFileError as e:
            raise LaunchError(f"launch plan {e}") from None
        try:
            if d is None:
                raise LaunchError(f"launch plan {path} does not exist")
            if not isinstance(d, dict) or d.get("version") != PLAN_VERSION:
                raise LaunchError(f"{path} is not a launch plan of this gaussreg (version {PLAN_VERSION})")
            req = d["request"]
            req = LaunchRequest(**{**req, "experiments": tuple(req["experiments"])})
            runs = [PlannedRun(r["id"], r["spec"]) for r in d["runs"]]
            slots = [Slot(**s) for s in d["slots"]]
            return cls(req, None, runs, slots, experiments=list(d["experiments"]))
        except (KeyError, TypeError) as e:
            raise LaunchError(f"launch plan {path} is incomplete or damaged ({type(e).__name__}: {e})") from None


def resolve_gpus(arg: str) -> List[str]:
    """The CUDA_VISIBLE_DEVICES value of each GPU asked for. Indices count the GPUs (or MIG
    devices) this process sees, so under CUDA_VISIBLE_DEVICES=2,3 `0` is GPU 2; a UUID or
    MIG id must be one of them too. Asking for a GPU that is not there is an error, never a
    silent CPU run; two names of one GPU give one GPU."""
    try:
        asked = parse_gpus(arg)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    if arg.strip() == "all" and not asked:
        raise LaunchError("--gpus all asks for every GPU, but this machine shows none (no nvidia-smi GPU and no "
                          "CUDA_VISIBLE_DEVICES): use --gpus none to train on this machine's CPU, or "
                          "--backend slurm to train on a cluster's GPUs")
    if arg.strip() in ("auto", "all", "none"):
        return asked
    table = nvidia_gpus()
    visible = detect_gpus(table)
    if not visible:
        raise LaunchError(f"--gpus {arg} asks for GPUs, but this machine shows none (no nvidia-smi GPU and no "
                          f"CUDA_VISIBLE_DEVICES): use --gpus none to train on the CPU")
    names = [canonical_gpu(v, table) for v in visible]
    out: List[str] = []
    for g in asked:
        if g.isdigit():
            if int(g) >= len(visible):
                raise LaunchError(f"--gpus {arg}: GPU {g} does not exist; this process sees {len(visible)} "
                                  f"GPU(s), numbered 0 to {len(visible) - 1} ({', '.join(visible)})")
            out.append(visible[int(g)])
            continue
        c = canonical_gpu(g, table)
        split = next((t for t in table if t.uuid == c and t.migs), None)  # a GPU split into MIG devices
        found = [v for v, n in zip(visible, names) if n == c or (split and n in split.migs)]
        if not found:
            raise LaunchError(f"--gpus {arg}: {g} is not among the GPUs this process may use "
                              f"({', '.join(visible)}; see nvidia-smi -L and CUDA_VISIBLE_DEVICES)")
        out += found
    # one GPU named twice (an index and its UUID) is one GPU: its places would be counted twice
    seen, unique = set(), []
    for v in out:
        n = canonical_gpu(v, table)
        if n not in seen:
            seen.add(n)
            unique.append(v)
    return unique


def plan(req: LaunchRequest, commands: bool = True) -> Plan:
    """Everything a launch needs, checked: the manifest, the runs chosen, the slots (or the
    Slurm settings, and with `commands` that sbatch and squeue are on PATH), the data."""
    if req.backend not in ("local", "slurm"):
        raise LaunchError(f"the backend must be 'local' or 'slurm', not {req.backend!r}")
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
        what = f"--only {req.only!r} matches" if req.only else "the experiments chosen match"
        raise LaunchError(f"{what} no run in {req.manifest}")
    cfg, slots = None, []
    if req.backend == "slurm":
        try:
            cfg = slurm.settings(m.slurm, req.slurm)
        except slurm.SlurmConfigError as e:
            raise LaunchError(f"Slurm setting (flag or [slurm] in {req.manifest}) {e}") from None
        problem = slurm.store_path_problem(Path(req.store))
        if problem:
            raise LaunchError(problem)
        if commands:
            try:
                slurm.require("sbatch", "squeue")
            except slurm.SlurmError as e:
                raise LaunchError(str(e)) from None
    else:
        if not isinstance(req.per_gpu, int) or req.per_gpu < 1:
            raise LaunchError(f"runs per GPU (--per-gpu) must be a whole number ≥ 1, not {req.per_gpu!r}")
        if req.max_parallel is not None and (not isinstance(req.max_parallel, int) or req.max_parallel < 1):
            raise LaunchError(f"parallel runs (--max-parallel) must be a whole number ≥ 1, not {req.max_parallel!r}")
        limit = MAX_RUNS_PER_CORE * usable_cpus()
        for flag, value in (("--per-gpu", req.per_gpu), ("--max-parallel", req.max_parallel)):
            if value is not None and value > limit:  # before a slot is made: each is a worker process
                raise LaunchError(f"{flag} {value} is more runs at once than this machine can run: at most {limit} "
                                  f"({MAX_RUNS_PER_CORE} per usable core, {usable_cpus()} core(s))")
        gpus = resolve_gpus(req.gpus)
        if req.per_gpu > 1:
            excl = exclusive_gpus(gpus)
            if excl and not mps_running():  # under MPS the one process is the MPS server
                raise LaunchError(f"GPU {excl[0]} is in EXCLUSIVE_PROCESS compute mode (nvidia-smi), which lets one "
                                  f"process use it: --per-gpu {req.per_gpu} cannot pack runs on it; start the MPS "
                                  "daemon (`nvidia-cuda-mps-control -d`, README \"GPUs\"), use --per-gpu 1, "
                                  "or have an administrator run `nvidia-smi -c DEFAULT`")
        try:
            slots = make_slots(gpus, req.per_gpu, req.max_parallel)
        except ValueError as e:
            raise LaunchError(str(e)) from None
    if not str(req.store):  # Path('') is the current folder, which nobody named (a saved plan, the TUI)
        raise LaunchError("the store is an empty path; name a folder ('.' for the current folder)")
    store = Path(req.store)
    if store.exists() and not store.is_dir():
        raise LaunchError(f"store {req.store} is a file, not a folder")
    missing = {name: data.missing_message(name, req.data_dir)
               for name in sorted({r.spec["dataset"] for r in runs if data.is_builtin(r.spec["dataset"])} - {"synthetic"})
               if data.find(name, req.data_dir) is None}
    chosen = {r.spec["experiment"] for r in runs}
    experiments = [{"name": e.name, "tolerance": e.tolerance, "manifest": str(Path(req.manifest).resolve())}
                   for e in m.experiments if e.name in chosen]
    return Plan(req, m, runs, slots, missing, cfg, experiments)


def rerun_plan(run: RunDir) -> Plan:
    """A launch that trains one run of a store again (the TUI's rerun key), to be carried out by
    `launch` like any other: a diverged run from scratch (it would diverge again from its
    checkpoint), a failed, cancelled, interrupted or queued one from its last.pt. Its slot takes
    a place as a launch's do: on a GPU box a GPU place (unless its spec says `device = "cpu"`),
    else one of the store's CPU places, with the cores divided as the launch that made them
    divides them; while every place is taken it waits (`place_wait` says so beforehand).
    LaunchError when the run is completed or being trained; RunFileError for a run directory
    that cannot be written (a symbolic link)."""
    fd = try_lock(run)
    if fd is None:
        raise LaunchError(f"run {run.id} is being trained by another process")
    try:
        spec, state = run.spec(), run.state()
    except RunFileError as e:
        raise LaunchError(str(e)) from None
    finally:
        os.close(fd)
    if state == "completed":
        raise LaunchError(f"run {run.id} is completed; use `gaussreg run --rerun` to train it again")
    store = Store(run.path.parent)
    gpus = resolve_gpus("auto") if spec.get("device") != "cpu" else []
    if gpus:  # one slot per GPU: the run takes the first that has a free place
        slots = make_slots(gpus)
        for s in slots:
            s.shares = max(1, store.gpu_places_made(s.place))
    else:
        places = max(1, store.gpu_places_made(CPU_PLACE))
        slots = make_slots([], max_parallel=places)[:1]
    req = LaunchRequest(str(run.spec_file), str(store.root), only=run.id, gpus="auto" if gpus else "none",
                        rerun=state == "diverged")
    return Plan(req, None, [PlannedRun(run.id, spec)], slots)


def place_wait(p: Plan) -> Optional[str]:
    """None when one of the plan's slots has a free place in its store now (its runs start at
    once), else one sentence saying that the launch waits, and for what."""
    st = Store(p.request.store)
    for s in p.slots:
        try:
            fd = st.lock_gpu_share(s.place or CPU_PLACE, s.shares)
        except (OSError, RunFileError):  # places cannot be counted: nothing waits for them
            return None
        if fd is not None:
            os.close(fd)
            return None
    where = ", ".join(f"GPU {s.gpu}" if s.gpu else "the CPU" for s in p.slots)
    n = sum(s.shares for s in p.slots)
    return (f"every place on {where} ({n}, as its launches made them) is taken by runs of store {st.root}: "
            "it waits for one")


def write_experiments(p: Plan) -> None:
    """The experiment records (tolerance, manifest) of the experiments a launch trains."""
    st = Store(p.request.store)
    for e in p.experiments:
        st.write_experiment(e["name"], e)


def submit_slurm(p: Plan):
    """A checked Slurm plan submitted as array jobs (slurm.submit): the runs' directories
    that do not exist yet are written after sbatch (each array task makes its own if it starts
    first), so a grid of 10,000 runs is in Slurm's queue in seconds. Returns slurm.Submission."""
    st = Store(p.request.store)
    try:
        write_experiments(p)
        return slurm.submit(st, [r.id for r in p.runs], p.slurm, rerun=p.request.rerun,
                            specs={r.id: r.spec for r in p.runs})
    except OSError as e:
        raise LaunchError(f"cannot write the Slurm launch in {st.root} ({e.strerror})") from None
    except slurm.SlurmError as e:
        raise LaunchError(str(e)) from None


def launch(what: Union[LaunchRequest, Plan]) -> dict:
    """Carry out a launch: a request is planned (checked) first, a Plan (the TUI's dialog has
    made one) is used as it is. Locally: one detached scheduler (`gaussreg run --plan FILE`)
    reads the saved plan, so nothing is planned twice; recorded under STORE/_launches so it can
    be listed and cancelled; returns its record (pid, log). On Slurm: submitted, returns
    {job_id, submitted, skipped}."""
    p = plan(what) if isinstance(what, LaunchRequest) else what
    req = p.request
    if p.missing_data:
        raise LaunchError(next(iter(p.missing_data.values())))
    if req.backend == "slurm":
        sub = submit_slurm(p)
        return {"backend": "slurm", "job_id": sub.job_id, "job_ids": sub.job_ids, "submitted": sub.submitted,
                "skipped": sub.skipped,
                "script": str(sub.script) if sub.script else None}
    label = ", ".join(req.experiments) or req.only or str(req.manifest)
    try:
        return detach_plan(p.save, Store(req.store), label)
    except OSError as e:
        raise LaunchError(f"cannot start the launch in {req.store} ({e.strerror})") from None
