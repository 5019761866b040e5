"""GPU handling that can be checked without a GPU (issue 20): a fake `nvidia-smi` on PATH,
the environment and arguments children get, and the errors a GPU box or cluster would show."""
import errno
import fcntl
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import gaussreg, python_env, wait_for
from factories import queued_run, spec, spec_only_run
from fake_worker import ARGV as FAKE
from fake_worker import LONG
from typer.testing import CliRunner

from gaussreg.cli import app as cli_app
from gaussreg.data import loading as data
from gaussreg.launch import gpus as inventory
from gaussreg.launch import request as launch
from gaussreg.launch import scheduler
from gaussreg.launch.request import LaunchError, LaunchRequest, plan
from gaussreg.runs import store
from gaussreg.runs.spec import SpecError, resolve
from gaussreg.runs.store import RunDir, RunFileError, Store

MANIFEST = """
[[experiment]]
name = "g"
dataset = "synthetic"
model = "mlp"
max_epochs = 1
seeds = [0, 1]
methods.baseline = {}
"""


def fake_nvidia_smi(tmp_path, monkeypatch, modes=("Default", "Default"), migs=None):
    """`nvidia-smi -L` lists one GPU per mode (UUID GPU-0000000i), with the MIG devices of
    `migs` (GPU index -> MIG ids) on indented lines as real drivers print them;
    `--query-gpu=index,uuid[,compute_mode]` reports the UUIDs and modes."""
    migs = migs or {}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    listing = ""
    for i in range(len(modes)):
        listing += f"GPU {i}: NVIDIA Fake (UUID: GPU-{i:08d})\\n"
        listing += "".join(f"  MIG 1g.5gb     Device  {j}: (UUID: {m})\\n" for j, m in enumerate(migs.get(i, ())))
    uuids = "".join(f"{i}, GPU-{i:08d}\\n" for i in range(len(modes)))
    query = "".join(f"{i}, GPU-{i:08d}, {m}\\n" for i, m in enumerate(modes))
    (bin_dir / "nvidia-smi").write_text(
        "#!/bin/sh\n"
        f'case "$*" in *compute_mode*) printf "{query}";; *--query-gpu*) printf "{uuids}";;'
        f' *) printf "{listing}";; esac\n')
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


