"""The Slurm backend against fake sbatch/squeue/scancel scripts on PATH (argument
building, parsing, status files, error paths). The real-Slurm test is test_slurm_cluster.py."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import cli, gaussreg, python_env, wait_for
from factories import queued_run, spec_only_run

from gaussreg.launch import slurm
from gaussreg.runs.store import Store

MANIFEST = """
[slurm]
partition = "gpu"
time = "01:00:00"
gpus_per_run = 1
mem = "2G"

[[experiment]]
name = "sl"
dataset = "synthetic"
model = "mlp"
max_epochs = 1
train_subset = 300
test_subset = 100
robustness = { sigmas = [0.0, 0.25] }
methods.baseline = {}
methods.regularizer = { sigma = [0.25, 0.5], alpha = 1 }
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """bin/ with sbatch (prints JOB;cluster and records its argv), squeue (prints the
    file squeue.txt) and scancel (records its argv); "submit" submits m.toml from this
    process (a test's setup, without the cost of a `gaussreg run` process)."""
    b = tmp_path / "bin"
    b.mkdir()
    calls = tmp_path / "calls.jsonl"
    rec = f"{sys.executable} -c 'import json,sys; open(\"{calls}\", \"a\").write(json.dumps(sys.argv[1:]) + \"\\n\")'"
    (b / "sbatch").write_text(f"#!/bin/bash\n{rec} sbatch \"$@\"\n"
                              f"[ -f {tmp_path}/sbatch_fails ] && {{ echo 'sbatch: error: invalid partition' >&2; exit 1; }}\n"
                              # job_seq: the next job id (counting up); accept_jobs: how many jobs the
                              # user may still submit (QOS MaxSubmitJobsPerUser)
                              f"if [ -f {tmp_path}/accept_jobs ]; then n=$(< {tmp_path}/accept_jobs); "
                              f"[ $n -le 0 ] && {{ echo 'sbatch: error: QOSMaxSubmitJobPerUserLimit' >&2; "
                              "echo \"sbatch: error: Batch job submission failed: Job violates accounting/QOS policy "
                              "(job submit limit, user's size and/or time limits)\" >&2; exit 1; }; "
                              f"echo $((n - 1)) > {tmp_path}/accept_jobs; fi\n"
                              f"if [ -f {tmp_path}/job_seq ]; then n=$(< {tmp_path}/job_seq); "
                              f"echo $((n + 1)) > {tmp_path}/job_seq; echo \"$n;cluster\"; "
                              "else echo '4242;cluster'; fi\n")
    # MaxArraySize: 1001 (Slurm's default) unless the test writes max_array_size
    (b / "scontrol").write_text(f"#!/bin/bash\n{rec} scontrol \"$@\"\necho 'AuthType                = auth/none'\n"
                                f"m=1001; [ -f {tmp_path}/max_array_size ] && m=$(< {tmp_path}/max_array_size)\n"
                                "echo \"MaxArraySize            = $m\"\n"
                                "echo 'MaxJobCount             = 10000'\n")
    (b / "squeue").write_text(f"#!/bin/bash\n{rec} squeue \"$@\"\n[ -f {tmp_path}/squeue.txt ] && while IFS= read -r l; do echo \"$l\"; done < {tmp_path}/squeue.txt\nexit 0\n")
    (b / "scancel").write_text(f"#!/bin/bash\n{rec} scancel \"$@\"\n")
    for f in b.iterdir():
        f.chmod(0o755)
    (tmp_path / "m.toml").write_text(MANIFEST)

    def calls_of(name):
        if not calls.exists():
            return []
        return [c[1:] for c in map(json.loads, calls.read_text().splitlines()) if c[0] == name]
    def submit(**flags):
        """`gaussreg run m.toml --backend slurm` (flags: its Slurm flags) as the CLI and the TUI's
        launch dialog do it (launch.plan, launch.submit_slurm), in tmp_path with the fakes first
        on PATH."""
        from gaussreg.launch.request import LaunchRequest, plan, submit_slurm
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("PATH", f"{b}:{os.environ['PATH']}")
        sub = submit_slurm(plan(LaunchRequest("m.toml", "runs", backend="slurm", slurm=flags)))
        assert sub.job_id == "4242", sub
        return sub
    return {"bin": b, "calls": calls_of, "dir": tmp_path, "submit": submit,
            "env": {"PATH": str(b), "COLUMNS": "200"}}  # only the fakes: a real Slurm may be installed


def gr(fake, *args):
    return subprocess.run(cli(*args), capture_output=True, text=True, cwd=fake["dir"],
                          env=python_env(**fake["env"]))


