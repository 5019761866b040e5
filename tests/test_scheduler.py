import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import cli, python_env
from gaussreg.scheduler import Scheduler, make_slots, parse_gpus
from gaussreg.spec import resolve, run_id
from gaussreg.store import RunDir, Store

FAKE = [sys.executable, str(Path(__file__).with_name("fake_worker.py"))]


def _store_with(tmp_path, seeds):
    st = Store(tmp_path / "runs")
    ids = []
    for s in seeds:
        spec = resolve({"dataset": "synthetic", "model": "mlp", "method": "baseline", "seed": s, "experiment": "t"})
        ids.append(run_id(spec))
        st.create(spec, ids[-1])
    return st, ids


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


def test_fake_gpus_each_child_sees_its_gpu_and_at_most_per_gpu_share(tmp_path, monkeypatch):
    st, ids = _store_with(tmp_path, range(10))
    summary = Scheduler(st, ids, make_slots(["0", "1"], per_gpu=2, cpus=8), worker_argv=FAKE, poll_s=0.05).run()
    assert summary.exit_code() == 0 and summary.count("completed") == 10
    recs = [json.loads((st.root / i / "fake.json").read_text()) for i in ids]
    assert {r["cuda"] for r in recs} == {"0", "1"}
    assert all(r["threads"] == "2" and r["lock_fd"] for r in recs)
    for gpu in ("0", "1"):
        spans = [(r["start"], r["end"]) for r in recs if r["cuda"] == gpu]
        for t, _ in spans:  # how many runs of this GPU were alive at each start
            assert sum(1 for a, b in spans if a <= t < b) <= 2
    assert max(sum(1 for r in recs if r["start"] <= t < r["end"]) for t in [r["start"] for r in recs]) >= 3


def test_a_crashed_worker_is_failed_and_the_others_go_on(tmp_path):
    st, ids = _store_with(tmp_path, [1, 13, 2, 3])
    summary = Scheduler(st, ids, make_slots([], max_parallel=2), worker_argv=FAKE, poll_s=0.05).run()
    crashed = ids[1]
    assert summary.outcomes[crashed].state == "failed"
    assert "boom: simulated crash" in summary.outcomes[crashed].log_tail
    assert RunDir(st.root / crashed).status()["state"] == "failed"
    assert "exited with code 3" in RunDir(st.root / crashed).status()["error"]
    assert summary.count("completed") == 3 and summary.exit_code() == 1


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


def test_ctrl_c_cancels_every_running_worker_and_leaves_no_orphan(tmp_path):
    (tmp_path / "m.toml").write_text(MANIFEST.format(model="lenet", epochs=50))
    p = subprocess.Popen(cli("run", tmp_path / "m.toml", "--store", tmp_path / "runs", "--max-parallel", "2"),
                         env=python_env(COLUMNS="120"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    st = Store(tmp_path / "runs")
    deadline = time.time() + 120
    running = []
    while time.time() < deadline:
        running = [r for r in st.runs() if any(e["type"] == "progress" for e in r.events()[0])]
        if len(running) == 2:
            break
        time.sleep(0.1)
    assert len(running) == 2
    workers = [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
    assert len(workers) >= 2
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 130, out
    states = sorted(r.status()["state"] for r in st.runs())
    assert states == ["cancelled", "cancelled", "queued", "queued"]
    for r in running:
        assert r.status()["state"] == "cancelled"
        assert "model" in torch.load(r.file("last.pt"), weights_only=True)
    time.sleep(0.2)
    assert _descendants_alive(workers) == []
    assert "interrupted" in out


def test_two_concurrent_runs_on_one_store_train_each_run_once(tmp_path):
    (tmp_path / "m.toml").write_text(MANIFEST.format(model="mlp", epochs=2))
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
    assert [json.loads((st.root / i / "fake.json").read_text())["cuda"] for i in ids] == ["", ""]


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


def test_the_view_gets_typed_snapshots_not_the_scheduler(tmp_path):
    from gaussreg.scheduler import ActiveRun, Snapshot
    st, ids = _store_with(tmp_path, [1, 13, 2])
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
