"""A stand-in for gaussreg.runs.worker in scheduler tests: records its environment and
timing, then completes, or does what the spec's seed names (the constants below; any
other seed completes). Tests pass ARGV as the worker's command and use the names."""
import os
import sys
import time
from pathlib import Path

from gaussreg.runs.store import RunDir, atomic_write_json, now_iso

CRASH = 13  # prints "boom: simulated crash" to stderr and exits with code 3
OUT_OF_MEMORY = 14  # reports running out of GPU memory, as the worker does, and exits 1
LONG = 15  # runs 2 s instead of 0.4 s
KILLED = 16  # killed as by kill -9 or the OOM killer: nothing written, no exit code of its own

ARGV = [sys.executable, str(Path(__file__).resolve())]  # the command a scheduler runs with the run directory


def main(run_dir: str) -> None:
    run = RunDir(run_dir)
    seed = run.spec()["seed"]
    rec = {"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": os.environ.get("GAUSSREG_THREADS"),
           "lock_fd": os.environ.get("GAUSSREG_LOCK_FD"), "order": os.environ.get("CUDA_DEVICE_ORDER"),
           "gpu_slot": os.environ.get("GAUSSREG_GPU"), "argv": sys.argv[1:], "start": time.time(), "pid": os.getpid()}
    run.write_status({"state": "running", "pid": os.getpid(), "updated_at": now_iso()})
    time.sleep(2.0 if seed == LONG else 0.4)
    if seed == KILLED:
        os.kill(os.getpid(), 9)
    if seed == CRASH:
        print("boom: simulated crash", file=sys.stderr)
        sys.exit(3)
    if seed == OUT_OF_MEMORY:
        rec["end"] = time.time()
        atomic_write_json(run.file("fake.json"), rec)
        run.write_status({"state": "failed", "pid": os.getpid(), "updated_at": now_iso(), "out_of_memory": True,
                          "error": "out of memory on cuda (CUDA out of memory. Tried to allocate 2.00 GiB)"})
        sys.exit(1)
    rec["end"] = time.time()
    atomic_write_json(run.file("fake.json"), rec)
    run.write_status({"state": "completed", "pid": os.getpid(), "updated_at": now_iso()})


if __name__ == "__main__":
    main(sys.argv[1])
