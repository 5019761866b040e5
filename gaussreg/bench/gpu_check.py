"""The GPU acceptance check: `python -m gaussreg.bench.gpu_check [--cpu] [--out FILE]`.

On a machine with one NVIDIA GPU and a CUDA build of torch, in a few minutes and without
downloading anything (the synthetic dataset), it checks what a GPU run of gaussreg relies on:

1. the tests marked `gpu` (pytest, where the source tree's tests/ is at hand);
2. a sweep of three runs through `gaussreg run --per-gpu 3` (baseline, the regularizer in
   bf16 through the compiled kernel, fixed-noise augment): each worker trained on CUDA, on
   the GPU its slot names, holding a GPU place of its own, and the kernel that ran;
3. the regularizer run again in another store with inductor's caches disabled: bitwise equal;
4. the augment run in another store killed with SIGKILL after some epochs and resumed:
   bitwise equal to the uninterrupted one of the sweep;
5. baseline and regularizer steps timed in fp32 and bf16 with no per-step sync;
6. the peak GPU memory of every run (result.json's gpu_peak_memory).

It prints a PASS/FAIL line per check and a summary, and writes a JSON result (by default
bench/results/gpu-check-<gpu>.json). `--cpu` runs the same checks small on the CPU (an
MLP, `--gpus none --max-parallel 3`, no places, no pytest): the check's own test."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from gaussreg import __version__
from gaussreg.bench import machine, make_step, sync
from gaussreg.data import loading as data
from gaussreg.launch.gpus import detect_gpus, usable_cpus
from gaussreg.runs import manifest as manifests
from gaussreg.runs.device import keep_freed_memory, make_deterministic, repeatability
from gaussreg.runs.store import RunDir, Store, atomic_write_json, now_iso

ROOT = Path(__file__).resolve().parents[2]  # the source tree, where tests/ and bench/results/ are
NUMBERS = ("test_accuracy", "test_loss", "robustness", "per_sigma", "accuracy_per_sigma", "best_epoch",
           "epochs_run", "best_val_loss", "val_robustness", "val_per_sigma", "steps", "images")


@dataclass
class Mode:
    """The sizes of a check: `gpu` for the real one, `cpu` for its test."""
    name: str
    model: str
    epochs: int
    train_subset: int
    test_subset: int
    batch_size: int
    kernel: List[str]  # the regularizer kernels the bf16 run must have used
    timing_batch: int
    timing_steps: int


GPU = Mode("gpu", "lenet", 20, 1800, 500, 1000, ["compiled"], 1000, 20)
# an MLP whose bf16 activations stay under moments._COMPILE_FROM: the exact kernel, no C++ compile
CPU = Mode("cpu", "mlp", 8, 300, 100, 100, ["exact"], 100, 5)

MANIFEST = """\
[defaults]
dataset = "synthetic"
model = "{m.model}"
max_epochs = {m.epochs}
early_stop = {m.epochs}
train_subset = {m.train_subset}
test_subset = {m.test_subset}
batch_size = {m.batch_size}
robustness = {{ sigmas = [0.0, 0.25, 0.5] }}

[[experiment]]
name = "check-baseline"
precision = "fp32"
methods.baseline = {{}}

[[experiment]]
name = "check-regularizer"
precision = "bf16"
methods.regularizer = {{ sigma = 0.5, alpha = 1.0 }}

[[experiment]]
name = "check-augment"
precision = "fp32"
methods.augment = {{ sigma = 0.5, folds = 2, noise = "fixed" }}
"""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0


@dataclass
class Report:
    checks: List[Check] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str, t0: float) -> None:
        c = Check(name, bool(ok), detail, round(time.monotonic() - t0, 1))
        self.checks.append(c)
        print(f"{'PASS' if c.ok else 'FAIL'}  {name}: {detail} ({c.seconds:.1f} s)", flush=True)


def child_env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def wait_until(cond: Callable[[], object], timeout: float, every: float = 0.01):
    """cond()'s first true value, or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    return None


def epochs_done(run: RunDir) -> int:
    try:
        return len(run.epochs())
    except Exception:  # noqa: BLE001 - not written yet
        return 0


def differences(a: dict, b: dict, run_a: RunDir, run_b: RunDir) -> List[str]:
    """The result numbers and per-epoch losses in which two runs differ (bitwise)."""
    diff = [k for k in NUMBERS if a.get(k) != b.get(k)]
    curves = [[(e["epoch"], e["train_loss"], e["val_loss"]) for e in r.epochs()] for r in (run_a, run_b)]
    return diff + (["epoch losses"] if curves[0] != curves[1] else [])