def test_settings_flags_override_the_table_and_are_checked():
    cfg = slurm.settings({"partition": "a", "time": "04:00:00", "per_gpu": 3}, {"partition": "b", "mem": None})
    assert (cfg.partition, cfg.time, cfg.per_gpu, cfg.requeue, cfg.signal) == ("b", "04:00:00", 3, True, "B:TERM@120")
    for bad, key in [({"gpus_per_run": -1}, "gpus_per_run"), ({"time": "4 hours"}, "time"),
                     ({"mem": "lots"}, "mem"), ({"partiton": "x"}, "partiton"), ({"per_gpu": 0}, "per_gpu"),
                     # numbers that size what a task starts, or that Slurm cannot hold
                     ({"per_gpu": 257}, "per_gpu"), ({"per_gpu": 99999999999999999999}, "per_gpu"),
                     ({"cpus_per_run": 2 ** 31}, "cpus_per_run"),
                     ({"array_parallelism": 10 ** 30}, "array_parallelism"),
                     ({"gpus_per_run": 2}, "gpus_per_run")]:  # a worker trains on one GPU
        with pytest.raises(slurm.SlurmConfigError) as e:
            slurm.settings(bad)
        assert e.value.key == key
    assert slurm.settings({"per_gpu": 256, "cpus_per_run": 2 ** 31 - 1}).per_gpu == 256
    with pytest.raises(slurm.SlurmConfigError, match="must be 0 or 1, not 4: a run trains on one GPU, so the other 3"):
        slurm.settings({"gpus_per_run": 4})
    assert slurm.settings({"gpus_per_run": 1}).gpus_per_run == 1


def test_gpus_per_run_above_one_is_refused_at_flag_and_manifest_parse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.toml").write_text(MANIFEST.replace("gpus_per_run = 1", "gpus_per_run = 2"))
    r = gaussreg("run", "m.toml", "--backend", "slurm", "--dry-run")
    assert r.exit_code == 2 and "m.toml:5: slurm.gpus_per_run: must be 0 or 1, not 2" in r.stderr, r.stderr
    (tmp_path / "m.toml").write_text(MANIFEST)
    r = gaussreg("run", "m.toml", "--backend", "slurm", "--dry-run", "--gpus-per-run", "3")
    assert r.exit_code == 2 and "gpus_per_run: must be 0 or 1, not 3" in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()


def test_sbatch_command_packs_per_gpu_runs_into_one_task():
    cfg = slurm.settings({"gpus_per_run": 1, "cpus_per_run": 2, "mem": "3G", "per_gpu": 2, "array_parallelism": 4,
                          "sbatch_args": "--qos=long --account=lab"})
    cmd = slurm.sbatch_command(cfg, 5, Path("/s/job.sh"), Path("/s"))
    assert cmd[:3] == ["sbatch", "--parsable", "--array=0-4%4"]
    for a in ("--gres=gpu:1", "--cpus-per-task=4", "--mem=6G", "--requeue", "--open-mode=append",
              "--signal=B:TERM@120", "--output=/s/%A_%a.out", "--qos=long", "--account=lab"):
        assert a in cmd
    assert cmd[-2:] == ["/s/job.sh", "0"] and not any(a.startswith(("--partition", "--dependency")) for a in cmd)
    # the launch's tasks 1000.. as the second array job: the script is told its first task, and with
    # array_parallelism it waits for the first job, so at most 4 tasks of the launch run at once
    cmd = slurm.sbatch_command(cfg, 5, Path("/s/job.sh"), Path("/s"), first_task=1000, after="77")
    assert cmd[-2:] == ["/s/job.sh", "1000"] and "--dependency=afterany:77" in cmd


def test_parsing_sbatch_and_squeue_output():
    assert slurm.parse_job_id("4242;cluster\n") == "4242" and slurm.parse_job_id("17\n") == "17"
    with pytest.raises(slurm.SlurmError, match="no job id"):
        slurm.parse_job_id("sbatch: error: nope")
    t = slurm.parse_squeue("12_0|RUNNING|None\n12_3|PENDING|Resources\n13|PENDING|Priority\ngarbage\n")
    assert set(t) == {"12_0", "12_3"} and t["12_3"].reason == "Resources" and t["12_0"].state == "RUNNING"
    assert slurm.fatal("ReqNodeNotAvail, UnavailableNodes:n1") and not slurm.fatal("Resources")


def test_submission_writes_queued_status_with_job_ids(fake_slurm):
    r = gr(fake_slurm, "run", "m.toml", "--backend", "slurm", "--per-gpu", "2", "--time", "02:00:00")
    assert r.returncode == 0, r.stderr
    assert "array job 4242" in r.stdout and "2 task(s)" in r.stdout
    (args,) = fake_slurm["calls"]("sbatch")
    assert "--array=0-1" in args and "--gres=gpu:1" in args and "--time=02:00:00" in args  # flag beats table
    assert "--partition=gpu" in args and "--mem=4G" in args and "--cpus-per-task=2" in args
    st = Store(fake_slurm["dir"] / "runs")
    statuses = sorted((r.status() for r in st.runs()), key=lambda s: s["slurm_job"])
    assert [s["slurm_job"] for s in statuses] == ["4242_0", "4242_0", "4242_1"]
    assert all(s["state"] == "queued" and s["backend"] == "slurm" and s["slurm_job_id"] == "4242" for s in statuses)
    assert [s["slurm_array_index"] for s in statuses] == [0, 0, 1]
    assert args[-1] == "0"  # the script is told that its array job holds the launch's tasks from 0
    script = Path(args[-2]).read_text()
    assert "GAUSSREG_BACKEND=slurm" in script and "gaussreg.launch.slurm task" in script and "--per-task 2" in script
    assert "GAUSSREG_SLURM_GPUS=1" in script  # the task is told how many GPUs it has (gpus_per_run in MANIFEST)
    listed = (Path(args[-2]).parent / "runs.txt").read_text().split()
    assert sorted(Path(p).name for p in listed) == sorted(r.id for r in st.runs())
    ls = gr(fake_slurm, "ls")
    assert "4242_1" in ls.stdout and "slurm job" in ls.stdout