@pytest.mark.process
def test_the_cli_says_so_when_auto_found_no_gpu_and_refuses_all(manifest, tmp_path):
    out = gaussreg("run", manifest, "--store", tmp_path / "runs", "--gpus", "all")
    assert out.exit_code == 2 and "--gpus all asks for every GPU, but this machine shows none" in out.stderr
    assert not (tmp_path / "runs").exists()
    out = subprocess.run([sys.executable, "-m", "gaussreg", "run", manifest, "--store", str(tmp_path / "runs")],
                         capture_output=True, text=True, env=python_env(COLUMNS="300"), timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.search(r"; slots: cpu; threads per run: \d+; GPUs visible: none \(so --gpus auto trains on the CPU, "
                     r"and --backend slurm on a cluster's GPUs\)\n", out.stdout), out.stdout


@pytest.mark.process
@pytest.mark.gpu
def test_auto_and_all_use_every_gpu_nvidia_smi_lists(manifest, tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch)
    for gpus in ("auto", "all"):
        assert [s.gpu for s in plan(LaunchRequest(manifest, str(tmp_path / "runs"), gpus=gpus)).slots] == ["0", "1"]


# ------------------------------------------------------------ EXCLUSIVE_PROCESS

@pytest.mark.process
@pytest.mark.gpu
def test_packing_runs_on_an_exclusive_process_gpu_is_refused(manifest, tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, modes=("Default", "Exclusive_Process"))
    monkeypatch.setattr(launch, "mps_running", lambda: False)  # so on a GPU box that runs MPS too
    assert inventory.exclusive_gpus(["0", "1"]) == ["1"]
    req = dict(manifest=manifest, store=str(tmp_path / "runs"))
    with pytest.raises(LaunchError, match=r"GPU 1 is in EXCLUSIVE_PROCESS compute mode .* --per-gpu 2 cannot pack"):
        plan(LaunchRequest(**req, per_gpu=2))
    assert [s.gpu for s in plan(LaunchRequest(**req, per_gpu=2, gpus="0")).slots] == ["0", "0"]  # GPU 0 is shared
    assert [s.gpu for s in plan(LaunchRequest(**req, per_gpu=1)).slots] == ["0", "1"]  # one process each is fine
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-00000001")  # a UUID names the same GPU
    with pytest.raises(LaunchError, match="GPU GPU-00000001 is in EXCLUSIVE_PROCESS"):
        plan(LaunchRequest(**req, per_gpu=3))


@pytest.mark.process
@pytest.mark.gpu
def test_packing_runs_on_an_exclusive_process_gpu_is_accepted_under_mps(manifest, tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, modes=("Exclusive_Process", "Exclusive_Process"))
    monkeypatch.setattr(launch, "mps_running", lambda: True)
    p = plan(LaunchRequest(manifest=manifest, store=str(tmp_path / "runs"), per_gpu=3))
    assert sorted(s.gpu for s in p.slots) == ["0", "0", "0", "1", "1", "1"]
    monkeypatch.setattr(launch, "mps_running", lambda: False)
    with pytest.raises(LaunchError, match=r"GPU 0 is in EXCLUSIVE_PROCESS .* start the MPS daemon "
                                          r"\(`nvidia-cuda-mps-control -d`"):
        plan(LaunchRequest(manifest=manifest, store=str(tmp_path / "runs"), per_gpu=3))


class _Proc:
    def __init__(self, name):
        self.info = {"name": name}


def test_mps_is_seen_by_its_control_process_or_its_control_pipe(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "mps"))
    procs = [_Proc("python"), _Proc("nvidia-smi")]
    monkeypatch.setattr(inventory.psutil, "process_iter", lambda attrs: iter(procs))
    assert not inventory.mps_running()  # no daemon, no pipe directory
    (tmp_path / "mps").mkdir()
    (tmp_path / "mps" / "control").write_text("")  # a plain file is no daemon's pipe
    assert not inventory.mps_running()
    (tmp_path / "mps" / "control").unlink()
    os.mkfifo(tmp_path / "mps" / "control")  # what `nvidia-cuda-mps-control -d` creates (seen from a container)
    assert inventory.mps_running()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "elsewhere"))
    assert not inventory.mps_running()
    procs.append(_Proc("nvidia-cuda-mps-control"))  # the daemon itself, whatever its pipe directory
    assert inventory.mps_running()


# ------------------------------------------------------------ CPU counting

def test_cpu_slots_count_the_cores_this_process_may_use_not_the_machines(monkeypatch):
    monkeypatch.setattr(inventory.os, "sched_getaffinity", lambda pid: {4, 5, 6}, raising=False)
    monkeypatch.setattr(inventory.os, "cpu_count", lambda: 128)
    assert inventory.usable_cpus() == 3
    assert [s.threads for s in scheduler.make_slots([], max_parallel=1)] == [3]
    assert [s.threads for s in scheduler.make_slots([], max_parallel=2)] == [1, 1]


@pytest.mark.process
def test_a_real_cpuset_is_seen_by_a_child():
    if not hasattr(__import__("os"), "sched_getaffinity") or not subprocess.run(["which", "taskset"]).returncode == 0:
        pytest.skip("needs Linux taskset")
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c",
                          "from gaussreg.launch.gpus import usable_cpus; print(usable_cpus())"],
                         capture_output=True, text=True, env=python_env())
    assert out.stdout.strip() == "1", out.stderr


# ------------------------------------------------------------ a store without flock

@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_store_without_flock_is_named_in_one_sentence(tmp_path, monkeypatch, manifest, code):
    st = Store(tmp_path / "runs")
    run = queued_run(st, experiment="g")

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


@pytest.mark.process  # asks nvidia-smi where it is installed
@pytest.mark.gpu
def test_the_packing_benchmark_uses_the_benchmarked_gpu_not_gpu_0(monkeypatch):
    from gaussreg import bench
    seen = []

    class Recorder:
        def __init__(self, st, ids, slots, **_):
            seen.append([s.gpu for s in slots])

        def run(self):
            pass
    monkeypatch.setattr(bench, "Scheduler", Recorder)  # where the benchmark uses it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    bench.bench_packing(torch.device("cuda", 1), [2], epochs=1)
    bench.bench_packing(torch.device("cuda"), [1], epochs=1)
    assert seen == [["3", "3"], ["2"]]


