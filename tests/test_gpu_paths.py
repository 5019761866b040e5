"""GPU handling that can be checked without a GPU (issue 20): a fake `nvidia-smi` on PATH,
the environment and arguments children get, and the errors a GPU box or cluster would show."""
import errno
import fcntl
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import python_env
from gaussreg import data, launch, scheduler, store
from gaussreg.cli import app as cli_app
from gaussreg.launch import LaunchError, LaunchRequest, plan
from gaussreg.spec import SpecError, resolve, run_id
from gaussreg.store import RunDir, RunFileError, Store

MANIFEST = """
[[experiment]]
name = "g"
dataset = "synthetic"
model = "mlp"
max_epochs = 1
seeds = [0, 1]
methods.baseline = {}
"""


def fake_nvidia_smi(tmp_path, monkeypatch, modes=("Default", "Default")):
    """`nvidia-smi -L` lists one GPU per mode; `--query-gpu=index,uuid,compute_mode` reports the modes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    listing = "".join(f"GPU {i}: NVIDIA Fake (UUID: GPU-{i:08d})\\n" for i in range(len(modes)))
    query = "".join(f"{i}, GPU-{i:08d}, {m}\\n" for i, m in enumerate(modes))
    (bin_dir / "nvidia-smi").write_text(
        "#!/bin/sh\n"
        f'case "$*" in *--query-gpu*) printf "{query}";; *) printf "{listing}";; esac\n')
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def manifest(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text(MANIFEST)
    return str(p)


# ------------------------------------------------------------ --gpus auto | all | none

def test_the_default_trains_on_the_cpu_without_a_gpu_but_an_explicit_all_is_an_error(manifest, tmp_path):
    assert LaunchRequest().gpus == "auto"  # the quickstart on a laptop: CPU, said in the launch line
    p = plan(LaunchRequest(manifest, str(tmp_path / "runs")))
    assert [s.gpu for s in p.slots] == [None]
    with pytest.raises(LaunchError, match=r"--gpus all asks for every GPU, but this machine shows none .*"
                                          r"--gpus none .*--backend slurm"):
        plan(LaunchRequest(manifest, str(tmp_path / "runs"), gpus="all"))
    assert [s.gpu for s in plan(LaunchRequest(manifest, str(tmp_path / "runs"), gpus="none")).slots] == [None]


def test_the_cli_says_so_when_auto_found_no_gpu_and_refuses_all(manifest, tmp_path):
    out = subprocess.run([sys.executable, "-m", "gaussreg", "run", manifest, "--store", str(tmp_path / "runs"),
                          "--gpus", "all"], capture_output=True, text=True, env=python_env(COLUMNS="300"))
    assert out.returncode == 2 and "--gpus all asks for every GPU, but this machine shows none" in out.stderr
    assert not (tmp_path / "runs").exists()
    out = subprocess.run([sys.executable, "-m", "gaussreg", "run", manifest, "--store", str(tmp_path / "runs")],
                         capture_output=True, text=True, env=python_env(COLUMNS="300"), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "on cpu (" in out.stdout and "no GPU visible, --gpus none says so" in out.stdout


@pytest.mark.gpu
def test_auto_and_all_use_every_gpu_nvidia_smi_lists(manifest, tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch)
    for gpus in ("auto", "all"):
        assert [s.gpu for s in plan(LaunchRequest(manifest, str(tmp_path / "runs"), gpus=gpus)).slots] == ["0", "1"]


# ------------------------------------------------------------ EXCLUSIVE_PROCESS

@pytest.mark.gpu
def test_packing_runs_on_an_exclusive_process_gpu_is_refused(manifest, tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, modes=("Default", "Exclusive_Process"))
    assert scheduler.exclusive_gpus(["0", "1"]) == ["1"]
    req = dict(manifest=manifest, store=str(tmp_path / "runs"))
    with pytest.raises(LaunchError, match=r"GPU 1 is in EXCLUSIVE_PROCESS compute mode .* --per-gpu 2 cannot pack"):
        plan(LaunchRequest(**req, per_gpu=2))
    assert [s.gpu for s in plan(LaunchRequest(**req, per_gpu=2, gpus="0")).slots] == ["0", "0"]  # GPU 0 is shared
    assert [s.gpu for s in plan(LaunchRequest(**req, per_gpu=1)).slots] == ["0", "1"]  # one process each is fine
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-00000001")  # a UUID names the same GPU
    with pytest.raises(LaunchError, match="GPU GPU-00000001 is in EXCLUSIVE_PROCESS"):
        plan(LaunchRequest(**req, per_gpu=3))


# ------------------------------------------------------------ CPU counting

def test_cpu_slots_count_the_cores_this_process_may_use_not_the_machines(monkeypatch):
    monkeypatch.setattr(scheduler.os, "sched_getaffinity", lambda pid: {4, 5, 6}, raising=False)
    monkeypatch.setattr(scheduler.os, "cpu_count", lambda: 128)
    assert scheduler.usable_cpus() == 3
    assert [s.threads for s in scheduler.make_slots([], max_parallel=1)] == [3]
    assert [s.threads for s in scheduler.make_slots([], max_parallel=2)] == [1, 1]


def test_a_real_cpuset_is_seen_by_a_child():
    if not hasattr(__import__("os"), "sched_getaffinity") or not subprocess.run(["which", "taskset"]).returncode == 0:
        pytest.skip("needs Linux taskset")
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c",
                          "from gaussreg.scheduler import usable_cpus; print(usable_cpus())"],
                         capture_output=True, text=True, env=python_env())
    assert out.stdout.strip() == "1", out.stderr


# ------------------------------------------------------------ a store without flock

@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_store_without_flock_is_named_in_one_sentence(tmp_path, monkeypatch, manifest, code):
    st = Store(tmp_path / "runs")
    spec = resolve({"dataset": "synthetic", "model": "mlp", "method": "baseline", "experiment": "g"})
    st.create(spec, run_id(spec))
    run = st.get(run_id(spec))

    def flock(fd, op):
        raise OSError(code, __import__("os").strerror(code))
    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(RunFileError, match=r"is on a filesystem without file locks \(flock: .*Lustre: -o flock"):
        store.try_lock(run)
    assert "without file locks" in store.check_locking(st.root)
    # the scheduler fails the run with that sentence instead of crashing
    s = scheduler.Scheduler(st, [run.id], scheduler.make_slots([], cpus=1), poll_s=0.01).run()
    assert s.outcomes[run.id].state == "failed" and "without file locks" in s.outcomes[run.id].error
    # and `gaussreg run` says it before starting anything
    r = CliRunner().invoke(cli_app, ["run", manifest, "--store", str(tmp_path / "other")])
    assert r.exit_code == 2 and "without file locks" in r.output and not (tmp_path / "other").exists()


def test_a_store_with_flock_passes_the_check(tmp_path):
    assert store.check_locking(tmp_path) is None


# ------------------------------------------------------------ spec devices, bench, eval

@pytest.mark.parametrize("device,ok", [("cuda", True), ("cuda:0", True), ("cuda:1", False), ("cuda:12", False),
                                       ("cuda:01", False), ("auto", True), ("cpu", True)])
def test_a_spec_may_not_name_a_gpu_beyond_its_slots(device, ok):
    spec = {"dataset": "synthetic", "model": "mlp", "method": "baseline", "device": device}
    if ok:
        assert resolve(spec)["device"] == device
    else:
        with pytest.raises(SpecError, match=r"must be auto, cpu, cuda or cuda:0 \(each run sees only the GPU"):
            resolve(spec)


@pytest.mark.gpu
def test_the_packing_benchmark_uses_the_benchmarked_gpu_not_gpu_0(monkeypatch):
    from gaussreg import bench
    seen = []

    class Recorder:
        def __init__(self, st, ids, slots, **_):
            seen.append([s.gpu for s in slots])

        def run(self):
            pass
    monkeypatch.setattr(scheduler, "Scheduler", Recorder)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    bench.bench_packing(torch.device("cuda", 1), [2], epochs=1)
    bench.bench_packing(torch.device("cuda"), [1], epochs=1)
    assert seen == [["3", "3"], ["2"]]


def test_eval_reads_only_the_test_split(tmp_path, monkeypatch):
    d = tmp_path / "r"
    d.mkdir()
    (d / "spec.json").write_text(json.dumps(resolve({"dataset": "synthetic", "model": "mlp", "method": "baseline",
                                                     "max_epochs": 1, "train_subset": 200, "test_subset": 50,
                                                     "robustness": {"sigmas": [0.0]}, "experiment": "e"})))
    p = subprocess.run([sys.executable, "-m", "gaussreg.worker", str(d)], env=python_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    asked = []
    real = data.load_raw

    def load_raw(name, split, *a, **k):
        asked.append(split)
        return real(name, split, *a, **k)
    monkeypatch.setattr(data, "load_raw", load_raw)
    r = CliRunner().invoke(cli_app, ["eval", str(d / "best.pt"), "--sigmas", "0", "--format", "json"])
    assert r.exit_code == 0, r.output
    assert asked == ["test"]
    assert json.loads(r.output)["clean_accuracy"] == RunDir(d).result()["test_accuracy"]