def test_runs_still_in_slurm_are_not_submitted_twice(fake_slurm):
    fake_slurm["submit"]()
    (fake_slurm["dir"] / "squeue.txt").write_text("4242_0|RUNNING|None\n4242_2|PENDING|Resources\n")
    st = Store(fake_slurm["dir"] / "runs")
    by_job = {r.status()["slurm_job"]: r for r in st.runs()}
    by_job["4242_1"].write_status({**by_job["4242_1"].status(), "state": "cancelled"})
    r = gr(fake_slurm, "run", "m.toml", "--backend", "slurm")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("already") == 2 and "submitted 1 run(s)" in r.stdout
    assert len(fake_slurm["calls"]("sbatch")) == 2
    assert fake_slurm["calls"]("squeue")[-1][:4] == ["-h", "-r", "-n", "gaussreg"]
    assert by_job["4242_1"].status()["state"] == "queued"  # the resubmitted one


def test_missing_sbatch_exits_2_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.toml").write_text(MANIFEST)
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no Slurm here, whatever this machine has
    r = gaussreg("run", "m.toml", "--backend", "slurm")
    assert r.exit_code == 2 and "`sbatch` is not on PATH" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_refused_submission_exits_2_and_leaves_no_launch(fake_slurm):
    (fake_slurm["dir"] / "sbatch_fails").touch()
    r = gr(fake_slurm, "run", "m.toml", "--backend", "slurm")
    assert r.returncode == 2 and "sbatch refused the job" in r.stderr and "invalid partition" in r.stderr
    assert not any((fake_slurm["dir"] / "runs" / "_slurm").iterdir())
    assert not list(Store(fake_slurm["dir"] / "runs").runs())  # a run directory is written once sbatch accepted it


def test_bad_slurm_table_names_file_line_and_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.toml").write_text(MANIFEST.replace('time = "01:00:00"', 'time = "an hour"'))
    r = gaussreg("run", "m.toml", "--backend", "slurm")
    assert r.exit_code == 2 and "m.toml:4: slurm.time: must be a Slurm time" in r.stderr
    r = gaussreg("run", "m.toml", "--backend", "slurm", "--gpus-per-run", "-2")
    assert r.exit_code == 2


def test_cancel_of_a_slurm_run_calls_scancel_on_its_array_task(fake_slurm):
    fake_slurm["submit"]()
    run = next(r for r in Store(fake_slurm["dir"] / "runs").runs() if r.status()["slurm_job"] == "4242_2")
    r = gr(fake_slurm, "cancel", run.id[:-3])
    assert r.returncode == 0, r.stderr
    assert fake_slurm["calls"]("scancel") == [["4242_2"]]
    assert run.status()["state"] == "cancelled" and run.cancel_request.exists()
    r = gr(fake_slurm, "cancel", run.id)
    assert r.returncode == 2 and "is cancelled, neither queued nor running" in r.stderr


def test_two_submissions_of_one_process_in_one_second_each_train_their_own_runs(fake_slurm, monkeypatch):
    """A launch directory holds its job's runs.txt and job.sh: two resubmissions from one
    process (the TUI's `r` on two runs) in the same second once shared one, so the first
    job trained the second's run and its own run never."""
    from gaussreg.launch import slurm
    fake_slurm["submit"]()
    # the fake sbatch always says job 4242: runs not in its task 0, whose status a resubmission writes
    runs = [r for r in Store(fake_slurm["dir"] / "runs").runs() if r.status()["slurm_job"] != "4242_0"]
    monkeypatch.setattr(slurm.time, "strftime", lambda fmt, *a: "20261206-120000")  # the same second
    for run in runs:
        run.write_status({**run.status(), "state": "cancelled"})
        slurm.resubmit(run)
    launches = [run.status()["slurm_launch"] for run in runs]
    assert len(set(launches)) == 2
    for run, launch in zip(runs, launches):
        listed = (fake_slurm["dir"] / "runs" / "_slurm" / launch / "runs.txt").read_text().split()
        assert listed == [str(run.path.resolve())]