@pytest.mark.process
def test_eval_reads_only_the_test_split(tmp_path, monkeypatch):
    d = spec_only_run(tmp_path, "r", **spec(max_epochs=1, train_subset=200, test_subset=50,
                                            robustness={"sigmas": [0.0]}, experiment="e")).path
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
    assert json.loads(r.stdout)["clean_accuracy"] == RunDir(d).result()["test_accuracy"]


# ------------------------------------------------------------ UUIDs, MIG devices, one name per GPU

MIG_NEW = ["MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f", "MIG-cba663e8-9bed-5b26-b243-5acad7e3d9c1"]
MIG_OLD = ["MIG-GPU-00000002/1/0", "MIG-GPU-00000002/2/0"]  # the R450/R460 form


@pytest.mark.process
@pytest.mark.gpu
def test_indented_mig_lines_are_parsed_and_a_split_gpu_counts_as_its_mig_devices(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, modes=("Default",) * 4, migs={1: MIG_NEW, 2: MIG_OLD})
    table = inventory.nvidia_gpus()
    assert [(g.index, g.uuid, g.migs) for g in table] == [
        ("0", "GPU-00000000", []), ("1", "GPU-00000001", MIG_NEW), ("2", "GPU-00000002", MIG_OLD),
        ("3", "GPU-00000003", [])]
    assert inventory.detect_gpus() == ["0", *MIG_NEW, *MIG_OLD, "3"]
    assert [s.gpu for s in plan_slots(tmp_path, "all")] == ["0", *MIG_NEW, *MIG_OLD, "3"]
    # a whole split GPU in CUDA_VISIBLE_DEVICES, by index or UUID, is its MIG devices
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,GPU-00000003,GPU-00000002")
    assert inventory.detect_gpus() == [*MIG_NEW, "GPU-00000003", *MIG_OLD]


def plan_slots(tmp_path, gpus, per_gpu=1):
    m = tmp_path / "m.toml"
    if not m.exists():
        m.write_text(MANIFEST)
    return plan(LaunchRequest(str(m), str(tmp_path / "runs"), gpus=gpus, per_gpu=per_gpu)).slots


@pytest.mark.parametrize("arg,ok", [("GPU-8f3c1a2b-1111-2222-3333-444455556666", True), ("GPU-8f3c", True),
                                    (MIG_NEW[0], True), (MIG_OLD[0], True), ("0, GPU-00000001", True),
                                    ("gpu0", False), ("GPU-xyz", False), ("MIG-GPU-00000002/1", False),
                                    ("MIG-c6d4;rm", False), ("-1", False)])
def test_gpus_accepts_indices_uuids_and_mig_ids(arg, ok):
    if ok:
        assert inventory.parse_gpus(arg) == [p.strip() for p in arg.split(",")]
    else:
        with pytest.raises(ValueError, match=r"--gpus must be .*UUIDs \('GPU-\.\.\.'\) or MIG ids"):
            inventory.parse_gpus(arg)


