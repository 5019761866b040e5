"""Where and how a process computes: the torch device of a spec, CPU threads, the
allocator, determinism, and telling out-of-memory apart. The worker, the CLI's
evaluation commands and the benchmark share these; torch is imported on call."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from typing import Optional

from gaussreg.core.schema import SpecError


def keep_freed_memory() -> bool:
    """Stop glibc from handing freed blocks over 32 MB back to the OS. Otherwise every
    training step gets fresh pages for its activations, which the kernel faults in and
    zeroes: measured at ~35% of a LeNet step on CPU, and twice that for the regularizer,
    whose steps allocate twice as much."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes  # here: only on Linux, only for glibc's malloc
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))


def _cuda_unusable_reason() -> str:
    """Why this torch cannot use CUDA here, in a few words."""
    import torch  # here: the CLI checks device names without torch
    if torch.version.cuda is None:
        return "it is a CPU-only build; install a CUDA build of torch"
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - torch's own words are the most precise reason
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return first.rstrip(".")
    return f"CUDA {torch.version.cuda} finds {torch.cuda.device_count()} device(s)"


def pick_device(name: str, gpu_slot: Optional[str] = None):
    """The torch device for a spec's `device`. gpu_slot: the GPU the scheduler gave this
    run (GAUSSREG_GPU); then a GPU it must be, never a silent CPU run (unless the spec
    says "cpu")."""
    import torch  # here: the CLI checks device names without torch
    if gpu_slot and name != "cpu" and not torch.cuda.is_available():
        raise SpecError("device", f"this run was given GPU {gpu_slot} (CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}) but torch {torch.__version__} (CUDA "
                        f"{torch.version.cuda or 'none'}) cannot use it: {_cuda_unusable_reason()}; "
                        "it does not train on the CPU instead (`--gpus none` runs on the CPU)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecError("device", f"device {name!r} was asked for but CUDA is not available here")
    return dev


def device_name(dev) -> str:
    import torch  # here: the CLI checks device names without torch
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({cpu_model()})"


def cpu_model() -> str:
    """The processor's name ("Intel(R) Xeon(R) Processor"); platform.processor() says only
    "x86_64" on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown processor"


# How allocation failures read when they are not torch.OutOfMemoryError: the CPU allocator's,
# and cuBLAS's and cuDNN's, which allocate their own workspaces and raise a plain RuntimeError.
OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory", "cublas_status_alloc_failed",
               "cudnn_status_alloc_failed", "not enough workspace", "cudnn_status_not_enough_workspace")


def out_of_memory(e: BaseException) -> bool:
    """A CUDA out-of-memory error, a cuBLAS/cuDNN allocation failure, or the CPU allocator's."""
    import torch  # here: the CLI checks device names without torch
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    text = str(e).lower()
    return isinstance(e, (MemoryError, oom)) or (isinstance(e, RuntimeError) and any(m in text for m in OOM_MARKERS))


def oom_kill_count() -> Optional[int]:
    """How many processes the kernel's out-of-memory killer has killed on this machine
    (/proc/vmstat's oom_kill, which counts cgroup-limit kills too), or None where it is not
    counted. A worker that died of SIGKILL while this grew was, in all likelihood, one of them:
    such a death leaves nothing in worker.log."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def worker_environment(store_root: Optional[str] = None) -> dict:
    """The settings every worker gets unless its environment already has them:
    - expandable segments: packed runs on one GPU fragment the caching allocator less;
    - one inductor compile thread: each worker would otherwise start a compile pool of up to
      32 processes, times --per-gpu runs at once;
    - one inductor/Triton cache per user in the node's /tmp, shared by every worker of the node
      and never on the store's (often network) filesystem."""
    cache = os.path.join("/tmp", f"gaussreg-inductor-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
    if store_root and os.path.realpath(cache).startswith(os.path.realpath(store_root) + os.sep):
        cache = os.path.join(os.path.expanduser("~"), ".cache", "gaussreg-inductor")  # only if /tmp is in the store
    return {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TORCHINDUCTOR_COMPILE_THREADS": "1",
            "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}


def apply_worker_environment(store_root: Optional[str] = None) -> dict:
    """Set worker_environment()'s defaults in this process, before torch starts CUDA or
    inductor (both read them on first use); the user's own values win. What was set."""
    added = {k: v for k, v in worker_environment(store_root).items() if k not in os.environ}
    os.environ.update(added)
    return added


def make_deterministic() -> None:
    """GPU runs repeat only with cuDNN's deterministic kernels, no autotuning (it may pick
    another algorithm each run) and a fixed cuBLAS workspace; the variable must be set
    before cuBLAS starts, so this runs before the device is picked. Inductor's deterministic
    mode: it would otherwise benchmark configurations of the compiled bf16 regularizer
    kernel's reductions, and near-tied ones sum in another order (TORCHINDUCTOR_DETERMINISTIC
    is read when inductor is first imported, which costs seconds a worker that never compiles
    need not pay). TF32 off, for fp32 and for the fp32 parts of bf16 runs (the ADF variances):
    fp32 means IEEE fp32 on Ampere and later too. Strict `use_deterministic_algorithms` is
    left off: CUDA NLLLoss has no deterministic kernel."""
    import torch  # here: the CLI checks device names without torch
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("TORCHINDUCTOR_DETERMINISTIC", "1")
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None and hasattr(inductor, "deterministic"):
        inductor.deterministic = os.environ["TORCHINDUCTOR_DETERMINISTIC"] == "1"
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def threads_from_env() -> None:
    """The CPU thread count the scheduler gave this worker (GAUSSREG_THREADS), if any."""
    threads = os.environ.get("GAUSSREG_THREADS")
    if threads:
        import torch  # here: the CLI checks device names without torch
        torch.set_num_threads(int(threads))


def bf16_native(dev) -> bool:
    """Whether the device does bf16 matrix work in hardware: a CUDA GPU that supports bf16
    (Ampere on), a CPU with AVX512-BF16 or AMX (as torch's own CPU dispatch detects them).
    Elsewhere bf16 autocast is emulated and slower than fp32."""
    import torch  # here: the CLI checks device names without torch
    if dev.type == "cuda":
        # is_bf16_supported() also counts emulation (V100, T4, P100), where bf16 is slower than
        # fp32: native bf16 tensor cores start at compute capability 8.0 (Ampere)
        return torch.cuda.get_device_capability(dev) >= (8, 0) and bool(torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    return bool(cpu_bf16_units())


def cpu_bf16_units() -> list:
    """The bf16 matrix units of this CPU, as torch's own CPU dispatch detects them: a subset
    of ["amx", "avx512_bf16"] (AMX makes bf16 steps ~0.40 of fp32, avx512_bf16 alone ~0.46:
    bench/README.md)."""
    import torch  # here: the CLI checks device names without torch
    cpu = getattr(torch, "cpu", None)
    checks = {"amx": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return [unit for unit, probe in checks.items() if getattr(cpu, probe, lambda: False)()]


def resolve_precision(requested: str, dev) -> str:
    """The precision a run computes in on `dev`: "auto" is bf16 where the device does bf16
    natively (bench/README.md: parity with fp32 measured), else fp32."""
    if requested == "auto":
        return "bf16" if bf16_native(dev) else "fp32"
    return requested


def autocast(dev, precision: str):
    """The forward passes of a run (training, validation, R, certification) under bf16
    autocast, or plain fp32. Backward passes run outside it, as torch recommends."""
    import torch  # here: the CLI checks device names without torch
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def prefer_channels_last(model, precision: str):
    """Conv models in bf16 train faster in channels_last (NHWC) memory format: oneDNN's
    and cuDNN's bf16 convolutions work in it, and NCHW costs a reorder per layer
    (bench/README.md). fp32 keeps NCHW so that fp32 results stay bitwise as before."""
    import torch  # here: the CLI checks device names without torch
    if precision == "bf16" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return model.to(memory_format=torch.channels_last), True
    return model, False


def repeatability(dev) -> dict:
    """What a GPU run's numbers depend on besides the spec (result.json's `repeatability`):
    CUDA and cuDNN versions, the driver, the GPU's name and UUID, TF32 and inductor's
    deterministic mode; the GPU fields are None on a CPU."""
    import torch  # here: the CLI checks device names without torch
    inductor = sys.modules.get("torch._inductor.config")
    out = {"cuda": None, "cudnn": None, "driver": None, "gpu_name": None, "gpu_uuid": None,
           "tf32": bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32),
           "inductor_deterministic": bool(getattr(inductor, "deterministic", False)) if inductor is not None
           else os.environ.get("TORCHINDUCTOR_DETERMINISTIC") == "1"}
    if dev.type != "cuda":
        return out
    props = torch.cuda.get_device_properties(dev)
    uuid = getattr(props, "uuid", None)
    out.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), driver=nvidia_driver(),
               gpu_name=props.name, gpu_uuid=None if uuid is None else (
                   str(uuid) if str(uuid).startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"))
    return out


def nvidia_driver() -> Optional[str]:
    """The NVIDIA driver's version (nvidia-smi; one driver serves every GPU of a machine), or None."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None