def worker(run: RunDir, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gaussreg.runs.worker", str(run.path), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)


def held_places(pid: int, places: Path) -> List[str]:
    """The GPU place lock files (STORE/_gpus) that process `pid` holds open."""
    held = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(places)):
                held.append(Path(target).name)
    except OSError:
        pass
    return held


def run_tests(report: Report, mode: Mode, timeout: float) -> None:
    t0 = time.monotonic()
    tests = ROOT / "tests"
    if mode.name == "cpu" or not tests.is_dir():
        why = "CPU mode" if mode.name == "cpu" else f"no tests/ beside the package ({ROOT})"
        print(f"SKIP  tests marked gpu: {why}", flush=True)
        return
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(tests)],
                           cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
        last = (p.stdout.strip().splitlines() or ["no output"])[-1]
        report.add("tests marked gpu", p.returncode == 0, last, t0)
        if p.returncode != 0:
            print(p.stdout[-4000:], flush=True)
    except subprocess.TimeoutExpired:
        report.add("tests marked gpu", False, f"still running after {timeout:.0f} s", t0)


def sweep(report: Report, mode: Mode, work: Path, gpu: Optional[str], planned: Dict[str, manifests.PlannedRun],
          others: Callable[[], None]) -> Dict[str, RunDir]:
    """The three runs through `gaussreg run`; `others` starts the repeat and the kill check
    beside it (they use their own stores). Checks where each worker trained."""
    t0 = time.monotonic()
    store = work / "sweep"
    # the checked GPU is this process's only visible one (CUDA_VISIBLE_DEVICES): `all` is that GPU
    flags = ["--gpus", "all", "--per-gpu", "3"] if gpu is not None else ["--gpus", "none", "--max-parallel", "3"]
    with open(work / "sweep.log", "w") as log:  # a file: a pipe nobody reads while it runs could fill up
        cli = subprocess.Popen([sys.executable, "-m", "gaussreg", "run", str(work / "check.toml"), "--store",
                                str(store), "--yes", *flags], env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    others()
    runs = {name: RunDir(store / r.id) for name, r in planned.items()}
    places: Dict[str, set] = {name: set() for name in runs}
    while cli.poll() is None:  # which place each worker holds, while it runs
        for name, run in runs.items():
            try:
                st = run.status()
            except Exception:  # noqa: BLE001 - not created yet
                continue
            if st.get("state") == "running" and st.get("pid"):
                places[name].update(held_places(st["pid"], store / "_gpus"))
        time.sleep(0.02)
    out = (work / "sweep.log").read_text(errors="replace")
    if cli.returncode != 0:
        report.add("sweep --per-gpu 3", False, f"gaussreg run exited {cli.returncode}: {out.strip()[-600:]}", t0)
        return runs
    problems = []
    for name, run in runs.items():
        res, st = run.result() or {}, run.status()
        want = "cuda" if gpu is not None else "cpu"
        if not str(res.get("device", "")).startswith(want):
            problems.append(f"{name} trained on {res.get('device')}, not {want}")
        if st.get("cuda_visible_devices") != (gpu if gpu is not None else ""):
            problems.append(f"{name} saw CUDA_VISIBLE_DEVICES={st.get('cuda_visible_devices')!r}")
        if gpu is not None and len(places[name]) != 1:
            problems.append(f"{name} held places {sorted(places[name]) or 'none'}, not one")
    if gpu is not None and len(set().union(*places.values())) != 3:
        problems.append(f"the three workers held {len(set().union(*places.values()))} distinct places, not 3")
    pids = {run.status().get("pid") for run in runs.values()}
    if len(pids - {None}) != 3:
        problems.append(f"{len(pids - {None})} worker processes trained the 3 runs")
    kernel = (runs["regularizer"].result() or {}).get("repeatability", {}).get("regularizer_kernel")
    if kernel != mode.kernel:
        problems.append(f"the bf16 regularizer ran the {kernel} kernel(s), not {mode.kernel}")
    where = (f"each on CUDA (GPU {gpu}) with a place of its own ({', '.join(sorted(set().union(*places.values())))})"
             if gpu is not None else "each on the CPU, in a process of its own")
    report.add("sweep --per-gpu 3", not problems, "; ".join(problems) or
               f"3 runs completed, {where}; regularizer kernel {kernel}", t0)
    return runs


def start_repeat(work: Path, spec_run: manifests.PlannedRun, env: dict):
    run = Store(work / "repeat").create(spec_run.spec, spec_run.id)
    return run, worker(run, {**env, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"})


def report_equal(report: Report, name: str, rc: int, run: RunDir, ref: RunDir, t0: float, equal: str) -> None:
    """The check `name`: the worker of `run` ended well and its numbers equal ref's bitwise."""
    if rc != 0 or not run.result() or not ref.result():
        report.add(name, False, f"worker exited {rc}; {run.status().get('error') or ''}", t0)
        return
    diff = differences(ref.result(), run.result(), ref, run)
    report.add(name, not diff, f"differs in {', '.join(diff)}" if diff else equal, t0)


def check_repeat(report: Report, run: RunDir, proc: subprocess.Popen, ref: RunDir, t0: float) -> None:
    rc = proc.wait()
    report_equal(report, "regularizer repeats bitwise (inductor caches off)", rc, run, ref, t0,
                 f"{(run.result() or {}).get('epochs_run')} epochs, every result number and loss equal")


def kill_and_resume(report: Report, run: RunDir, env: dict, ref_of: Callable[[], RunDir], t0: float) -> None:
    """The run started afresh, SIGKILLed after its third epoch, resumed; compared with
    ref_of() (the sweep's run, which it waits for)."""
    env = {**env, "GAUSSREG_CHECKPOINT_S": "0"}
    p = worker(run, env)
    seen = wait_until(lambda: epochs_done(run) >= 3 or p.poll() is not None, 300, every=0.005)
    if p.poll() is not None or not seen:
        report.add("SIGKILL then resume equals the uninterrupted run", False,
                   "the run ended before it could be killed" if p.poll() is not None else "no third epoch in 300 s",
                   t0)
        p.kill()
        return
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_after = epochs_done(run)
    rc = worker(run, env, "--resume").wait()
    report_equal(report, "SIGKILL then resume equals the uninterrupted run", rc, run, ref_of(), t0,
                 f"killed after epoch {killed_after}, resumed to epoch {(run.result() or {}).get('epochs_run')}: equal")


def timings(report: Report, mode: Mode, dev: torch.device) -> List[dict]:
    """Seconds per optimizer step of baseline and regularizer in fp32 and bf16: a warm-up,
    then `timing_steps` steps with one sync before and one after (none per step)."""
    t0 = time.monotonic()
    info = data.info("synthetic")
    g = torch.Generator(device=dev).manual_seed(0)
    n = mode.timing_batch * 2
    X = torch.rand((n, *info.shape), generator=g, device=dev)
    Y = torch.randint(0, info.classes, (n,), generator=g, device=dev)
    rows = []
    for precision in ("fp32", "bf16"):
        for name, params in (("baseline", {}), ("regularizer", {"sigma": 0.5, "alpha": 1.0})):
            _, step = make_step(dev, mode.model, info, X, Y, g, mode.timing_batch, name, params, precision)
            for _ in range(3):
                step()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            sync(dev)
            start = time.perf_counter()
            for _ in range(mode.timing_steps):
                step()
            sync(dev)
            s = (time.perf_counter() - start) / mode.timing_steps
            rows.append({"method": name, "precision": precision, "batch": mode.timing_batch, "step_s": s,
                         "images_per_s": mode.timing_batch / s,
                         "peak_allocated": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None})
    base = {r["precision"]: r["step_s"] for r in rows if r["method"] == "baseline"}
    ok = all(r["step_s"] > 0 for r in rows)
    report.add("step timings (no per-step sync)", ok, ", ".join(
        f"{r['method']} {r['precision']} {r['step_s'] * 1e3:.1f} ms ({r['step_s'] / base[r['precision']]:.2f}x)"
        for r in rows), t0)
    return rows


def peak_memory(report: Report, runs: Dict[str, RunDir], gpu: Optional[str]) -> dict:
    t0 = time.monotonic()
    peaks = {name: (run.result() or {}).get("gpu_peak_memory") for name, run in runs.items()}
    if gpu is None:
        ok = all(p is None for p in peaks.values())
        report.add("peak GPU memory per run", ok, "none recorded on the CPU, as documented" if ok else str(peaks), t0)
    else:
        ok = all(p and p.get("reserved", 0) > 0 for p in peaks.values())
        report.add("peak GPU memory per run", ok, ", ".join(
            f"{k} {p['reserved'] / 2**20:.0f} MiB reserved" if p else f"{k} none" for k, p in peaks.items()), t0)
    return peaks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gaussreg.bench.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="the small CPU mode (the check's own test)")
    ap.add_argument("--gpu", default=None, help="the GPU to check, as --gpus names it (default: the first visible)")
    ap.add_argument("--skip-tests", action="store_true", help="leave out the tests marked gpu")
    ap.add_argument("--test-timeout", type=float, default=240.0, help="seconds the tests marked gpu may take")
    ap.add_argument("--out", default=None, help="the JSON result (default: bench/results/gpu-check-<gpu>.json; "
                    "with --cpu none); '-' for none")
    ap.add_argument("--keep", action="store_true", help="keep the check's stores (a temporary folder)")
    a = ap.parse_args(argv)
    mode = CPU if a.cpu else GPU
    keep_freed_memory()  # the timings in this process under the settings of a worker
    make_deterministic()
    if a.cpu:
        gpu, dev = None, torch.device("cpu")
        torch.set_num_threads(1)  # beside the workers of a busy test machine: spinning threads cost seconds
    else:
        visible = detect_gpus()
        if visible:  # before CUDA starts: this process, its children and their `--gpus all` see that GPU only
            os.environ["CUDA_VISIBLE_DEVICES"] = a.gpu or visible[0]
        if not torch.cuda.is_available() or not visible:
            print(f"FAIL  this machine has no GPU that torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) "
                  f"can use (visible: {', '.join(visible) or 'none'}); `--cpu` runs the check's CPU mode",
                  file=sys.stderr)
            return 2
        gpu, dev = a.gpu or visible[0], torch.device("cuda", 0)
    started, t_all = now_iso(), time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gaussreg-gpu-check-"))
    (work / "check.toml").write_text(MANIFEST.format(m=mode))
    planned = {r.spec["method"]: r for r in manifests.load(work / "check.toml").runs()}
    report = Report()
    # no CUDA call in this process until the timings: its context would take GPU memory from
    # the workers, and on an EXCLUSIVE_PROCESS GPU the GPU itself
    print(f"gaussreg {__version__} GPU check ({mode.name} mode) on {f'GPU {gpu}' if gpu else 'the CPU'}, torch "
          f"{torch.__version__}; stores in {work}", flush=True)
    if not a.skip_tests:
        run_tests(report, mode, a.test_timeout)
    env = child_env(**({"CUDA_VISIBLE_DEVICES": gpu, "GAUSSREG_GPU": gpu} if gpu is not None
                       else {"CUDA_VISIBLE_DEVICES": ""}),
                    # the thread count the sweep's workers get (3 slots), so that every run computes alike
                    GAUSSREG_THREADS=str(max(1, usable_cpus() // 3)))
    side: dict = {}
    swept = threading.Event()

    def others():  # beside the sweep, in stores of their own: the repeat and the kill check
        side["t0"] = time.monotonic()
        side["repeat"] = start_repeat(work, planned["regularizer"], env)
        r = planned["augment"]
        killed = Store(work / "killed").create(r.spec, r.id)
        side["kill"] = threading.Thread(target=kill_and_resume, daemon=True, args=(
            report, killed, env, lambda: swept.wait() and side["runs"]["augment"], side["t0"]))
        side["kill"].start()

    runs = side["runs"] = sweep(report, mode, work, gpu, planned, others)
    swept.set()
    check_repeat(report, *side["repeat"], runs["regularizer"], side["t0"])
    side["kill"].join()
    peaks = peak_memory(report, runs, gpu)
    steps = timings(report, mode, dev)
    passed = all(c.ok for c in report.checks)
    wall = time.monotonic() - t_all
    print(f"{'PASS' if passed else 'FAIL'}: {sum(c.ok for c in report.checks)}/{len(report.checks)} checks passed "
          f"in {wall:.0f} s", flush=True)
    result = {"check": "gaussreg.bench.gpu_check", "mode": mode.name, "passed": passed, "started_at": started,
              "wall_s": wall, "machine": machine(dev), "gpu": gpu, "repeatability": repeatability(dev),
              "versions": {"gaussreg": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
              "commit": _commit(), "checks": [c.__dict__ for c in report.checks], "steps": steps,
              "gpu_peak_memory": peaks}
    out = a.out if a.out is not None else ("-" if a.cpu else str(ROOT / "bench" / "results" /
                                                                 f"gpu-check-{machine(dev)}.json"))
    if out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out), result)
        print(f"wrote {out}", flush=True)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if passed else 1


def _commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
