"""The GPUs this machine has and how runs share them: nvidia-smi's inventory (GPUs, MIG
devices, UUIDs), the names CUDA_VISIBLE_DEVICES takes, compute modes, the usable cores,
and the places a store's launches lock on each GPU and on the CPU (STORE/_gpus), also for runs
started outside a scheduler."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import psutil

from gaussreg.runs.store import RunDir, RunFileError, Store, read_json


# the CPU's places (a launch's CPU runs, --max-parallel) lie beside the GPUs' in STORE/_gpus: a
# GPU's name is an index, a UUID or a MIG id, never this
CPU_PLACE = "cpu"


class GpuPlaceError(Exception):
    """Every place on the visible GPUs is taken; one sentence saying what to do."""


_GPU_UUID = re.compile(r"GPU-[0-9a-fA-F-]+")
# a MIG device: `MIG-<uuid>` (drivers >= R470) or `MIG-GPU-<gpu uuid>/<gi>/<ci>` (R450/R460)
_MIG_ID = re.compile(r"MIG-(GPU-[0-9a-fA-F-]+/\d+/\d+|[0-9a-fA-F-]+)")
_L_GPU = re.compile(r"^GPU (\d+):.*\(UUID: (GPU-[^)\s]+)\)")
_L_MIG = re.compile(r"^\s+MIG .*\(UUID: (MIG-[^)\s]+)\)")


@dataclass
class NvidiaGpu:
    index: str  # nvidia-smi's index (PCI bus order)
    uuid: str
    migs: List[str] = field(default_factory=list)  # its MIG devices' ids; then these are what runs use


def _nvidia_smi(*args: str) -> str:
    if not shutil.which("nvidia-smi"):
        return ""
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def nvidia_gpus() -> List[NvidiaGpu]:
    """Every GPU nvidia-smi reports, with its UUID (`--query-gpu=index,uuid`, a stable format)
    and its MIG devices (`-L`, whose MIG lines are indented under their GPU)."""
    gpus: Dict[str, NvidiaGpu] = {}
    for line in _nvidia_smi("--query-gpu=index,uuid", "--format=csv,noheader").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and _GPU_UUID.fullmatch(parts[1]):
            gpus[parts[0]] = NvidiaGpu(parts[0], parts[1])
    current = None
    for line in _nvidia_smi("-L").splitlines():
        m = _L_GPU.match(line)
        if m:
            current = gpus.setdefault(m.group(1), NvidiaGpu(m.group(1), m.group(2)))
            continue
        m = _L_MIG.match(line)
        if m and current is not None:
            current.migs.append(m.group(1))
    return [gpus[i] for i in sorted(gpus, key=int)]


def _units(gpu: NvidiaGpu) -> List[str]:
    """What CUDA_VISIBLE_DEVICES names for runs on this GPU: its MIG devices when it is
    partitioned (a CUDA process uses one MIG device, never the whole GPU), else its index."""
    return list(gpu.migs) or [gpu.index]


def canonical_gpu(name: str, table: Optional[List[NvidiaGpu]] = None) -> str:
    """One name per GPU, whatever CUDA_VISIBLE_DEVICES or --gpus calls it: the UUID for an
    index, a UUID prefix (CUDA accepts one) or a UUID; a MIG id as it is. Without nvidia-smi,
    the name itself."""
    table = nvidia_gpus() if table is None else table
    for g in table:
        if name == g.index or name == g.uuid:
            return g.uuid
    if _GPU_UUID.fullmatch(name):
        found = [g.uuid for g in table if g.uuid.lower().startswith(name.lower())]
        if len(found) == 1:
            return found[0]
    return name


def detect_gpus(table: Optional[List[NvidiaGpu]] = None) -> List[str]:
    """The GPUs (or MIG devices) this process may use, as CUDA_VISIBLE_DEVICES names them:
    $CUDA_VISIBLE_DEVICES when set, else every GPU nvidia-smi lists. A GPU split into MIG
    devices counts as its MIG devices, one run each."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"] if env is not None else None
    if names == []:
        return []  # "" hides every GPU: no need to ask nvidia-smi
    table = nvidia_gpus() if table is None else table
    if names is None:
        return [u for g in table for u in _units(g)]
    out = []
    for name in names:
        whole = next((g for g in table if g.migs and canonical_gpu(name, table) == g.uuid), None)
        out += whole.migs if whole else [name]
    return list(dict.fromkeys(out))


