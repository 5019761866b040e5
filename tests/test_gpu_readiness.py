"""GPU-path details of issue 33 checked without a GPU: which GPUs count as native bf16,
what reads as out of memory (cuBLAS, cuDNN, the kernel's OOM killer), the environment
every worker gets, and certification counting votes without a host sync."""
import json
import signal
import sys

import pytest
import torch
from factories import queued_run

from gaussreg.launch import control, scheduler
from gaussreg.runs import device
from gaussreg.runs.store import RunDir, Store
from gaussreg.science import smoothing
from gaussreg.science.robustness import certify_batch


@pytest.mark.parametrize("capability,native", [((6, 0), False), ((7, 0), False), ((7, 5), False),
                                               ((8, 0), True), ((9, 0), True)])
def test_auto_precision_takes_bf16_only_from_compute_capability_8(monkeypatch, capability, native):
    # torch's is_bf16_supported() says yes on a V100 or T4 too (emulated bf16, slower than fp32)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability)
    dev = torch.device("cuda", 0)
    assert device.bf16_native(dev) is native
    assert device.resolve_precision("auto", dev) == ("bf16" if native else "fp32")
    assert device.resolve_precision("fp32", dev) == "fp32"


@pytest.mark.parametrize("message,oom", [
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
    ("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", True),
    ("Not enough workspace for the chosen algorithm", True),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", True),
    ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes", True),
    ("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm`", False),
    ("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)", False),
])
def test_cublas_and_cudnn_allocation_failures_are_out_of_memory(message, oom):
    assert device.out_of_memory(RuntimeError(message)) is oom
    assert device.out_of_memory(ValueError(message)) is False  # only the allocators' RuntimeError
    assert device.out_of_memory(torch.OutOfMemoryError("x")) is True


def test_the_kernels_oom_kill_count_is_read_from_proc_vmstat():
    with open("/proc/vmstat") as f:
        expected = next(int(line.split()[1]) for line in f if line.startswith("oom_kill "))
    assert device.oom_kill_count() == expected


def test_a_sigkill_while_the_oom_kill_count_grew_is_called_out_of_memory(monkeypatch, tmp_path):
    monkeypatch.setattr(scheduler, "oom_kill_count", lambda: 7)
    evidence = scheduler._oom_killed(-signal.SIGKILL, 5)
    assert evidence == "/proc/vmstat oom_kill went from 5 to 7 while it ran"
    assert scheduler._oom_killed(-signal.SIGKILL, 7) is None  # nothing was OOM-killed meanwhile
    assert scheduler._oom_killed(-signal.SIGTERM, 5) is None  # not the OOM killer's signal
    assert scheduler._oom_killed(-signal.SIGKILL, None) is None  # no count where it started
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    said = scheduler._died(-signal.SIGKILL, run, None, evidence)
    assert "out-of-memory killer" in said and "from 5 to 7" in said
    assert "out-of-memory" not in scheduler._died(-signal.SIGKILL, run)  # a plain kill -9 says only that
    assert "SIGKILL" in scheduler._died(-signal.SIGKILL, run)


def test_worker_defaults_never_override_the_users_own(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "4")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    added = device.apply_worker_environment(str(tmp_path))
    assert "TORCHINDUCTOR_COMPILE_THREADS" not in added
    assert sys.modules["os"].environ["TORCHINDUCTOR_COMPILE_THREADS"] == "4"
    assert added["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert added["TORCHINDUCTOR_CACHE_DIR"].startswith("/tmp/")
    assert added["TRITON_CACHE_DIR"] == added["TORCHINDUCTOR_CACHE_DIR"] + "/triton"


def test_the_compile_cache_is_never_inside_the_store():
    # a store at / (or /tmp) would hold /tmp/...: the cache then goes to the user's home
    inside = device.worker_environment("/tmp")["TORCHINDUCTOR_CACHE_DIR"]
    assert not inside.startswith("/tmp/")
    assert device.worker_environment("/data/store")["TORCHINDUCTOR_CACHE_DIR"].startswith("/tmp/gaussreg-inductor-")


@pytest.mark.process
def test_a_started_worker_gets_the_defaults_and_keeps_the_users_values(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    # inductor sets this in its own process once it has compiled (a test before may have)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    run = queued_run(Store(tmp_path / "store"))
    dump = [sys.executable, "-c", "import json, os, sys; "
            "json.dump(dict(os.environ), open(os.path.join(sys.argv[1], 'env.json'), 'w'))"]
    proc = control.start_worker(run, resume=False, argv=dump)
    assert proc.wait(timeout=60) == 0
    env = json.loads(run.file("env.json").read_text())
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["TORCHINDUCTOR_COMPILE_THREADS"] == "3"
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith("/tmp/gaussreg-inductor-")


class Votes(torch.nn.Module):
    """Logits that vote for class (first pixel > 0) of 5: classes 2-4 never get a vote."""

    def forward(self, x):
        flat = x.flatten(1)
        logits = torch.zeros(len(x), 5)
        logits[torch.arange(len(x)), (flat[:, 0] > 0).long()] = 1.0
        return logits + 0 * flat.sum(1, keepdim=True)


def test_votes_are_counted_per_class_with_every_class_present():
    model = Votes()
    x = torch.zeros(1, 2, 2)
    g = torch.Generator().manual_seed(3)
    counts = smoothing.sample_counts(model, x, 1.0, 1001, 300, g)
    # the same draws, counted by hand
    g = torch.Generator().manual_seed(3)
    firsts = torch.cat([torch.randn((b, 1, 2, 2), generator=g)[:, 0, 0, 0] for b in (300, 300, 300, 101)])
    positive = int((firsts > 0).sum())
    assert counts.tolist() == [1001 - positive, positive, 0, 0, 0]
    assert counts.dtype == torch.long


def test_certification_batches_are_larger_on_a_gpu():
    assert certify_batch("cpu") == 1000
    assert certify_batch("cuda") == 5000