@pytest.mark.process
@pytest.mark.gpu
def test_under_a_slurm_allocation_indices_and_uuids_name_gpus_inside_it(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, modes=("Default",) * 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # what Slurm gives a job on a 4-GPU node
    assert launch.resolve_gpus("0") == ["2"] and launch.resolve_gpus("1,0") == ["3", "2"]
    assert launch.resolve_gpus("auto") == ["2", "3"]
    with pytest.raises(LaunchError, match=r"--gpus 2: GPU 2 does not exist; this process sees 2 GPU\(s\), "
                                          r"numbered 0 to 1 \(2, 3\)"):
        launch.resolve_gpus("2")
    assert launch.resolve_gpus("GPU-00000003") == ["3"]  # the allocation's own GPU, by UUID
    with pytest.raises(LaunchError, match=r"--gpus GPU-00000000: GPU-00000000 is not among the GPUs this process "
                                          r"may use \(2, 3;"):
        launch.resolve_gpus("GPU-00000000")  # on the node, outside the allocation
    # an index and the UUID of one GPU are one GPU (one set of places), whatever the order
    assert launch.resolve_gpus("0,GPU-00000002,1") == ["2", "3"]
    slots = plan_slots(tmp_path, "GPU-00000002,1")
    assert [(s.gpu, s.place) for s in slots] == [("2", "GPU-00000002"), ("3", "GPU-00000003")]
    # and a worker on a slot gets what the allocation calls the GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-00000002,GPU-00000003")  # a site that allocates by UUID
    assert launch.resolve_gpus("1") == ["GPU-00000003"]
    assert [s.place for s in plan_slots(tmp_path, "1")] == ["GPU-00000003"]


@pytest.mark.process
@pytest.mark.gpu
def test_mig_devices_are_named_and_checked_like_gpus(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, modes=("Default",) * 3, migs={1: MIG_NEW, 2: MIG_OLD})
    assert launch.resolve_gpus(MIG_NEW[1]) == [MIG_NEW[1]]
    assert launch.resolve_gpus(MIG_OLD[1]) == [MIG_OLD[1]]
    assert launch.resolve_gpus("GPU-00000001") == MIG_NEW  # a split GPU by its UUID: its MIG devices
    assert launch.resolve_gpus("1,0") == [MIG_NEW[0], "0"]  # indices count the visible units
    with pytest.raises(LaunchError, match="MIG-00000000-0000-0000-0000-000000000000 is not among the GPUs"):
        launch.resolve_gpus("MIG-00000000-0000-0000-0000-000000000000")
    assert [s.place for s in plan_slots(tmp_path, f"{MIG_OLD[0]},0")] == [MIG_OLD[0], "GPU-00000000"]


@pytest.mark.process
@pytest.mark.gpu
def test_a_uuid_prefix_names_its_gpu_when_it_is_unique(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, modes=("Default",) * 2)
    table = inventory.nvidia_gpus()
    assert inventory.canonical_gpu("GPU-00000001", table) == "GPU-00000001"
    assert inventory.canonical_gpu("GPU-0000000", table) == "GPU-0000000"  # both GPUs start so: kept as written
    assert inventory.canonical_gpu("1", table) == "GPU-00000001"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-00000001")
    assert [s.place for s in plan_slots(tmp_path, "0")] == ["GPU-00000001"]


@pytest.mark.process
@pytest.mark.gpu
def test_two_launches_naming_one_gpu_differently_count_the_same_places(tmp_path, monkeypatch):
    """One launch says `--gpus 1`, the other the UUID of GPU 1: with --per-gpu 1 the second
    finds GPU 1's place taken instead of putting a second run on the GPU."""
    fake_nvidia_smi(tmp_path, monkeypatch, modes=("Default",) * 2)
    by_index, by_uuid = plan_slots(tmp_path, "1"), plan_slots(tmp_path, "GPU-00000001")
    assert (by_index[0].gpu, by_uuid[0].gpu) == ("1", "1")
    assert by_index[0].place == by_uuid[0].place == "GPU-00000001"
    st = Store(tmp_path / "runs")
    first = scheduler.Scheduler(st, [], by_index)
    second = scheduler.Scheduler(st, [], by_uuid)
    held = first._gpu_share(by_index[0])
    assert held is not None and held >= 0
    assert second._gpu_share(by_uuid[0]) is None  # the same place: taken
    assert [p.name for p in (st.root / "_gpus").iterdir()] == ["GPU-00000001.0.lock"]
    __import__("os").close(held)
    again = second._gpu_share(by_uuid[0])
    assert again is not None and again >= 0
    __import__("os").close(again)


# ------------------------------------------------------------ gaussreg train and the TUI's rerun take a place

def _one_run(tmp_path, device="auto", seed=0):
    st = Store(tmp_path / "runs")
    return st, queued_run(st, experiment="g", seed=seed, max_epochs=1, train_subset=200, test_subset=50, device=device,
                          robustness={"sigmas": [0.0]})


@pytest.mark.process
@pytest.mark.gpu
def test_gaussreg_train_takes_a_free_gpu_place_and_that_gpu(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, modes=("Default",) * 2)
    st, run = _one_run(tmp_path)
    seen = {}

    def worker_main(argv):  # what the in-process worker sees, and whether its place is held meanwhile
        import os
        seen.update(cuda=os.environ.get("CUDA_VISIBLE_DEVICES"), slot=os.environ.get("GAUSSREG_GPU"),
                    order=os.environ.get("CUDA_DEVICE_ORDER"), argv=argv)
        other = st.lock_gpu_share("GPU-00000001", 1)
        seen["taken"] = other is None
        if other is not None:
            os.close(other)
        return 0
    import gaussreg.runs.worker
    monkeypatch.setattr(gaussreg.runs.worker, "main", worker_main)
    for k in ("GAUSSREG_GPU", "CUDA_DEVICE_ORDER"):
        monkeypatch.setenv(k, "restored after the test")
        monkeypatch.delenv(k)
    gpu0 = st.lock_gpu_share("GPU-00000000", 1)  # a launch's run holds GPU 0's only place
    try:
        r = CliRunner().invoke(cli_app, ["train", str(run.path)])
    finally:
        __import__("os").close(gpu0)
    assert r.exit_code == 0, r.output
    assert seen == {"cuda": "1", "slot": "1", "order": "PCI_BUS_ID", "argv": [str(run.path)], "taken": True}
    assert "on GPU 1 (a place of store" in r.output
    fd = st.lock_gpu_share("GPU-00000001", 1)  # released when train ends
    assert fd is not None
    __import__("os").close(fd)


@pytest.mark.process
@pytest.mark.gpu
# about a CPU-only build of torch; conftest hides the GPUs, so is_available() would always say no
@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch is never refused a GPU")
def test_gaussreg_train_on_a_full_store_or_a_cpu_torch_says_so(tmp_path, monkeypatch):
    import os
    fake_nvidia_smi(tmp_path, monkeypatch, modes=("Default",) * 2)
    st, run = _one_run(tmp_path)
    env = python_env()
    env.pop("CUDA_VISIBLE_DEVICES", None)  # the fake nvidia-smi is what this process sees
    held = [st.lock_gpu_share("GPU-00000000", 1), st.lock_gpu_share("GPU-00000001", 1)]
    try:
        p = subprocess.run([sys.executable, "-m", "gaussreg", "train", str(run.path)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 1 and "every place on the GPUs this process sees (0, 1) is taken" in p.stderr, p.stderr
        assert run.state() == "queued" and not run.file("worker.log").exists()  # nothing started
        os.close(held.pop())  # GPU 1 frees up: train takes it, and this CPU-only torch refuses it
        p = subprocess.run([sys.executable, "-m", "gaussreg", "train", str(run.path)], env=env, capture_output=True,
                           text=True, timeout=300)
    finally:
        for fd in held:
            os.close(fd)
    assert p.returncode == 2, p.stderr
    st_ = run.status()
    assert (st_["state"], st_["cuda_visible_devices"], st_["gpu_slot"]) == ("failed", "1", "1")
    assert "this run was given GPU 1 (CUDA_VISIBLE_DEVICES='1')" in st_["error"]


@pytest.mark.process
@pytest.mark.gpu
def test_a_cpu_spec_takes_no_gpu_place(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, modes=("Default",))
    st, run = _one_run(tmp_path, device="cpu")
    env = python_env()
    env.pop("CUDA_VISIBLE_DEVICES", None)  # the fake nvidia-smi is what this process sees
    held = st.lock_gpu_share("GPU-00000000", 1)
    try:
        p = subprocess.run([sys.executable, "-m", "gaussreg", "train", str(run.path)], env=env, capture_output=True,
                           text=True, timeout=300)
    finally:
        __import__("os").close(held)
    assert p.returncode == 0, p.stderr
    assert run.state() == "completed" and run.status()["gpu_slot"] is None


@pytest.mark.process
@pytest.mark.gpu
def test_the_tuis_rerun_takes_a_free_gpu_place_held_by_its_worker(tmp_path, monkeypatch):
    """The rerun is a launch (request.rerun_plan): a slot on each GPU with the places the
    store's launches made there; it trains on the first with a free place, its worker holding
    it, and says beforehand when every place is taken (it then waits)."""
    import os
    fake_nvidia_smi(tmp_path, monkeypatch, modes=("Default",) * 2)
    st, run = _one_run(tmp_path, seed=LONG)
    run.write_status({"state": "cancelled"})
    p = launch.rerun_plan(run)
    assert [(s.gpu, s.place, s.shares) for s in p.slots] == [("0", "GPU-00000000", 1), ("1", "GPU-00000001", 1)]
    assert [r.id for r in p.runs] == [run.id] and not p.request.rerun  # from its last.pt, not from scratch
    gpu0 = st.lock_gpu_share("GPU-00000000", 1)
    try:
        assert launch.place_wait(p) is None  # GPU 1 has a free place: it starts at once
        gpu1 = st.lock_gpu_share("GPU-00000001", 1)
        assert "every place on GPU 0, GPU 1 (2, as its launches made them) is taken" in launch.place_wait(p)
        os.close(gpu1)
        started = []
        sched = scheduler.Scheduler(st, [run.id], p.slots, worker_argv=FAKE, poll_s=0.05,
                                    on_change=lambda _s, what, r: started.append(what) if what == "started" else None)
        import threading
        t = threading.Thread(target=sched.run)
        t.start()
        wait_for(lambda: started, 60, "the rerun's worker to start")
        assert st.lock_gpu_share("GPU-00000001", 1) is None  # the worker holds GPU 1's place
        t.join(60)
    finally:
        os.close(gpu0)
    assert sched.summary.count("completed") == 1
    rec = json.loads(run.file("fake.json").read_text())
    assert (rec["cuda"], rec["gpu_slot"], rec["order"]) == ("1", "1", "PCI_BUS_ID")
    fd = st.lock_gpu_share("GPU-00000001", 1)  # free again once the worker ended
    assert fd is not None
    os.close(fd)


@pytest.mark.process
def test_a_checkpoint_copied_away_from_its_run_evaluates_alone(tmp_path):
    """Each checkpoint carries its resolved spec, so `gaussreg eval FILE` needs no run directory."""
    import shutil
    d = spec_only_run(tmp_path, "r", **spec(max_epochs=1, train_subset=200, test_subset=50,
                                            robustness={"sigmas": [0.0, 0.1]}, experiment="e")).path
    p = subprocess.run([sys.executable, "-m", "gaussreg.worker", str(d)], env=python_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    away = tmp_path / "elsewhere" / "model.pt"
    away.parent.mkdir()
    shutil.copy(d / "best.pt", away)
    r = CliRunner().invoke(cli_app, ["eval", str(away), "--format", "json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    res = RunDir(d).result()
    assert out["run_id"] is None and out["sigmas"] == [0.0, 0.1]  # the run's own sigmas, from the checkpoint
    assert out["clean_accuracy"] == res["test_accuracy"] and out["per_sigma"] == res["per_sigma"]
    (tmp_path / "elsewhere" / "junk.pt").write_bytes(b"not a checkpoint")
    r = CliRunner().invoke(cli_app, ["eval", str(tmp_path / "elsewhere" / "junk.pt")])
    assert r.exit_code == 2 and "no spec inside it" in " ".join(r.stderr.split())


@pytest.mark.process  # the driver's version comes from nvidia-smi (a fake here)
def test_result_json_records_what_a_gpu_runs_repeatability_depends_on(tmp_path, monkeypatch):
    """CUDA and cuDNN versions, the driver, the GPU's name and UUID (mocked CUDA queries and a
    fake nvidia-smi), TF32 and inductor's mode; on a CPU the GPU fields are None."""
    import types

    from gaussreg.runs import device
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text('#!/bin/sh\ncase "$*" in *driver_version*) echo "570.86.15";; esac\n')
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", uuid="8f3c1a2b-1111-2222-3333-444455556666")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: props)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    device.make_deterministic()
    rep = device.repeatability(torch.device("cuda", 0))
    assert rep == {"cuda": "12.8", "cudnn": 91002, "driver": "570.86.15", "gpu_name": "NVIDIA H100 80GB HBM3",
                   "gpu_uuid": "GPU-8f3c1a2b-1111-2222-3333-444455556666", "tf32": False,
                   "inductor_deterministic": True}
    assert device.repeatability(torch.device("cpu")) == {**rep, "cuda": None, "cudnn": None, "driver": None,
                                                         "gpu_name": None, "gpu_uuid": None}
    (bin_dir / "nvidia-smi").unlink()  # no nvidia-smi: the driver is unknown, the rest still there
    assert device.repeatability(torch.device("cuda", 0))["driver"] is None
