"""gaussreg against a real single-node Slurm (Debian's slurmctld + slurmd), started here.

The fixture installs Slurm with apt when it is missing (root only), writes a slurm.conf
for this host into a temp dir (auth/none, two fake GPUs backed by /dev/tty0-1, free
ports, MaxArraySize = 4), runs `slurmctld -D` and `slurmd -D` in the foreground and kills them by pid."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import apt_install, cli, python_env, wait_for

from gaussreg.launch import slurm
from gaussreg.runs.store import TERMINAL, Store

DAEMONS = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")
MAX_ARRAY_SIZE = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listens(port: int) -> bool:
    """Whether some socket of this host listens on TCP `port` (read, not connected to)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = [line.split() for line in open(table).read().splitlines()[1:]]
        except OSError:
            continue
        if any(r[1].endswith(f":{port:04X}") and r[3] == "0A" for r in rows):  # 0A: LISTEN
            return True
    return False


def _install() -> str:
    """'' when Slurm is usable, else why not (one line)."""
    if all(shutil.which(c) for c in DAEMONS):
        return ""
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root"
    r = apt_install("slurmctld", "slurmd", "slurm-client")  # one test worker at a time (the browser test too)
    if r.returncode != 0 or not all(shutil.which(c) for c in DAEMONS):
        tail = (r.stderr or r.stdout).strip().splitlines()
        return f"apt could not install Slurm: {tail[-1] if tail else 'exit ' + str(r.returncode)}"
    return ""