def _gpu_name_ok(part: str) -> bool:
    return part.isdigit() or bool(_GPU_UUID.fullmatch(part) or _MIG_ID.fullmatch(part))


def parse_gpus(arg: str) -> List[str]:
    """'auto' and 'all' (every visible GPU; none on a CPU box: launch.resolve_gpus refuses
    an explicit 'all' there), 'none', or a list of indices into the visible GPUs ('0,1'),
    GPU UUIDs ('GPU-8f3c...') and MIG ids ('MIG-...', 'MIG-GPU-<uuid>/<gi>/<ci>')."""
    arg = arg.strip()
    if arg in ("auto", "all"):
        return detect_gpus()
    if arg == "none":
        return []
    parts = [p.strip() for p in arg.split(",")]
    if not all(_gpu_name_ok(p) for p in parts):
        raise ValueError(f"--gpus must be 'auto', 'all', 'none' or a list of GPU indices ('0,1'), UUIDs "
                         f"('GPU-...') or MIG ids ('MIG-...'), not {arg!r}")
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


MPS_CONTROL = "nvidia-cuda-mps-control"
MPS_PIPE_DEFAULT = "/tmp/nvidia-mps"


def mps_running() -> bool:
    """Whether NVIDIA's MPS daemon serves this machine: its control process is visible, or
    its control pipe is in the pipe directory (CUDA_MPS_PIPE_DIRECTORY, else /tmp/nvidia-mps;
    the pipe is what a container sees of a daemon started on the host). Under MPS the GPU's
    one process is the MPS server, so EXCLUSIVE_PROCESS mode (the mode NVIDIA recommends for
    MPS) still lets many workers share the GPU, and their kernels overlap."""
    try:
        if any(p.info["name"] == MPS_CONTROL for p in psutil.process_iter(["name"])):
            return True
    except psutil.Error:
        pass
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or MPS_PIPE_DEFAULT) / "control"
    try:
        return stat.S_ISFIFO(pipe.stat().st_mode)
    except OSError:
        return False


def wants_gpu(run: RunDir) -> bool:
    """Whether the run's spec may train on a GPU (not `device = "cpu"`); a spec that cannot be
    read counts as yes (the worker refuses it with its own message)."""
    try:
        spec = read_json(run.spec_file)
    except RunFileError:
        return True
    return not (isinstance(spec, dict) and spec.get("device") == "cpu")


def take_gpu_place(store: Store) -> Optional[Tuple[str, int]]:
    """For a run started outside a scheduler (`gaussreg train`): the first GPU
    this process sees with a free place in the store (STORE/_gpus, the places `--per-gpu`
    counts), as (its CUDA_VISIBLE_DEVICES name, the locked place's fd). A GPU no launch has
    made places for has one. None when no GPU is visible; ControlError when all are taken."""
    table = nvidia_gpus()
    visible = detect_gpus(table)
    if not visible:
        return None
    for gpu in visible:
        name = canonical_gpu(gpu, table)
        try:
            fd = store.lock_gpu_share(name, max(1, store.gpu_places_made(name)))
        except (OSError, RunFileError):  # no flock or an unwritable store: places cannot be counted
            return None
        if fd is not None:
            return gpu, fd
    raise GpuPlaceError(f"every place on the GPUs this process sees ({', '.join(visible)}) is taken by runs of "
                       f"store {store.root} ({store.root / '_gpus'}, --per-gpu of their launches); try again when "
                       "one ends, or train it on the CPU with `device = \"cpu\"` in its spec")
