import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import cli, python_env, wait_for
from conftest import gaussreg as in_process
from factories import queued_runs
from fake_worker import ARGV as FAKE
from fake_worker import CRASH, KILLED, LONG, OUT_OF_MEMORY

from gaussreg.launch.gpus import parse_gpus
from gaussreg.launch.scheduler import Scheduler, make_slots
from gaussreg.runs import reader
from gaussreg.runs.spec import resolve, run_id
from gaussreg.runs.store import RunDir, Store


def _store_with(tmp_path, seeds):
    return queued_runs(tmp_path / "runs", seeds, "t")


@pytest.mark.process  # asks nvidia-smi where it is installed
def test_slots_per_gpu_and_cpu():
    slots = make_slots(["0", "1"], per_gpu=2, cpus=16)
    assert [s.gpu for s in slots] == ["0", "1", "0", "1"] and all(s.threads == 4 for s in slots)
    assert [s.gpu for s in make_slots(["0", "1"], per_gpu=3, max_parallel=4, cpus=8)] == ["0", "1", "0", "1"]
    cpu = make_slots([], max_parallel=2, cpus=2)
    assert [s.gpu for s in cpu] == [None, None] and [s.threads for s in cpu] == [1, 1]
    assert make_slots([], cpus=2)[0].threads == 2
    assert parse_gpus("none") == [] and parse_gpus("1, 0,1") == ["1", "0"]
    with pytest.raises(ValueError, match="--gpus"):
        parse_gpus("gpu0")
    with pytest.raises(ValueError):
        make_slots(["0"], per_gpu=0)