def test_follow_reports_a_pending_reason_that_never_resolves(fake_slurm):
    (fake_slurm["dir"] / "squeue.txt").write_text("4242_0|PENDING|PartitionConfig\n4242_1|PENDING|Resources\n"
                                                  "4242_2|PENDING|PartitionConfig\n")
    r = gr(fake_slurm, "run", "m.toml", "--backend", "slurm", "--follow")
    assert r.returncode == 1
    st = Store(fake_slurm["dir"] / "runs")
    bad = sorted(r.id for r in st.runs() if r.status()["slurm_job"] in ("4242_0", "4242_2"))
    assert "Slurm will not start 2 run(s) (PartitionConfig)" in r.stdout
    assert all(b in r.stdout for b in bad)


def _worker_until_training(run, env):
    """A worker of `run`, once it is in its training loop (it says so as an epoch starts)."""
    p = subprocess.Popen([sys.executable, "-m", "gaussreg.worker", str(run.path), "--resume"],
                         env=python_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def training():
        assert p.poll() is None, p.stderr.read()
        return (run.status().get("epoch") or 0) >= 1
    wait_for(training, 120, "the worker's first epoch", every=0.02)
    return p


@pytest.mark.process
@pytest.mark.parametrize("asked", [False, True])
def test_slurm_sigterm_is_interrupted_unless_cancel_was_asked(tmp_path, asked):
    run = spec_only_run(tmp_path, dataset="synthetic", model="lenet", method="baseline", max_epochs=50, batch_size=100,
                        early_stop=1000)
    p = _worker_until_training(run, {"GAUSSREG_BACKEND": "slurm", "SLURM_ARRAY_JOB_ID": "77",
                                     "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "80"})
    st = run.status()
    assert (st["backend"], st["slurm_job"], st["slurm_array_index"]) == ("slurm", "77_3", 3)
    if asked:
        run.cancel_request.write_text("{}")
    p.send_signal(signal.SIGTERM)
    p.wait(60)
    st = run.status()
    assert st["state"] == ("cancelled" if asked else "interrupted"), st
    assert ("preemption or time limit" in st["error"]) != asked
    assert run.file("last.pt").exists()


def test_tui_runs_table_shows_the_array_task_of_slurm_runs(fake_slurm):
    from tui.watcher import StoreWatcher
    from tui.widgets import cells
    fake_slurm["submit"]()
    rows = StoreWatcher(fake_slurm["dir"] / "runs").scan()
    assert sorted(r.slurm_job for r in rows) == ["4242_0", "4242_1", "4242_2"]
    assert sorted(cells(r)["state"].plain for r in rows) == ["queued 4242_0", "queued 4242_1", "queued 4242_2"]


def _task_env(tmp_path, spec_extra, gpus, cuda="0"):
    """An array task of a launch with `gpus_per_run = gpus`, run here as Slurm would run it."""
    run = queued_run(Store(tmp_path / "runs"), experiment="sl", max_epochs=1, train_subset=200, test_subset=50,
                     robustness={"sigmas": [0.0]}, **spec_extra)
    runs_file = tmp_path / "runs.txt"
    runs_file.write_text(f"{run.path}\n")
    env = python_env(GAUSSREG_SLURM_GPUS=str(gpus), SLURM_ARRAY_JOB_ID="9", SLURM_ARRAY_TASK_ID="0",
                     CUDA_VISIBLE_DEVICES=cuda)
    p = subprocess.run([sys.executable, "-m", "gaussreg.slurm", "task", str(runs_file)], env=env,
                       capture_output=True, text=True, timeout=300)
    return run, p


@pytest.mark.process
# about a CPU-only build of torch; conftest hides the GPUs, so is_available() would always say no
@pytest.mark.skipif(__import__("torch").version.cuda is not None, reason="a CUDA build of torch is never refused a GPU")
def test_a_gpu_task_with_a_cpu_torch_refuses_instead_of_training_on_the_cpu(tmp_path):
    run, p = _task_env(tmp_path, {}, gpus=1, cuda="1")
    assert p.returncode == 2, p.stdout + p.stderr
    st = run.status()
    assert (st["state"], st["gpu_slot"], st["slurm_job"]) == ("failed", "1", "9_0")
    assert "this run was given GPU 1 (CUDA_VISIBLE_DEVICES='1')" in st["error"] and "CPU-only build" in st["error"]
    assert not run.epochs()


@pytest.mark.process
@pytest.mark.parametrize("spec_extra,gpus", [({"device": "cpu"}, 1), ({}, 0)])
def test_a_cpu_spec_on_a_gpu_task_or_a_cpu_task_trains(tmp_path, spec_extra, gpus):
    # CUDA_VISIBLE_DEVICES=0 in the CPU task too: what a node without device cgroups leaves
    # set (or unset: every GPU visible); the task must hide it from a device = "auto" worker
    run, p = _task_env(tmp_path, spec_extra, gpus=gpus, cuda="0")
    assert p.returncode == 0, p.stdout + p.stderr
    st = run.status()
    assert st["state"] == "completed" and st["gpu_slot"] == ("0" if gpus else None)
    assert st["cuda_visible_devices"] == ("0" if gpus else "")


@pytest.mark.process
def test_a_packed_slurm_task_kills_a_cancelled_worker_stuck_in_its_factory(tmp_path, monkeypatch):
    from gaussreg.launch import slurm
    from gaussreg.runs.spec import resolve, run_id
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "stuckpack.py").write_text(
        "import os, time\n"
        "def hang(info):\n"
        "    open(os.path.join(os.environ['STUCK_DIR'], str(os.getpid())), 'w').close()\n"
        "    while True:\n"
        "        time.sleep(0.05)\n")
    (tmp_path / "pids").mkdir()
    st = Store(tmp_path / "runs")
    runs = []
    for seed in (1, 2):
        spec = resolve({"dataset": "synthetic", "model": "stuckpack:hang", "preset": "lenet", "method": "baseline",
                        "experiment": "sl", "max_epochs": 1, "seed": seed, "python_path": [str(tmp_path / "src")]})
        runs.append(st.create(spec, run_id(spec)))
    (tmp_path / "runs.txt").write_text("".join(f"{r.path}\n" for r in runs))
    for k, v in python_env(STUCK_DIR=str(tmp_path / "pids"), SLURM_ARRAY_JOB_ID="9", SLURM_ARRAY_TASK_ID="0").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(slurm, "GRACE_S", 2.0)

    def cancel_once_in_factories():
        deadline = time.time() + 120
        while len(list((tmp_path / "pids").iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.05)  # both workers are in their factories
        for r in runs:
            r.cancel_request.write_text("{}")  # what gaussreg cancel writes for a packed run
    threading.Thread(target=cancel_once_in_factories, daemon=True).start()
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    t0 = time.time()
    try:
        assert slurm._task(tmp_path / "runs.txt", 2) == 1  # signals are only set in the main thread
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert len(list((tmp_path / "pids").iterdir())) == 2 and time.time() - t0 < 120
    for r in runs:
        st_ = r.status()
        assert st_["state"] == "cancelled" and "killed with SIGKILL" in st_["error"], st_
    assert not any(psutil.pid_exists(int(p.name)) for p in (tmp_path / "pids").iterdir())


@pytest.mark.parametrize("command", ["scancel", "squeue", "sbatch"])
def test_a_slurm_command_that_hangs_is_bounded_and_said_in_one_sentence(fake_slurm, monkeypatch, command):
    from gaussreg.launch.control import ControlError
    from gaussreg.launch.request import LaunchError, LaunchRequest, plan, submit_slurm
    if command == "sbatch":  # the submission itself hangs
        monkeypatch.chdir(fake_slurm["dir"])
        monkeypatch.setenv("PATH", f"{fake_slurm['bin']}:{os.environ['PATH']}")
    else:
        fake_slurm["submit"]()
    pid_file = fake_slurm["dir"] / f"{command}.pid"
    # a controller that never answers; its child (sleep) must not outlive the timeout either
    (fake_slurm["bin"] / command).write_text(f"#!/bin/bash\nsleep 1000 &\necho $! > {pid_file}\nwait\n")
    monkeypatch.setattr(slurm, "COMMAND_TIMEOUT_S", 1.0)
    monkeypatch.setattr(slurm, "SBATCH_TIMEOUT_S", 1.0)
    t0 = time.time()
    if command == "sbatch":
        with pytest.raises(LaunchError) as e:
            submit_slurm(plan(LaunchRequest("m.toml", "runs", backend="slurm")))
        assert "check `squeue --me`" in str(e.value)
    elif command == "scancel":
        run = next(iter(Store(fake_slurm["dir"] / "runs").runs()))
        with pytest.raises(ControlError) as e:
            slurm.cancel(run)
        assert "may still run; `gaussreg cancel` again retries" in str(e.value)
    else:
        with pytest.raises(slurm.SlurmError) as e:
            slurm.squeue()
    assert str(e.value).startswith(f"{command} did not answer within 1 s: is the Slurm controller reachable")
    assert "\n" not in str(e.value) and time.time() - t0 < 15
    sleeper = int(pid_file.read_text())
    deadline = time.time() + 10
    while psutil.pid_exists(sleeper) and psutil.Process(sleeper).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the hanging command's child outlived the timeout"
        time.sleep(0.05)


def test_follow_whose_squeue_fails_ends_in_one_sentence(fake_slurm):
    fake_slurm["submit"]()
    once = fake_slurm["dir"] / "squeue_answers_once"
    once.touch()  # the submission's squeue answers; the live view's do not (PATH holds only the fakes: no rm)
    (fake_slurm["bin"] / "squeue").write_text(f"#!/bin/bash\n[ -f {once} ] && {{ {sys.executable} -c 'import os; os.remove(\"{once}\")'; exit 0; }}\n"
                                              "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2\n"
                                              "exit 1\n")
    r = gr(fake_slurm, "run", "m.toml", "--backend", "slurm", "--follow")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "squeue failed: slurm_load_jobs error: Unable to contact slurm controller; the runs stay submitted" in \
        " ".join(r.stderr.split())
    assert not once.exists()


def test_job_ids_are_ascii_digits_of_sane_length():
    assert slurm.parse_job_id("4242;cluster\n") == "4242" and slurm.parse_job_id("4294967295") == "4294967295"
    for bad in ("١٢٣", "９９", "9" * 400, "12345678901", "-1", "4242 extra", ""):
        with pytest.raises(slurm.SlurmError, match="sbatch printed no job id"):
            slurm.parse_job_id(bad)
    tasks = slurm.parse_squeue("5_0|RUNNING|None\n١٢_٣|PENDING|Priority\n" + "9" * 400 + "_1|PENDING|None\n5|X|Y\n")
    assert list(tasks) == ["5_0"]


def test_sbatch_that_prints_a_400_digit_job_id_is_refused_and_leaves_no_launch(fake_slurm):
    (fake_slurm["bin"] / "sbatch").write_text("#!/bin/bash\necho '" + "7" * 400 + "'\n")
    r = gr(fake_slurm, "run", "m.toml", "--backend", "slurm")
    assert r.returncode == 2 and "sbatch printed no job id" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list((fake_slurm["dir"] / "runs" / "_slurm").iterdir()) == []
    assert all(r_.status()["state"] != "queued" or "slurm_job" not in r_.status()
               for r_ in Store(fake_slurm["dir"] / "runs").runs())


@pytest.mark.parametrize("name", ["runs\nevil", "runs-%j", "runs%%", "tab\there"])
def test_store_paths_that_slurm_misreads_are_refused(fake_slurm, name):
    r = gr(fake_slurm, "run", "m.toml", "--backend", "slurm", "--store", name)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "which Slurm would misread" in " ".join(r.stderr.split()) and "without it for --backend slurm" in r.stderr
    assert not (fake_slurm["dir"] / name).exists() and fake_slurm["calls"]("sbatch") == []
    # the library refuses it too (the TUI's rerun of a run resubmits through slurm.submit)
    with pytest.raises(slurm.SlurmError, match="Slurm would misread"):
        slurm.submit(Store(fake_slurm["dir"] / name), ["x"], slurm.settings())


def test_cancel_never_hands_scancel_a_damaged_job_id(fake_slurm):
    from gaussreg.launch.control import ControlError
    fake_slurm["submit"]()
    run = next(iter(Store(fake_slurm["dir"] / "runs").runs()))
    for job in ("--user=someone", "١٢٣_0", "4242_0 4243_0"):
        run.write_status({**run.status(), "state": "queued", "slurm_job": job})
        with pytest.raises(ControlError, match="names no Slurm job that scancel can take"):
            slurm.cancel(run)
    assert fake_slurm["calls"]("scancel") == []


def test_a_heartbeat_dated_in_the_future_is_not_trusted_and_says_so(tmp_path):
    from datetime import datetime, timedelta, timezone

    from gaussreg.runs.reader import list_runs
    from gaussreg.runs.store import STALE_S
    from gaussreg.runs.spec import resolve, run_id
    st = Store(tmp_path / "runs")
    spec = resolve({"dataset": "synthetic", "model": "mlp", "method": "baseline", "experiment": "skew"})
    run = st.create(spec, run_id(spec))
    future = (datetime.now(timezone.utc) + timedelta(hours=3)).isoformat()
    node = {"state": "running", "host": "node-with-a-fast-clock", "pid": 4242, "backend": "slurm",
            "slurm_job": "7_0", "updated_at": future, "started_at": future}
    run.write_status(node)
    # just written: the status file's own time (the shared filesystem's) says the worker is alive
    assert run.state() == "running"
    old = time.time() - STALE_S - 60  # no write since: the worker died, whatever its clock says
    os.utime(run.status_file, (old, old))
    assert run.state() == "interrupted"
    note = run.heartbeat_note(run.status())
    assert note.startswith("its heartbeat is dated 3.0 h in the future (clock skew between nodes?)"), note
    (row,) = list_runs(st)
    assert row["state"] == "interrupted" and row["error"] == note
    # a clock a few seconds ahead is ordinary: that heartbeat still counts
    run.write_status({**node, "updated_at": (datetime.now(timezone.utc) + timedelta(seconds=5)).isoformat()})
    os.utime(run.status_file, (old, old))
    assert run.state() == "running" and run.heartbeat_note(run.status()) is None


@pytest.mark.process
def test_show_says_a_heartbeat_is_dated_in_the_future(tmp_path):
    from datetime import datetime, timedelta, timezone

    from gaussreg.runs.spec import resolve, run_id
    st = Store(tmp_path / "runs")
    spec = resolve({"dataset": "synthetic", "model": "mlp", "method": "baseline", "experiment": "skew"})
    run = st.create(spec, run_id(spec))
    future = (datetime.now(timezone.utc) + timedelta(minutes=30)).isoformat()
    run.write_status({"state": "running", "host": "elsewhere", "pid": 1, "updated_at": future, "started_at": future})
    old = time.time() - 600
    os.utime(run.status_file, (old, old))
    r = subprocess.run(cli("show", run.id, "--store", st.root), capture_output=True, text=True,
                       env=python_env(COLUMNS="300"))
    assert r.returncode == 0, r.stderr
    assert "interrupted: its heartbeat is dated 30 min in the future (clock skew between nodes?)" in r.stdout


def _by_job(root) -> dict:
    return {r.status()["slurm_job"]: r for r in Store(root).runs()}


def test_a_launch_larger_than_max_array_size_is_split_and_every_job_id_reader_follows(fake_slurm, monkeypatch):
    d = fake_slurm["dir"]
    (d / "max_array_size").write_text("2")  # indices 0 and 1: 3 runs are two array jobs
    (d / "job_seq").write_text("500")
    r = gr(fake_slurm, "run", "m.toml", "--backend", "slurm", "--array-parallelism", "2", "--dry-run")
    assert r.returncode == 0 and not fake_slurm["calls"]("sbatch"), r.stderr
    shown = [line for line in r.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(shown) == 2 and shown[0].endswith("JOB.sh 0") and shown[1].endswith("JOB.sh 2"), r.stdout
    assert "--array=0-0%2" in shown[1] and "--dependency=afterany:JOB1" in shown[1]
    r = gr(fake_slurm, "run", "m.toml", "--backend", "slurm", "--array-parallelism", "2")
    assert r.returncode == 0, r.stderr
    assert "submitted 3 run(s) as Slurm array jobs 500, 501 (3 task(s))" in r.stdout, r.stdout
    first, second = fake_slurm["calls"]("sbatch")
    assert "--array=0-1%2" in first and first[-1] == "0" and not any(a.startswith("--dependency") for a in first)
    # the second job holds the launch's task 2 as its index 0, and waits for the first (array_parallelism
    # bounds the launch, not each job)
    assert "--array=0-0%2" in second and second[-1] == "2" and "--dependency=afterany:500" in second
    by_job = _by_job(d / "runs")
    assert sorted(by_job) == ["500_0", "500_1", "501_0"]
    assert [(s["slurm_job_id"], s["slurm_array_index"]) for s in (by_job["501_0"].status(), by_job["500_1"].status())] \
        == [("501", 0), ("500", 1)]
    sub = Path(second[-2]).parent
    assert Path((sub / "runs.txt").read_text().split()[2]).name == by_job["501_0"].id  # task 2 of the launch
    assert json.loads((sub / "job.json").read_text())["job_ids"] == ["500", "501"]
    ls = gr(fake_slurm, "ls")
    assert all(j in ls.stdout for j in ("500_0", "500_1", "501_0")), ls.stdout

    # follow asks squeue once for both jobs and names the run of the second one
    (d / "squeue.txt").write_text("500_0|RUNNING|None\n500_1|RUNNING|None\n501_0|PENDING|PartitionConfig\n")
    r = gr(fake_slurm, "run", "m.toml", "--backend", "slurm", "--follow")
    assert r.returncode == 1 and f"Slurm will not start 1 run(s) (PartitionConfig): {by_job['501_0'].id}" in r.stdout
    assert "already queued in Slurm job 501_0" in r.stdout and len(fake_slurm["calls"]("sbatch")) == 2

    # cancel and resubmit of the run in the second job
    (d / "squeue.txt").unlink()
    r = gr(fake_slurm, "cancel", by_job["501_0"].id)
    assert r.returncode == 0 and fake_slurm["calls"]("scancel") == [["501_0"]], r.stdout + r.stderr
    assert by_job["501_0"].state() == "cancelled"
    monkeypatch.setenv("PATH", f"{fake_slurm['bin']}:{os.environ['PATH']}")
    resub = slurm.resubmit(by_job["501_0"])
    assert resub.job_id == "502" and by_job["501_0"].status()["slurm_job"] == "502_0"
    assert fake_slurm["calls"]("sbatch")[-1][-1] == "0"


def test_a_per_user_job_limit_submits_what_it_can_says_what_it_did_not_and_exits_2(fake_slurm):
    d = fake_slurm["dir"]
    (d / "max_array_size").write_text("2")
    (d / "job_seq").write_text("600")
    (d / "accept_jobs").write_text("1")  # the second array job hits QOSMaxSubmitJobPerUserLimit
    r = gr(fake_slurm, "run", "m.toml", "--backend", "slurm")
    assert r.returncode == 2, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    assert ("2 of 3 run(s) were submitted as Slurm array job(s) 600 and recorded, the other 1 were not, because "
            "sbatch refused the job (a limit on the jobs you may submit): sbatch: error: "
            "QOSMaxSubmitJobPerUserLimit") in err, err
    assert "run the same command again later to submit the rest" in err and "Traceback" not in r.stderr
    by_job = _by_job(d / "runs")
    assert sorted(by_job) == ["600_0", "600_1"]  # the refused run has no directory, no job id
    (sub,) = (d / "runs" / "_slurm").iterdir()
    job = json.loads((sub / "job.json").read_text())
    assert job["job_ids"] == ["600"] and sorted(job["runs"]) == sorted(r.id for r in by_job.values())

    # later: the same command submits the rest only
    (d / "accept_jobs").write_text("5")
    (d / "squeue.txt").write_text("600_0|RUNNING|None\n600_1|PENDING|Priority\n")
    r = gr(fake_slurm, "run", "m.toml", "--backend", "slurm")
    assert r.returncode == 0 and "submitted 1 run(s) as Slurm array job 601" in r.stdout, r.stdout + r.stderr
    assert sorted(_by_job(d / "runs")) == ["600_0", "600_1", "601_0"]


def test_a_big_launch_writes_its_run_directories_after_sbatch_in_a_process_of_its_own(fake_slurm, monkeypatch):
    monkeypatch.setattr(slurm, "INLINE_RUNS", 1)  # 3 runs count as a big launch
    sub = fake_slurm["submit"]()
    launch = sub.script.parent
    runs = Store(fake_slurm["dir"] / "runs")

    def written():
        log = launch / slurm.WRITER_LOG
        return log.exists() and "wrote 3 run directories" in log.read_text()
    wait_for(written, 120, "the detached writer to write the run directories", every=0.05)
    statuses = sorted((r.status() for r in runs.runs()), key=lambda s: s["slurm_array_index"])
    assert [(s["state"], s["slurm_job"], s["slurm_launch"]) for s in statuses] == \
        [("queued", f"4242_{i}", launch.name) for i in range(3)]
    assert sorted(r.id for r in runs.runs()) == sorted(sub.submitted)


def test_an_array_task_that_starts_before_its_directory_is_written_makes_it_and_trains(fake_slurm, monkeypatch):
    d = fake_slurm["dir"]
    (d / "max_array_size").write_text("2")
    (d / "job_seq").write_text("700")
    monkeypatch.setattr(slurm, "write_runs", lambda *a, **k: 0)  # the writer has not got there yet
    from gaussreg.launch.request import LaunchRequest, plan, submit_slurm
    monkeypatch.chdir(d)
    monkeypatch.setenv("PATH", f"{fake_slurm['bin']}:{os.environ['PATH']}")
    man = (d / "m.toml").read_text().replace("max_epochs = 1", "max_epochs = 1\ndevice = \"cpu\"")
    (d / "m.toml").write_text(man.replace('gpus_per_run = 1', 'gpus_per_run = 0'))
    sub = submit_slurm(plan(LaunchRequest("m.toml", "runs", backend="slurm")))
    assert sub.job_ids == ["700", "701"] and not list(Store(d / "runs").runs())
    # the same launch again while Slurm has its tasks: nothing is submitted twice, directories or not
    (d / "squeue.txt").write_text("700_0|PENDING|Priority\n700_1|PENDING|Priority\n701_0|PENDING|Priority\n")
    again = slurm.submit(Store(d / "runs"), sub.submitted, slurm.settings(), specs={r: {} for r in sub.submitted})
    assert again.job_id is None and sorted(again.skipped.values()) == [
        f"already queued in Slurm job {t} (its directory is still to be written)" for t in ("700_0", "700_1", "701_0")]
    # --follow waits for them, and names the run whose task Slurm will not start
    (d / "squeue.txt").write_text("700_0|PENDING|Priority\n700_1|PENDING|Priority\n701_0|PENDING|PartitionConfig\n")
    from rich.console import Console
    from gaussreg.views import slurm_view
    con = Console(record=True, width=200)
    assert slurm_view.follow(Store(d / "runs"), sub.submitted, con) == 1
    assert f"Slurm will not start 1 run(s) (PartitionConfig): {sub.submitted[2]}" in con.export_text()
    (d / "squeue.txt").unlink()
    # task 0 of the second array job: the launch's task 2
    p = subprocess.run([sys.executable, "-m", "gaussreg.launch.slurm", "task", str(sub.script.parent / "runs.txt"),
                        "--first-task", "2"], capture_output=True, text=True, timeout=300,
                       env=python_env(SLURM_ARRAY_JOB_ID="701", SLURM_ARRAY_TASK_ID="0", GAUSSREG_BACKEND="slurm",
                                      GAUSSREG_SLURM_LAUNCH=sub.script.parent.name))
    assert p.returncode == 0, p.stdout + p.stderr
    (run,) = Store(d / "runs").runs()
    assert run.id == sub.submitted[2]
    st = run.status()
    assert (st["state"], st["slurm_job"], st["slurm_array_index"]) == ("completed", "701_0", 0)
    assert run.spec()["experiment"] == "sl" and run.result()["test_accuracy"] >= 0