@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("a real single-node Slurm needs root (slurmd runs the jobs)")
    why = _install()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    conf = d / "slurm.conf"
    ctld_port = _free_port()
    conf.write_text(f"""ClusterName=gaussregtest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MailProg=/bin/true
KillWait=5
GresTypes=gpu
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
ReturnToService=2
InactiveLimit=0
MinJobAge=300
# array indices below 4: a launch of more than 4 tasks is split into several array jobs
MaxArraySize={MAX_ARRAY_SIZE}
# schedule a submitted batch job at once (by default up to 3 s later)
SchedulerParameters=batch_sched_delay=0
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
NodeName={host} CPUs={cpus} RealMemory=1000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    (d / "gres.conf").write_text(f"NodeName={host} Name=gpu File=/dev/tty[0-1]\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs = []
    try:
        for cmd in (["slurmctld", "-D", "-i", "-f", str(conf)], ["slurmd", "-D", "-f", str(conf)]):
            with open(d / f"{cmd[0]}.out", "wb") as out:
                procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL))

        def alive():
            for p in procs:
                assert p.poll() is None, (d / "slurmctld.out").read_text() + (d / "slurmd.out").read_text()
            return True

        def listening():  # a Slurm client that finds no slurmctld sleeps a second before it retries
            alive()
            return _listens(ctld_port)

        def idle():
            alive()
            r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            return r.returncode == 0 and r.stdout.strip() == "idle"
        wait_for(listening, 90, "slurmctld to listen", every=0.02)
        wait_for(idle, 90, "the Slurm node to be idle", every=0.05)
        yield str(conf)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


MAX_EPOCHS = 12
MANIFEST = f"""
[[experiment]]
name = "cluster"
dataset = "synthetic"
model = "mlp"
max_epochs = {MAX_EPOCHS}
early_stop = 100
device = "cpu"  # the two GPUs are ttys: a worker on a GPU task with device auto would refuse them
train_subset = 1000
test_subset = 200
optimizer = {{ lr = 3e-4 }}
robustness = {{ sigmas = [0.0, 0.3] }}
methods.baseline = {{}}
methods.regularizer = {{ sigma = [0.25, 0.5], alpha = 1 }}
"""


def test_sweep_cancel_resume_on_a_real_slurm_gives_the_local_table(slurm_conf, tmp_path):
    (tmp_path / "m.toml").write_text(MANIFEST)
    env = python_env(SLURM_CONF=slurm_conf, COLUMNS="200")

    def gr(*args, timeout=300):
        return subprocess.run(cli(*args), capture_output=True, text=True, cwd=tmp_path, env=env, timeout=timeout)

    # the same manifest trained locally with the same thread count (1 each), meanwhile: its table
    # is compared with Slurm's at the end
    with open(tmp_path / "local.out", "wb") as out:
        local = subprocess.Popen(cli("run", "m.toml", "--store", "local", "--max-parallel", str(os.cpu_count() or 1)),
                                 stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    stopped = None
    try:
        r = gr("run", "m.toml", "--backend", "slurm", "--gpus-per-run", "1", "--cpus-per-run", "1")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "submitted 3 run(s) as Slurm array job" in r.stdout
        st = Store(tmp_path / "runs")
        runs = sorted(st.runs(), key=lambda run: run.status()["slurm_array_index"])
        assert [run.status()["slurm_array_index"] for run in runs] == [0, 1, 2]
        job = runs[0].status()["slurm_job_id"]
        assert all(run.status()["slurm_job"] == f"{job}_{i}" for i, run in enumerate(runs))

        # tasks 0 and 1 start together, one per fake GPU; task 1 is cancelled in its second epoch:
        # its worker is stopped there (SIGSTOP), so it is still training when `gaussreg cancel`
        # acts, whatever the machine's speed (scancel sends SIGCONT before SIGTERM)
        other, victim, last = runs

        def training_epoch_2():
            # the epoch event, written at every epoch's end (status.json's epoch rides on the
            # heartbeat, every 5 s, by which time a short run may be done)
            s, last = victim.status(), victim.last_epoch()
            return s if s.get("state") == "running" and last and last["epoch"] >= 1 else None
        stopped = wait_for(training_epoch_2, 180, "run 1 to train its second epoch", every=0.02)["pid"]
        os.kill(stopped, signal.SIGSTOP)
        assert victim.state() == "running" and victim.last_epoch()["epoch"] < MAX_EPOCHS, victim.status()
        wait_for(lambda: other.status().get("cuda_visible_devices") is not None, 60, "run 0 to start", every=0.1)
        seen = {other.status()["cuda_visible_devices"], victim.status()["cuda_visible_devices"]}
        assert seen == {"0", "1"}, seen  # each worker got its own GPU
        assert all(run.status()["gpu_slot"] == run.status()["cuda_visible_devices"] for run in (other, victim))
        r = gr("cancel", victim.id)
        assert r.returncode == 0 and f"scancel {job}_1" in r.stdout, r.stdout + r.stderr
        wait_for(lambda: victim.status().get("state") == "cancelled", 60, "the cancelled run to say so", every=0.1)
        stopped = None
        assert victim.file("last.pt").exists() and not victim.file("result.json").exists()
        assert victim.last_epoch()["epoch"] < MAX_EPOCHS

        # running the manifest again resubmits only the cancelled run, which resumes from last.pt;
        # run 0 and 2 (completed, or still in Slurm) are skipped, and --follow waits for all three
        r = gr("run", "m.toml", "--backend", "slurm", "--gpus-per-run", "1", "--cpus-per-run", "1", "--follow")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "submitted 1 run(s)" in r.stdout and r.stdout.count("skipped") == 2, r.stdout
        assert [run.state() for run in runs] == ["completed"] * 3
        assert victim.status()["slurm_job_id"] != job
        resumed = [e["epoch"] for e in victim.events()[0] if e["type"] == "resume"]
        assert resumed and resumed[0] >= 1, resumed  # from a finished epoch, not from scratch
        # task 2 waited for a GPU that another task gave back
        assert last.status()["cuda_visible_devices"] in {"0", "1"}
        assert other.status()["slurm_job"] == f"{job}_0" and last.status()["slurm_array_index"] == 2
        assert last.status()["slurm_job"] == f"{job}_2"

        assert local.wait(300) == 0, (tmp_path / "local.out").read_text()
    finally:
        if stopped is not None:  # the test failed before Slurm woke it: let it end
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        if local.poll() is None:
            local.terminate()
            local.wait(60)
    tables = [subprocess.Popen(cli("table", "--store", s, "--format", "json"), stdout=subprocess.PIPE, text=True,
                               cwd=tmp_path, env=env) for s in ("runs", "local")]  # both at once
    tables = [_without_times(json.loads(t.communicate(timeout=300)[0])) for t in tables]
    assert tables[0] == tables[1]
    assert len(tables[0]["experiments"][0]["best"]) == 2


def _without_times(obj):
    """A fair table without the seconds each run took, which no two machines share (steps,
    images and epochs stay: they are the same on Slurm as here)."""
    if isinstance(obj, dict):
        return {k: _without_times(v) for k, v in obj.items() if k not in ("time_s", "time_x", "wall_s", "time_kind")}
    if isinstance(obj, list):
        return [_without_times(v) for v in obj]
    return obj


SPLIT_MANIFEST = """
[[experiment]]
name = "split"
dataset = "synthetic"
model = "mlp"
max_epochs = 2
device = "cpu"
train_subset = 200
test_subset = 100
seeds = [0, 1]
robustness = { sigmas = [0.0, 0.3] }
methods.baseline = {}
methods.regularizer = { sigma = [0.25, 0.5], alpha = 1 }
"""


def test_a_launch_larger_than_max_array_size_completes_on_a_real_slurm(slurm_conf, tmp_path, monkeypatch):
    """6 runs, MaxArraySize 4: two array jobs (tasks 0-3 and 0-1); every run's status and
    Slurm output name its own array task; one run of the second job is cancelled, then
    resubmitted alone (the TUI's `r`), and trains."""
    (tmp_path / "m.toml").write_text(SPLIT_MANIFEST)
    env = python_env(SLURM_CONF=slurm_conf, COLUMNS="200")
    r = subprocess.run(cli("run", "m.toml", "--backend", "slurm", "--cpus-per-run", "1"), capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    st = Store(tmp_path / "runs")
    (launch,) = (tmp_path / "runs" / "_slurm").iterdir()
    job = json.loads((launch / "job.json").read_text())
    first, second = job["job_ids"]
    assert f"submitted 6 run(s) as Slurm array jobs {first}, {second} (6 task(s))" in r.stdout, r.stdout
    assert [(a["first_task"], a["tasks"]) for a in job["arrays"]] == [(0, 4), (4, 2)]
    lines = [Path(p).name for p in (launch / "runs.txt").read_text().split()]
    tasks = [f"{first}_{i}" for i in range(4)] + [f"{second}_{i}" for i in range(2)]
    assert [st.get(rid).status()["slurm_job"] for rid in lines] == tasks

    # the last task of the second job: still pending behind the first job's four on this node's CPUs
    victim = st.get(lines[5])
    r = subprocess.run(cli("cancel", victim.id), capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0 and f"scancel {second}_1" in r.stdout, r.stdout + r.stderr
    wait_for(lambda: victim.state() == "cancelled", 120, "the cancelled run to say so", every=0.1)

    def all_ended():
        return all(st.get(rid).state() in TERMINAL for rid in lines)
    wait_for(all_ended, 600, "the five other runs to end", every=0.2)
    for rid, task in zip(lines[:5], tasks[:5]):
        s_ = st.get(rid).status()
        assert (s_["state"], s_["slurm_job"]) == ("completed", task), (rid, s_)
        jid, idx = task.split("_")
        assert (s_["slurm_job_id"], s_["slurm_array_index"]) == (jid, int(idx))
        assert rid in (launch / f"{task}.out").read_text()  # the array task that trained it says so
    assert victim.state() == "cancelled" and not victim.file("result.json").exists()

    # resubmitted alone, it trains in a job of its own
    monkeypatch.setenv("SLURM_CONF", slurm_conf)
    sub = slurm.resubmit(victim)
    assert sub.job_ids == [sub.job_id] and sub.job_id not in (first, second)
    wait_for(lambda: victim.state() in TERMINAL, 300, "the resubmitted run to end", every=0.2)
    s_ = victim.status()
    assert (s_["state"], s_["slurm_job"]) == ("completed", f"{sub.job_id}_0"), s_