@pytest.mark.process
def test_fake_gpus_each_child_sees_its_gpu_and_at_most_per_gpu_share(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    st, ids = _store_with(tmp_path, range(10))
    summary = Scheduler(st, ids, make_slots(["0", "1"], per_gpu=2, cpus=8), worker_argv=FAKE, poll_s=0.05).run()
    assert summary.exit_code() == 0 and summary.count("completed") == 10
    recs = [json.loads((st.root / i / "fake.json").read_text()) for i in ids]
    assert {r["cuda"] for r in recs} == {"0", "1"}
    assert all(r["threads"] == "2" and r["lock_fd"] for r in recs)
    assert all(r["order"] == "PCI_BUS_ID" and r["gpu_slot"] == r["cuda"] for r in recs)  # nvidia-smi's numbering
    for gpu in ("0", "1"):
        spans = [(r["start"], r["end"]) for r in recs if r["cuda"] == gpu]
        for t, _ in spans:  # how many runs of this GPU were alive at each start
            assert sum(1 for a, b in spans if a <= t < b) <= 2
    assert max(sum(1 for r in recs if r["start"] <= t < r["end"]) for t in [r["start"] for r in recs]) >= 3


@pytest.mark.process
def test_a_crashed_worker_is_failed_and_the_others_go_on(tmp_path):
    st, ids = _store_with(tmp_path, [1, CRASH, 2, 3, KILLED])
    summary = Scheduler(st, ids, make_slots([], max_parallel=2), worker_argv=FAKE, poll_s=0.05).run()
    crashed, killed = ids[1], ids[4]
    assert summary.outcomes[crashed].state == "failed"
    assert "boom: simulated crash" in summary.outcomes[crashed].log_tail
    assert RunDir(st.root / crashed).status()["state"] == "failed"
    assert "exited with code 3" in RunDir(st.root / crashed).status()["error"]
    # a signal leaves nothing in worker.log: the status names it instead of sending you there
    assert RunDir(st.root / killed).status()["error"] == "worker was killed by SIGKILL without finishing"
    assert summary.count("completed") == 3 and summary.exit_code() == 1


@pytest.mark.process
def test_finished_runs_are_skipped_unless_rerun(tmp_path):
    st, ids = _store_with(tmp_path, [1, 2])
    Scheduler(st, ids, make_slots([]), worker_argv=FAKE, poll_s=0.05).run()
    first = [json.loads((st.root / i / "fake.json").read_text())["start"] for i in ids]
    s2 = Scheduler(st, ids, make_slots([]), worker_argv=FAKE, poll_s=0.05).run()
    assert s2.count("completed") == 2
    assert [json.loads((st.root / i / "fake.json").read_text())["start"] for i in ids] == first
    Scheduler(st, ids, make_slots([]), rerun=True, worker_argv=FAKE, poll_s=0.05).run()
    assert all(json.loads((st.root / i / "fake.json").read_text())["start"] > f for i, f in zip(ids, first))


MANIFEST = """
[defaults]
dataset = "synthetic"
model = "{model}"
max_epochs = {epochs}
batch_size = 100
optimizer = {{ lr = 1e-3 }}
robustness = {{ sigmas = [0.0, 0.3] }}

[[experiment]]
name = "sched"
methods.baseline = {{}}
methods.regularizer = {{ sigma = [0.1, 0.2, 0.3], alpha = 1.0 }}
"""


def _descendants_alive(pids):
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def _launch_until_training(tmp_path, n, *flags):
    """`gaussreg run` of MANIFEST's runs that only a stop ends (neither max_epochs nor a plateau),
    once n of them train: (process, store, the training runs)."""
    (tmp_path / "m.toml").write_text(MANIFEST.format(model="mlp", epochs="1000\nearly_stop = 2000"))
    p = subprocess.Popen(cli("run", tmp_path / "m.toml", "--store", tmp_path / "runs", *flags),
                         env=python_env(COLUMNS="200"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    st = Store(tmp_path / "runs")

    def training():
        assert p.poll() is None, "gaussreg run ended before its workers trained"
        running = [r for r in st.runs() if any(e["type"] == "progress" for e in r.events()[0])]
        return running if len(running) >= n else None
    return p, st, wait_for(training, 120, f"{n} workers training", every=0.1)


@pytest.mark.process
def test_ctrl_c_cancels_every_running_worker_and_leaves_no_orphan(tmp_path):
    p, st, running = _launch_until_training(tmp_path, 2, "--max-parallel", "2")
    assert len(running) == 2
    workers = [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
    assert len(workers) >= 2
    waiting = [r for r in reader.list_runs(st) if r["state"] == "queued"]
    assert waiting and not any(r["row"].not_launched for r in waiting)  # its launch will start them
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 130, out
    states = sorted(r.status()["state"] for r in st.runs())
    assert states == ["cancelled", "cancelled", "queued", "queued"]
    # nothing will start the queued two now: ls says so, and they may be removed
    listed = in_process("ls", "--store", st.root, COLUMNS="200")
    assert listed.stdout.count("queued (not launched)") == 2, listed.stdout
    assert "2 queued runs not launched: the launch that queued them has ended" in listed.stdout
    assert [r["row"].not_launched for r in reader.list_runs(st) if r["state"] == "queued"] == [True, True]
    for r in running:
        assert r.status()["state"] == "cancelled"
        assert "model" in torch.load(r.file("last.pt"), weights_only=True)
    wait_for(lambda: not _descendants_alive(workers), 30, f"the workers {workers} to exit")
    assert "interrupted" in out


@pytest.mark.process
def test_two_concurrent_runs_on_one_store_train_each_run_once(tmp_path):
    (tmp_path / "m.toml").write_text(MANIFEST.format(model="mlp", epochs=1))
    cmd = cli("run", tmp_path / "m.toml", "--store", tmp_path / "runs", "--max-parallel", "2")
    procs = [subprocess.Popen(cmd, env=python_env(COLUMNS="120"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = list(Store(tmp_path / "runs").runs())
    assert len(runs) == 4
    for r in runs:
        assert r.status()["state"] == "completed"
        starts = [e for e in r.events()[0] if e["type"] in ("start", "resume")]
        assert len(starts) == 1, r.id
        assert r.file("worker.log").read_text().count(" start ") == 1
    # each scheduler reports the whole table at the end
    assert all("sched · synthetic · mlp" in o for o in outs)


def _fake_nvidia_smi(tmp_path, monkeypatch, n=2):
    """An `nvidia-smi -L` listing n GPUs first on PATH, for tests of GPU handling on CPU boxes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    lines = "".join(f"echo 'GPU {i}: NVIDIA Fake (UUID: GPU-{i:08d})'\n" for i in range(n))
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n" + lines)
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")


@pytest.mark.process
@pytest.mark.gpu
@pytest.mark.parametrize("parent", [None, "0,1"])
def test_cpu_slots_hide_every_gpu_from_their_workers(tmp_path, monkeypatch, parent):
    # GPUs exist (fake nvidia-smi, or the parent's own CUDA_VISIBLE_DEVICES), but --gpus none
    # must keep `device = "auto"` workers off them
    _fake_nvidia_smi(tmp_path, monkeypatch)
    if parent is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)
    assert parse_gpus("all") == ["0", "1"]
    st, ids = _store_with(tmp_path, [1, 2])
    summary = Scheduler(st, ids, make_slots(parse_gpus("none"), max_parallel=2, cpus=2), worker_argv=FAKE,
                        poll_s=0.05).run()
    assert summary.exit_code() == 0
    recs = [json.loads((st.root / i / "fake.json").read_text()) for i in ids]
    assert [r["cuda"] for r in recs] == ["", ""] and [r["gpu_slot"] for r in recs] == [None, None]


@pytest.mark.process
def test_children_of_the_suite_see_no_gpu_unless_the_test_is_about_gpus():
    out = subprocess.run([sys.executable, "-c", "import os, torch; print(repr(os.environ['CUDA_VISIBLE_DEVICES']),"
                          " torch.cuda.is_available())"], env=python_env(), capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["''", "False"], out.stderr
    assert parse_gpus("all") == [] and [s.gpu for s in make_slots(parse_gpus("all"), max_parallel=2, cpus=2)] == [None] * 2


@pytest.mark.gpu
def test_a_gpu_test_sees_the_hosts_devices():
    import os

    from conftest import HOST_CUDA_VISIBLE_DEVICES
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == HOST_CUDA_VISIBLE_DEVICES


@pytest.mark.process
# about a CPU-only build of torch; conftest hides the GPUs, so is_available() would always say no
@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch is never refused a GPU")
def test_a_worker_on_a_gpu_slot_that_torch_cannot_use_refuses_instead_of_training_on_the_cpu(tmp_path, monkeypatch):
    # the real worker, a GPU slot (fake nvidia-smi says GPU 0 exists) and this CPU-only torch
    _fake_nvidia_smi(tmp_path, monkeypatch, n=1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    st, ids = _store_with(tmp_path, [1])
    summary = Scheduler(st, ids, make_slots(parse_gpus("all"), cpus=2), poll_s=0.05).run()
    o = summary.outcomes[ids[0]]
    assert o.state == "failed" and o.returncode == 2
    run = st.get(ids[0])
    assert o.error == run.status()["error"]
    assert (f"this run was given GPU 0 (CUDA_VISIBLE_DEVICES='0') but torch {torch.__version__} (CUDA none) cannot "
            "use it: it is a CPU-only build") in o.error and "does not train on the CPU" in o.error
    assert not run.file("last.pt").exists() and not run.epochs()  # nothing trained anywhere


def test_a_cpu_slot_or_a_cpu_spec_on_a_gpu_slot_is_not_refused(tmp_path):
    from gaussreg.runs.device import pick_device
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu", gpu_slot="0").type == "cpu"  # the spec asked for the CPU itself


@pytest.mark.process
def test_after_an_out_of_memory_run_nothing_starts_on_its_gpu_until_a_run_there_ends(tmp_path):
    st, ids = _store_with(tmp_path, [OUT_OF_MEMORY, LONG, 1, 2])  # one runs out of memory while a long one shares GPU 0
    summary = Scheduler(st, ids, make_slots(["0"], per_gpu=2, cpus=2), worker_argv=FAKE, poll_s=0.02).run()
    assert [summary.outcomes[i].state for i in ids] == ["failed", "completed", "completed", "completed"]
    assert summary.outcomes[ids[0]].error.startswith("out of memory on cuda")
    rec = {i: json.loads((st.root / i / "fake.json").read_text()) for i in ids}
    oom, long_run = rec[ids[0]], rec[ids[1]]
    assert oom["end"] < long_run["end"] - 1  # the hold was tested: the GPU was busy after the failure
    assert rec[ids[2]]["start"] >= long_run["end"]  # the next run waited for the long one to end
    # then both slots are used again
    assert rec[ids[3]]["start"] < rec[ids[2]]["end"]


@pytest.mark.process
def test_gpu_shares_are_counted_across_the_schedulers_of_a_store(tmp_path):
    """--per-gpu K holds across launches: a place on a GPU another launch holds is not used,
    and two schedulers of one store with --per-gpu 1 never put two runs on one GPU."""
    import threading
    st, ids = _store_with(tmp_path, [1, 2, 3, 4])
    held = st.lock_gpu_share("0", 1)  # another launch's worker on GPU 0
    assert held is not None and st.lock_gpu_share("0", 1) is None and st.lock_gpu_share("1", 1) is not None
    ticks, started = threading.Semaphore(0), []

    def on_change(_s, what, run):
        if what == "tick":
            ticks.release()
        elif what == "started":
            started.append(run.id)
    sched = Scheduler(st, ids[:2], make_slots(["0"], per_gpu=1, cpus=2), worker_argv=FAKE, poll_s=0.01,
                      on_change=on_change)
    t = threading.Thread(target=sched.run)
    t.start()
    for _ in range(10):
        assert ticks.acquire(timeout=30)
    assert started == []  # ten rounds and the GPU's only place is still taken
    import os
    os.close(held)
    t.join(60)
    assert not t.is_alive() and sched.summary.count("completed") == 2
    # two schedulers at once, one place each on GPU 0: their runs never overlap
    a = Scheduler(st, ids[2:3], make_slots(["0"], per_gpu=1, cpus=2), worker_argv=FAKE, poll_s=0.01)
    b = Scheduler(st, ids[3:], make_slots(["0"], per_gpu=1, cpus=2), worker_argv=FAKE, poll_s=0.01)
    threads = [threading.Thread(target=s.run) for s in (a, b)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    recs = sorted((json.loads((st.root / i / "fake.json").read_text()) for i in ids[2:]), key=lambda r: r["start"])
    assert recs[0]["end"] <= recs[1]["start"] and {r["cuda"] for r in recs} == {"0"}


@pytest.mark.process
@pytest.mark.parametrize("who", ["this test", "init"])
def test_a_running_status_whose_lock_is_free_is_interrupted_whoever_has_its_pid_now(tmp_path, who):
    """The worker died without a word and its pid was reused by a live process that is
    not its worker: the free lock says it is not running (not `running` forever), so it
    cannot be cancelled (no stranger gets SIGTERM) and a scheduler resumes it."""
    import os
    import socket

    from gaussreg.launch.control import ControlError, cancel_run
    from gaussreg.runs.store import now_iso, pid_alive, try_lock
    st, ids = _store_with(tmp_path, [1])
    run = RunDir(st.root / ids[0])
    pid = os.getpid() if who == "this test" else 1
    assert pid_alive(pid)
    running = {"state": "running", "pid": pid, "host": socket.gethostname(), "started_at": now_iso(),
               "updated_at": now_iso(), "epoch": 1, "max_epochs": 3}
    run.write_status(running)
    assert run.state() == "interrupted"
    with pytest.raises(ControlError, match="is interrupted, not running"):
        cancel_run(run)
    out = subprocess.run(cli("ls", "--store", st.root, "--format", "json"), env=python_env(),
                         capture_output=True, text=True)
    assert out.returncode == 0 and [r["state"] for r in json.loads(out.stdout)] == ["interrupted"], out.stderr
    fd = try_lock(run)  # someone trains it: running it is
    try:
        assert run.state() == "running"
    finally:
        os.close(fd)
    assert run.state() == "interrupted"
    # a status read just before the worker wrote its last one and exited: the file decides
    run.write_status({**running, "state": "completed"})
    assert run.state(running) == "completed"
    run.write_status(running)
    summary = Scheduler(st, ids, make_slots([]), worker_argv=FAKE, poll_s=0.05).run()
    assert summary.count("completed") == 1 and run.status()["state"] == "completed"


def _grid(n):
    specs = {}
    for i in range(n):
        spec = resolve({"dataset": "synthetic", "model": "mlp", "method": "baseline", "seed": 100 + i,
                        "experiment": "big"})
        specs[run_id(spec)] = spec
    return specs


@pytest.mark.process
def test_a_big_grid_starts_its_first_run_before_creating_the_other_directories(tmp_path):
    """Run directories are created lazily: the first run is launched when only its own
    directory exists; the others are created while it trains, so `ls` and the TUI list
    every pending run once they are."""
    st = Store(tmp_path / "runs")
    specs = _grid(120)
    seen = {}

    def on_change(_snapshot, what, run):  # the view gets a Snapshot; the test controls `sched`
        if what == "started" and "dirs at first start" not in seen:
            seen["dirs at first start"] = sum(1 for _ in st.runs())
        if what == "completed" and "states" not in seen:
            seen["all created"] = sched.all_created.wait(120)
            seen["states"] = sorted(r.state() for r in st.runs())
            sched.stop()

    sched = Scheduler(st, list(specs), make_slots([], max_parallel=1), worker_argv=FAKE, on_change=on_change,
                      poll_s=0.05, specs=specs)
    summary = sched.run()
    assert sched.view_error is None and seen["all created"]
    assert seen["dirs at first start"] == 1
    assert seen["states"] == ["completed"] + ["queued"] * 119
    assert summary.interrupted and summary.count("completed") == 1 and summary.count("queued") == 119
    assert {r.spec()["seed"] for r in st.runs()} == {s["seed"] for s in specs.values()}


@pytest.mark.process
def test_gaussreg_run_of_a_big_grid_launches_before_writing_its_directories(tmp_path, monkeypatch):
    """Through the CLI: above the --yes threshold, the first worker starts when one run
    directory exists (it used to wait for all of them, ~20 ms each)."""
    import os

    from typer.testing import CliRunner

    from gaussreg.cli import BIG_GRID, app
    from gaussreg.launch import scheduler
    n = BIG_GRID + 1
    (tmp_path / "m.toml").write_text(
        '[defaults]\ndataset = "synthetic"\nmodel = "mlp"\nmax_epochs = 1\n\n[[experiment]]\nname = "big"\n'
        f'methods.baseline = {{}}\nseeds = {list(range(n))}\n')
    args = ["run", str(tmp_path / "m.toml"), "--store", str(tmp_path / "runs"), "--max-parallel", "1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "add --yes" in r.output and not (tmp_path / "runs").exists()
    r = CliRunner().invoke(app, args + ["--dry-run"])
    assert r.exit_code == 0 and f"{n} new" in r.output and not (tmp_path / "runs").exists()
    real, dirs = scheduler.start_worker, []

    def first_worker_then_ctrl_c(run, resume, **kw):
        dirs.append(sum(1 for _ in Store(tmp_path / "runs").runs()))
        proc = real(run, resume, **{**kw, "argv": FAKE})
        os.kill(os.getpid(), signal.SIGINT)  # the scheduler's handler: stop, cancel the worker
        return proc
    monkeypatch.setattr(scheduler, "start_worker", first_worker_then_ctrl_c)
    r = CliRunner().invoke(app, args + ["--yes"])
    assert r.exit_code == 130, r.output
    assert dirs == [1]


@pytest.mark.process
def test_the_view_gets_typed_snapshots_not_the_scheduler(tmp_path):
    from gaussreg.launch.scheduler import ActiveRun, Snapshot
    st, ids = _store_with(tmp_path, [1, CRASH, 2])
    seen = []

    def view(snap, what, run):
        assert isinstance(snap, Snapshot) and all(isinstance(a, ActiveRun) for a in snap.active)
        seen.append((what, run.id if run else None, snap.queued, len(snap.active), snap.count("completed"),
                     snap.count("failed")))
    summary = Scheduler(st, ids, make_slots([], max_parallel=1), worker_argv=FAKE, on_change=view, poll_s=0.05).run()
    events = [(w, r) for w, r, *_ in seen if w != "tick"]
    assert events == [("started", ids[0]), ("completed", ids[0]), ("started", ids[1]), ("failed", ids[1]),
                      ("started", ids[2]), ("completed", ids[2])]
    started = [s for s in seen if s[0] == "started"]
    assert [(q, a) for _, _, q, a, _, _ in started] == [(2, 1), (1, 1), (0, 1)]  # one slot: one active at a time
    assert seen[-1][4:] == (2, 1) and summary.count("completed") == 2


STUCK_MANIFEST = """
python_path = ["src"]

[defaults]
dataset = "synthetic"
model = "stuck:hang"
preset = "lenet"
max_epochs = 1

[[experiment]]
name = "stuck"
methods.baseline = {}
"""


def _stuck_launch(tmp_path):
    """`gaussreg run` of one run whose model factory never returns; its worker's pid once the factory runs."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "stuck.py").write_text(
        "import os, time\n"
        "def hang(info):\n"
        "    open(os.environ['STUCK_PID_FILE'], 'w').write(str(os.getpid()))\n"
        "    while True:\n"
        "        time.sleep(0.05)\n")
    (tmp_path / "m.toml").write_text(STUCK_MANIFEST)
    pid_file = tmp_path / "worker.pid"
    p = subprocess.Popen(cli("run", tmp_path / "m.toml", "--store", tmp_path / "runs"), cwd=tmp_path,
                         env=python_env(COLUMNS="200", STUCK_PID_FILE=str(pid_file)), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.time() < deadline and p.poll() is None, p.communicate()[0] if p.poll() is not None else ""
        time.sleep(0.05)
    return p, int(pid_file.read_text())


def _lines_until(p, text, timeout):
    """Output lines of p up to the first holding `text` (read in a thread: the pipe may stay silent)."""
    import queue
    import threading
    q = queue.Queue()
    threading.Thread(target=lambda: [q.put(line) for line in p.stdout] and q.put(None), daemon=True).start()
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        try:
            line = q.get(timeout=max(0.01, deadline - time.time()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if text in line:
            return seen, q
    raise AssertionError(f"{text!r} never appeared in {timeout} s: {''.join(seen)}")


def _rest(q, timeout=30):
    out = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = q.get(timeout=deadline - time.time())
        if line is None:
            return "".join(out)
        out.append(line)
    raise AssertionError("the output never ended")


@pytest.mark.process
def test_ctrl_c_says_what_it_waits_for_and_a_second_one_kills_a_worker_stuck_in_its_factory(tmp_path):
    p, worker = _stuck_launch(tmp_path)
    try:
        p.send_signal(signal.SIGINT)
        seen, q = _lines_until(p, "press Ctrl-C again", timeout=15)  # says so at once, not after 30 s
        assert "waiting up to 30 s for 1 worker(s)" in " ".join("".join(seen).split())
        assert psutil.pid_exists(worker)  # the factory ignored the SIGTERM
        t0 = time.time()
        p.send_signal(signal.SIGINT)
        rest = _rest(q)
        assert p.wait(timeout=15) == 130 and time.time() - t0 < 15
        assert "second Ctrl-C: killing" in rest
        assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
        (run,) = Store(tmp_path / "runs").runs()
        status = run.status()
        assert status["state"] == "cancelled" and "killed with SIGKILL at a second Ctrl-C" in status["error"]
    finally:
        p.kill()
        if psutil.pid_exists(worker):
            psutil.Process(worker).kill()


@pytest.mark.process
def test_gaussreg_cancel_kills_a_worker_stuck_in_its_factory_after_the_grace_period(tmp_path):
    p, worker = _stuck_launch(tmp_path)
    try:
        (run,) = Store(tmp_path / "runs").runs()
        t0 = time.time()
        out = subprocess.run(cli("cancel", run.id, "--store", tmp_path / "runs", "--grace", "2"),
                             env=python_env(COLUMNS="400"), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert 2 <= time.time() - t0 < 20
        assert "did not stop within 2 s of `gaussreg cancel`'s SIGTERM" in out.stdout
        assert "killed with SIGKILL" in out.stdout
        assert p.wait(timeout=30) == 1  # the sweep ends: its one run was cancelled
        assert run.status()["state"] == "cancelled"
        assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
    finally:
        p.kill()
        if psutil.pid_exists(worker):
            psutil.Process(worker).kill()


@pytest.mark.process
def test_ctrl_c_with_a_stopped_worker_wakes_it_and_says_so(tmp_path):
    # a real worker training, then stopped with SIGSTOP
    p, st, running = _launch_until_training(tmp_path, 1, "--only", "*baseline*")
    worker = running[0].status()["pid"]
    deadline = time.time() + 120
    try:
        os.kill(worker, signal.SIGSTOP)
        while psutil.Process(worker).status() != psutil.STATUS_STOPPED:
            assert time.time() < deadline
            time.sleep(0.02)
        t0 = time.time()
        p.send_signal(signal.SIGINT)
        seen, q = _lines_until(p, "press Ctrl-C again", timeout=15)
        assert "had been stopped (SIGSTOP) and got SIGCONT" in " ".join("".join(seen).split())
        _rest(q)
        assert p.wait(timeout=30) == 130 and time.time() - t0 < 25  # well within the 30 s grace period
        status = running[0].status()
        assert status["state"] == "cancelled" and "SIGTERM" in status["error"]  # it heard the SIGTERM itself
        assert running[0].file("last.pt").exists()
    finally:
        p.kill()
        if psutil.pid_exists(worker):
            psutil.Process(worker).kill()


def _stuck_train(tmp_path):
    """`gaussreg train` in the foreground of a run whose factory hangs, once it is in the factory."""
    p, worker = _stuck_launch(tmp_path)  # a launch gives the run directory
    p.kill()  # the worker follows its scheduler (SIGTERM), which its stuck factory ignores
    psutil.Process(worker).kill()
    psutil.wait_procs([psutil.Process(worker)], timeout=10)
    p.wait()
    (run,) = Store(tmp_path / "runs").runs()
    pid_file = tmp_path / "worker.pid"
    pid_file.unlink()
    t = subprocess.Popen(cli("train", run.path), cwd=tmp_path, env=python_env(STUCK_PID_FILE=str(pid_file)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.time() < deadline and t.poll() is None
        time.sleep(0.05)
    return t, run


@pytest.mark.process
def test_gaussreg_train_says_what_ctrl_c_waits_for_and_a_second_one_stops_at_once(tmp_path):
    t, run = _stuck_train(tmp_path)
    try:
        t.send_signal(signal.SIGINT)
        seen, q = _lines_until(t, "Ctrl-C again stops at once", timeout=15)
        assert "SIGINT: stopping at the next batch" in "".join(seen)
        t0 = time.time()
        t.send_signal(signal.SIGINT)
        assert t.wait(timeout=15) == 130 and time.time() - t0 < 15
        status = run.status()
        assert status["state"] == "cancelled" and "stopped at once by a second SIGINT" in status["error"]
    finally:
        t.kill()


@pytest.mark.process
def test_gaussreg_cancel_of_a_stuck_foreground_train_marks_it_cancelled(tmp_path):
    t, run = _stuck_train(tmp_path)  # no scheduler to reap it: the cancel itself records how it ended
    try:
        out = subprocess.run(cli("cancel", run.id, "--store", tmp_path / "runs", "--grace", "1"),
                             env=python_env(COLUMNS="400"), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "killed with SIGKILL" in out.stdout, out
        assert t.wait(timeout=15) == -signal.SIGKILL
        status = run.status()
        assert status["state"] == "cancelled" and "did not stop within 1 s" in status["error"], status
    finally:
        t.kill()
