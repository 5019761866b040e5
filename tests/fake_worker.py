"""A stand-in for gaussreg.worker in scheduler tests: records its environment and
timing, then completes (or crashes when the spec's seed is 13)."""
import os
import sys
import time

from gaussreg.store import RunDir, atomic_write_json, now_iso

run = RunDir(sys.argv[1])
spec = run.spec()
rec = {"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": os.environ.get("GAUSSREG_THREADS"),
       "lock_fd": os.environ.get("GAUSSREG_LOCK_FD"), "argv": sys.argv[1:], "start": time.time(), "pid": os.getpid()}
run.write_status({"state": "running", "pid": os.getpid(), "updated_at": now_iso()})
time.sleep(0.4)
if spec["seed"] == 13:
    print("boom: simulated crash", file=sys.stderr)
    sys.exit(3)
rec["end"] = time.time()
atomic_write_json(run.file("fake.json"), rec)
run.write_status({"state": "completed", "pid": os.getpid(), "updated_at": now_iso()})
