"""A stand-in for gaussreg.runs.worker in scheduler tests: records its environment and
timing, then completes (or crashes when the spec's seed is 13, runs out of memory at 14,
takes longer at 15, is killed by SIGKILL at 16)."""
import os
import sys
import time

from gaussreg.runs.store import RunDir, atomic_write_json, now_iso

run = RunDir(sys.argv[1])
spec = run.spec()
rec = {"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": os.environ.get("GAUSSREG_THREADS"),
       "lock_fd": os.environ.get("GAUSSREG_LOCK_FD"),
       "order": os.environ.get("CUDA_DEVICE_ORDER"), "gpu_slot": os.environ.get("GAUSSREG_GPU"), "argv": sys.argv[1:], "start": time.time(), "pid": os.getpid()}
run.write_status({"state": "running", "pid": os.getpid(), "updated_at": now_iso()})
time.sleep(2.0 if spec["seed"] == 15 else 0.4)  # seed 15: a long run
if spec["seed"] == 16:  # killed as by kill -9 or the OOM killer: nothing written, no exit code of its own
    os.kill(os.getpid(), 9)
if spec["seed"] == 13:
    print("boom: simulated crash", file=sys.stderr)
    sys.exit(3)
if spec["seed"] == 14:  # as the worker reports running out of GPU memory
    rec["end"] = time.time()
    atomic_write_json(run.file("fake.json"), rec)
    run.write_status({"state": "failed", "pid": os.getpid(), "updated_at": now_iso(), "out_of_memory": True,
                      "error": "out of memory on cuda (CUDA out of memory. Tried to allocate 2.00 GiB)"})
    sys.exit(1)
rec["end"] = time.time()
atomic_write_json(run.file("fake.json"), rec)
run.write_status({"state": "completed", "pid": os.getpid(), "updated_at": now_iso()})
