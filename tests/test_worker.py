import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import python_env, wait_for
from factories import queued_run, spec_only_run

from gaussreg.data import loading as data
from gaussreg.runs.reader import training_time
from gaussreg.runs.spec import resolve
from gaussreg.runs.store import parse_iso

FAST = {"dataset": "synthetic", "model": "mlp", "method": "baseline", "batch_size": 100,
        "optimizer": {"lr": 1e-3}, "robustness": {"sigmas": [0.0, 0.2, 0.4]}}


def make_run(tmp_path, name="run", **spec):
    return spec_only_run(tmp_path, name, **{**FAST, **spec})


def worker(run, *args, **env):
    return subprocess.Popen([sys.executable, "-m", "gaussreg.worker", str(run.path), *args],
                            env=python_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p, timeout=300):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


@pytest.mark.process
def test_two_epoch_run_writes_the_documented_files(tmp_path):
    run = make_run(tmp_path, model="lenet", method="regularizer", params={"sigma": 0.3, "alpha": 1.0},
                   max_epochs=2, train_subset=400, test_subset=100)
    rc, _, err = finish(worker(run))
    assert rc == 0, err
    for f in ("spec.json", "status.json", "events.jsonl", "result.json", "best.pt", "last.pt", "worker.log"):
        assert run.file(f).exists(), f
    st = run.status()
    assert st["state"] == "completed" and st["epoch"] == 2 and st["max_epochs"] == 2
    for k in ("pid", "host", "device", "started_at", "updated_at", "finished_at", "error"):
        assert k in st
    events, _ = run.events()
    epochs = [e for e in events if e["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for k in ("train_loss", "train_terms", "val_loss", "val_ce", "val_accuracy", "lr", "epoch_time", "images_per_s"):
        assert k in epochs[0]
    assert set(epochs[0]["train_terms"]) == {"ce", "reg"}
    # the validation loss is the method's own objective, not the clean CE
    assert epochs[0]["val_loss"] > epochs[0]["val_ce"]
    test = [e for e in events if e["type"] == "test"]
    assert len(test) == 1 and len(test[0]["per_sigma"]) == 3
    res = run.result()
    assert res["epochs_run"] == 2 and res["best_epoch"] in (1, 2) and res["parameters"] == 3_274_634
    assert res["sizes"] == {"train": 400, "val": 44, "test": 100}
    # the clean test pass and the robustness curve's sigma = 0 point classify the same 100 images
    assert res["test_accuracy"] == test[0]["test_accuracy"] == pytest.approx(res["accuracy_per_sigma"][0])
    assert res["test_accuracy"] * 100 == pytest.approx(round(res["test_accuracy"] * 100))
    assert res["per_sigma"][0] == 1.0 and res["robustness"] == pytest.approx(
        (0.1 * (res["per_sigma"][0] + res["per_sigma"][1]) + 0.1 * (res["per_sigma"][1] + res["per_sigma"][2])) / 0.4)
    assert res["versions"]["torch"] == torch.__version__ and res["device"] == "cpu"
    # what repeatability depends on: no GPU fields on a CPU; the fp32 regularizer's exact kernel ran
    assert res["repeatability"] == {"cuda": None, "cudnn": None, "driver": None, "gpu_name": None, "gpu_uuid": None,
                                    "tf32": False, "inductor_deterministic": True, "regularizer_kernel": ["exact"],
                                    "regularizer_compile_error": None}
    assert res["gpu_peak_memory"] is None
    # validation robustness for selecting on validation: every validation image here (44 <= 1000), same sigmas
    assert res["val_robustness_images"] == 44 and len(res["val_per_sigma"]) == 3 and res["val_per_sigma"][0] == 1.0
    vps = res["val_per_sigma"]
    assert res["val_robustness"] == pytest.approx((0.1 * (vps[0] + vps[1]) + 0.1 * (vps[1] + vps[2])) / 0.4)
    assert len(res["val_accuracy_per_sigma"]) == 3
    # last.pt holds no generator state (epochs are seeded from (seed, epoch)), so it resumes on any device
    ck = torch.load(run.file("last.pt"), weights_only=True)
    assert set(ck) == {"model", "optimizer", "scheduler", "state", "spec"} and ck["state"]["epoch"] == 2
    assert ck["spec"] == resolve(json.loads(run.file("spec.json").read_text()))  # a checkpoint says what it is
    best = torch.load(run.file("best.pt"), weights_only=True)  # the model only: what evaluation reads
    assert set(best) == {"model", "state", "spec"} and best["state"]["epoch"] == res["best_epoch"]
    assert json.loads(run.file("spec.json").read_text())["model"] == "lenet"  # never rewritten


def _compare_results(a, b):
    # steps and passes too: a resumed run reports the totals of the whole run, not of its last part
    for k in ("test_accuracy", "test_loss", "robustness", "per_sigma", "accuracy_per_sigma", "best_epoch",
              "epochs_run", "best_val_loss", "steps", "images"):
        assert a[k] == b[k], k
    assert b["train_cpu_s"] > 0


# (method, params): per clean image and epoch, the items of an epoch and the passes by kind
COST = {"baseline": ({}, 1, {"clean": 1, "noisy": 0, "expected": 0}),
        "augment": ({"sigma": 0.3, "folds": 2}, 3, {"clean": 1, "noisy": 2, "expected": 0}),
        "regularizer": ({"sigma": 0.3, "alpha": 1.0}, 1, {"clean": 1, "noisy": 0, "expected": 1}),
        "randsign": ({"eps": 0.1}, 1, {"clean": 0, "noisy": 1, "expected": 0}),
        "fgsm": ({"eps": 0.1}, 1, {"clean": 1, "noisy": 1, "expected": 0})}


@pytest.mark.process
def test_a_run_records_its_cost(tmp_path):
    """result.json has the optimizer steps (epochs x batches), the forward passes by kind
    (clean images, noisy copies, expected activations) and the training time: CPU seconds
    of the process, and no GPU seconds on a CPU."""
    runs = {m: make_run(tmp_path, m, method=m, params=p, max_epochs=3, train_subset=250, test_subset=50)
            for m, (p, _, _) in COST.items()}
    procs = {m: worker(run) for m, run in runs.items()}  # side by side: five small processes
    for m, p in procs.items():
        rc, _, err = finish(p)
        assert rc == 0, (m, err)
    for m, run in runs.items():
        _, copies, per_image = COST[m]
        res = run.result()
        n, epochs = res["sizes"]["train"], res["epochs_run"]
        assert (n, epochs) == (250, 3)
        assert res["steps"] == epochs * math.ceil(n * copies / 100), m  # batches of 100
        assert res["images"] == {k: epochs * n * v for k, v in per_image.items()}, m
        assert res["train_gpu_s"] is None
        # one compute thread (GAUSSREG_THREADS=1): CPU seconds are at most about the wall of the epochs
        assert 0 < res["train_cpu_s"] <= 1.5 * res["train_time_s"] + 0.1, m
        ck = torch.load(run.file("last.pt"), weights_only=True)["state"]
        assert (ck["steps"], ck["images"], ck["cpu_time"]) == (res["steps"], res["images"], res["train_cpu_s"])


@pytest.mark.process
def test_a_resume_from_a_checkpoint_without_cost_counts_the_epochs_done(tmp_path):
    """A last.pt of a worker that recorded no cost: steps and passes of the epochs it did are
    the same every epoch, so the totals are exact; its times were not measured and stay None."""
    run = make_run(tmp_path, method="augment", params={"sigma": 0.3, "folds": 1}, max_epochs=1, train_subset=200)
    assert finish(worker(run))[0] == 0
    ck = torch.load(run.file("last.pt"), weights_only=True)
    for k in ("steps", "images", "cpu_time", "gpu_time"):
        del ck["state"][k]
    torch.save(ck, run.file("last.pt"))
    run.file("spec.json").write_text(json.dumps({**json.loads(run.file("spec.json").read_text()), "max_epochs": 2}))
    rc, _, err = finish(worker(run, "--resume"))
    assert rc == 0, err
    res = run.result()
    assert res["epochs_run"] == 2 and res["steps"] == 2 * 4  # 400 items in batches of 100
    assert res["images"] == {"clean": 400, "noisy": 400, "expected": 0}
    assert res["train_cpu_s"] is None and res["train_gpu_s"] is None


BF16_REGULARIZER = dict(model="lenet", method="regularizer", params={"sigma": 0.3, "alpha": 1.0}, batch_size=200,
                        train_subset=200, test_subset=100, precision="bf16", max_epochs=6)


@pytest.mark.process
@pytest.mark.parametrize("noise,everys,more", [("fresh", ("0", "3600"), {"precision": "fp32"}),
                                               ("fixed", ("0",), {"precision": "bf16"}),
                                               ("shared", ("0",), {"precision": "fp32"}),
                                               ("fresh", ("0",), BF16_REGULARIZER)])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, noise, everys, more):
    """every: GAUSSREG_CHECKPOINT_S; with 0 last.pt is written at every epoch end, with an
    hour only at the start, so the resume replays every epoch: both end equal to the
    uninterrupted run beside them. In fp32 and bf16, and for the regularizer's fused bf16
    kernel in a channels_last LeNet (batches of 200 are over moments._COMPILE_FROM). That
    kernel runs uncompiled here (TORCH_COMPILE_DISABLE: the same maths; compiling it costs
    ~30 s a process on a cold cache); test_moments compares it compiled with it uncompiled."""
    spec = {**dict(method="augment", params={"sigma": 0.3, "folds": 1, "noise": noise}, max_epochs=12,
                   train_subset=600), **more}
    env = {"TORCH_COMPILE_DISABLE": "1"}
    ref = make_run(tmp_path, "ref", **spec)
    runs = {every: make_run(tmp_path, f"killed-{every}", **spec) for every in everys}
    pref = worker(ref, **env)  # alongside the runs it is compared with: one thread each, so the same numbers
    procs = {every: worker(run, GAUSSREG_CHECKPOINT_S=every, **env) for every, run in runs.items()}

    killed = []

    def kill_at_the_third_epoch():  # each run as soon as it has finished 3 epochs; True once all are
        for every in [e for e in procs if sum(ev["type"] == "epoch" for ev in runs[e].events()[0]) >= 3]:
            killed.append(procs.pop(every))
            killed[-1].send_signal(signal.SIGKILL)
        return not procs
    wait_for(kill_at_the_third_epoch, 120, "every run's third epoch", every=0.01)
    for p in killed:  # gone, not only signalled: until then the dead worker still holds the run's lock
        assert p.wait(timeout=60) == -signal.SIGKILL
    assert finish(pref)[0] == 0
    for every, run in runs.items():
        assert run.status()["state"] == "running"  # no chance to say anything
        assert run.state() == "interrupted"  # but a reader can tell: pid gone, lock free
        done = sum(e["type"] == "epoch" for e in run.events()[0])
        assert 3 <= done < spec["max_epochs"]
        saved = torch.load(run.file("last.pt"), weights_only=True)["state"]["epoch"]
        assert saved in ((done, done - 1) if every == "0" else (0,))  # the kill may fall between event and write
    resumed = [worker(run, "--resume", **env) for run in runs.values()]
    for run, p in zip(runs.values(), resumed):
        rc, _, err = finish(p)
        assert rc == 0, err
        _compare_results(ref.result(), run.result())
        assert [e["val_loss"] for e in run.epochs()] == [e["val_loss"] for e in ref.epochs()]
        assert any(e["type"] == "resume" for e in run.events()[0])
        assert run.result()["precision"] == run.status()["precision"] == spec["precision"]


@pytest.mark.process
def test_sigterm_cancels_with_a_usable_last_checkpoint(tmp_path):
    run = make_run(tmp_path, max_epochs=1000, early_stop=1000)  # it cannot end before the SIGTERM
    p = worker(run)
    wait_for(lambda: any(e["type"] == "progress" for e in run.events()[0]), 120, "the worker's first progress event")
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    rc, _, _ = finish(p, 30)
    assert rc != 0 and time.time() - t0 < 5
    st = run.status()
    assert st["state"] == "cancelled" and "SIGTERM" in st["error"]
    ck = torch.load(run.file("last.pt"), weights_only=True)
    # the epoch under way is dropped: last.pt holds the epochs finished before the SIGTERM
    assert "model" in ck and ck["state"]["epoch"] == sum(e["type"] == "epoch" for e in run.events()[0])
    # usable: resuming finishes the run from there
    run.file("spec.json").write_text(json.dumps({**json.loads(run.file("spec.json").read_text()), "max_epochs": 1}))
    assert finish(worker(run, "--resume"))[0] == 0 and run.status()["state"] == "completed"


@pytest.mark.process
def test_non_finite_loss_is_diverged_with_epoch_and_term(tmp_path):
    # sigma^2 = 1e40 overflows float32: the regularizer term becomes NaN, the clean CE does not (at first)
    run = make_run(tmp_path, method="regularizer", params={"sigma": 1e20, "alpha": 1.0}, max_epochs=3)
    rc, _, err = finish(worker(run))
    assert rc == 1, err
    st = run.status()
    assert st["state"] == "diverged" and st["diverged_epoch"] == 1 and st["diverged_term"] == "reg"
    assert "'reg'" in st["error"] and "epoch 1" in st["error"]
    assert not run.file("result.json").exists()


@pytest.mark.parametrize("change,needle", [
    ({"learning_rate": 0.1}, "unknown key 'learning_rate'"),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"method": "mixup"}, "unknown method 'mixup'"),
    ({"method": "regularizer", "params": {"sigma": -0.1, "alpha": 1}}, "'sigma' of method 'regularizer' must be >= 0"),
    ({"method": "regularizer", "params": {"sigma": 0.1, "alpha": -1}}, "'alpha' of method 'regularizer' must be >= 0"),
    ({"method": "fgsm", "params": {"eps": -0.01}}, "'eps' of method 'fgsm' must be >= 0"),
    ({"method": "augment", "params": {"sigma": 0.1, "folds": 0}}, "'folds' of method 'augment' must be >= 1"),
    ({"dataset": "mnist", "data_dir": "/nonexistent"}, "Dataset 'mnist' was not found"),
])
def test_bad_spec_fails_before_training_with_exit_2(tmp_path, capsys, change, needle):
    """The worker's checks, run in this process: they say why before anything is trained."""
    from gaussreg.runs.worker import main
    run = make_run(tmp_path, **change)
    rc, err = main([str(run.path)]), capsys.readouterr().err
    assert rc == 2
    st = run.status()
    assert st["state"] == "failed" and needle in st["error"], st["error"]
    assert needle in err and "Traceback" not in err
    assert not run.file("events.jsonl").exists() and not run.file("last.pt").exists()


@pytest.mark.process
def test_a_fixed_noise_run_planned_with_bank_1_refuses_to_train_with_exit_2(tmp_path):
    """Its id stands for noise bank 1, which could hold +-inf (issue 29): trained with bank 2
    under that id, its result would be another run's. A spec.json written by hand (no id
    was made from it) trains with bank 2."""
    from gaussreg.runs.spec import run_id
    fixed = {"method": "augment", "params": {"sigma": 0.3, "folds": 1, "fresh_noise": False}, "max_epochs": 1,
             "train_subset": 100, "test_subset": 100}
    old = resolve({**FAST, **fixed, "params": {"sigma": 0.3, "folds": 1}})
    old["params"] = fixed["params"]  # the spec main stored before issue 29: no noise, no bank
    run = make_run(tmp_path, run_id(old), **old)
    rc, _, err = finish(worker(run))
    assert rc == 2 and f"run {run.id} was planned with fixed noise from noise bank version 1" in err, err
    assert run.status()["state"] == "failed" and not run.file("last.pt").exists()
    by_hand = make_run(tmp_path, "by-hand", **fixed)
    rc, _, err = finish(worker(by_hand))
    assert rc == 0, err
    assert torch.load(by_hand.file("best.pt"), weights_only=True)["spec"]["params"]["bank"] == 2


def test_corrupt_spec_is_failed_with_exit_2(tmp_path, capsys):
    from gaussreg.runs.worker import main
    run = make_run(tmp_path)
    run.file("spec.json").write_text('{"dataset": "synth')
    rc, err = main([str(run.path)]), capsys.readouterr().err
    assert rc == 2 and "is not valid JSON" in err and "is not valid JSON" in run.status()["error"]


@pytest.mark.process
def test_second_worker_on_a_locked_run_refuses(tmp_path):
    run = make_run(tmp_path, max_epochs=1000, early_stop=1000)  # it cannot end before the SIGTERM
    p = worker(run)
    wait_for(lambda: run.file("events.jsonl").exists(), 120, "the first worker to start training")
    rc, _, err = finish(worker(run))
    assert rc == 3 and "already being trained" in err
    p.send_signal(signal.SIGTERM)
    finish(p)


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.skipif(data.find("fashion-mnist") is None,
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_lenet_fashion_mnist_two_epochs(tmp_path):
    """The real files, read, split and learnt from: 2,000 training images (stratified), 2
    epochs, the regularizer in the precision `auto` picks here (76.8 % on 1,000 test images
    on the development machines; chance is 10 %)."""
    run = make_run(tmp_path, dataset="fashion-mnist", model="lenet", method="regularizer",
                   params={"sigma": 0.25, "alpha": 1.0}, max_epochs=2, train_subset=2000, test_subset=1000,
                   optimizer={"lr": 1e-3}, robustness={"sigmas": [0.0, 0.1]})
    rc, _, err = finish(worker(run), timeout=900)
    assert rc == 0, err
    res = run.result()
    print(f"LeNet Fashion-MNIST 2 epochs: test acc {res['test_accuracy']:.4f}, "
          f"{res['train_time_s'] / 2:.1f}s/epoch")
    assert res["sizes"] == {"train": 2000, "val": 222, "test": 1000}  # validation shrinks with the subset (1/9)
    assert res["test_accuracy"] >= 0.72 and res["per_sigma"][1] > 0.8


@pytest.mark.gpu
def test_the_worker_asks_for_deterministic_gpu_kernels_before_it_picks_the_device(tmp_path, monkeypatch):
    from gaussreg.runs import worker
    from gaussreg.runs.spec import SpecError
    from gaussreg.runs.store import Store
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.delenv("TORCHINDUCTOR_DETERMINISTIC", raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's default for convolutions
    import torch._inductor.config as inductor  # imported already (a compile ran): its setting is changed too
    monkeypatch.setattr(inductor, "deterministic", False)
    seen = {}

    def pick(name, gpu_slot=None):  # the device is picked before CUDA starts: the settings must be in place by then
        seen.update(cublas=os.environ.get("CUBLAS_WORKSPACE_CONFIG"), det=torch.backends.cudnn.deterministic,
                    bench=torch.backends.cudnn.benchmark, inductor_env=os.environ.get("TORCHINDUCTOR_DETERMINISTIC"),
                    inductor=inductor.deterministic,
                    tf32=(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        raise SpecError("device", "stop here")
    monkeypatch.setattr(worker, "pick_device", pick)
    run = queued_run(Store(tmp_path / "runs"), seed=1, experiment="t")
    assert worker.main([str(run.path)]) == 2
    assert seen == {"cublas": ":4096:8", "det": True, "bench": False, "inductor_env": "1", "inductor": True,
                    "tf32": (False, False)}


@pytest.mark.process
def test_sigterm_writes_the_last_finished_epoch_and_the_resume_is_exact(tmp_path):
    """last.pt is written on a timer (an hour here), and at a cancel: then it holds the last
    finished epoch, kept in memory since, and resuming from it equals an uninterrupted run."""
    spec = dict(method="regularizer", params={"sigma": 0.3, "alpha": 1.0}, max_epochs=10, train_subset=600)
    ref = make_run(tmp_path, "ref", **spec)
    assert finish(worker(ref))[0] == 0
    run = make_run(tmp_path, "stopped", **spec)
    p = worker(run, GAUSSREG_CHECKPOINT_S="3600")
    wait_for(lambda: sum(e["type"] == "epoch" for e in run.events()[0]) >= 3, 120, "3 epochs", every=0.01)
    assert torch.load(run.file("last.pt"), weights_only=True)["state"]["epoch"] == 0  # the timer has not fired
    p.send_signal(signal.SIGTERM)
    rc, _, err = finish(p, 60)
    assert rc == 128 + signal.SIGTERM, err
    done = sum(e["type"] == "epoch" for e in run.events()[0])
    assert 3 <= done < 10 and run.status()["state"] == "cancelled"
    # the stop is noticed at the next batch, so the epoch under way is dropped, never half-saved
    assert torch.load(run.file("last.pt"), weights_only=True)["state"]["epoch"] == done
    assert f"last.pt written (epoch {done})" in run.file("worker.log").read_text()
    before = torch.load(run.file("last.pt"), weights_only=True)["state"]["train_time"]
    rc, _, err = finish(worker(run, "--resume"))
    assert rc == 0, err
    _compare_results(ref.result(), run.result())
    assert [e["val_loss"] for e in run.epochs()] == [e["val_loss"] for e in ref.epochs()]
    # its training time in all: the epochs before the resume, which started_at no longer covers, and after
    st = run.status()
    assert before > 0 and st["time_before_s"] == before and ref.status()["time_before_s"] == 0.0
    since = parse_iso(st["finished_at"]) - parse_iso(st["started_at"])
    assert training_time(st, "completed") == pytest.approx(before + since)


@pytest.mark.process
def test_a_checkpoint_with_a_foreign_generator_state_resumes_exactly(tmp_path):
    """A last.pt from before epoch seeding, written on an 8-GPU box (a 16-byte CUDA generator
    state and eight CUDA states), resumes on this CPU and ends equal to an uninterrupted run:
    the generator state is never read, each epoch is seeded from (seed, epoch)."""
    spec = dict(method="augment", params={"sigma": 0.3, "folds": 1}, max_epochs=4, train_subset=400)
    ref = make_run(tmp_path, "ref", **spec)
    assert finish(worker(ref))[0] == 0
    run = make_run(tmp_path, "gpu-box", **{**spec, "max_epochs": 2})
    assert finish(worker(run))[0] == 0
    ck = torch.load(run.file("last.pt"), weights_only=True)
    cuda_state = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 128, 1, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)  # seed, offset
    ck["rng"] = {"generator": cuda_state, "torch": torch.get_rng_state(), "cuda": [cuda_state.clone()] * 8}
    with pytest.raises(RuntimeError):  # what the old code did with it here
        torch.Generator().set_state(cuda_state)
    torch.save(ck, run.file("last.pt"))
    run.file("spec.json").write_text(json.dumps({**json.loads(run.file("spec.json").read_text()), "max_epochs": 4}))
    rc, _, err = finish(worker(run, "--resume"))
    assert rc == 0, err
    _compare_results(ref.result(), run.result())


def test_epoch_randomness_depends_on_seed_and_epoch_only():
    from gaussreg.runs.training import epoch_seed
    a, b = torch.Generator(), torch.Generator()
    b.manual_seed(123)
    torch.randn(1000, generator=b)  # whatever state a resumed (or foreign) generator had
    for g in (a, b):
        g.manual_seed(epoch_seed(5, 3))
    assert torch.equal(torch.randperm(100, generator=a), torch.randperm(100, generator=b))
    assert len({epoch_seed(s, e) for s in range(20) for e in range(1, 50)}) == 20 * 49
    assert all(0 <= epoch_seed(s, e) < 2 ** 63 for s in (-1, 0, 2 ** 40) for e in (1, 1000))


@pytest.mark.process
def test_a_resume_that_cannot_read_last_pt_says_how_to_start_over(tmp_path):
    run = make_run(tmp_path, max_epochs=1)
    run.file("last.pt").write_bytes(b"not a checkpoint")
    rc, _, _ = finish(worker(run, "--resume"))
    st = run.status()
    assert rc == 1 and st["state"] == "failed"
    assert "cannot resume from" in st["error"] and "--rerun" in st["error"] and "deleting last.pt" in st["error"]


def _forbid_host_syncs(monkeypatch):
    """Every way a tensor's value reaches Python raises: on a GPU each one blocks the host."""
    def sync(*_a, **_k):
        raise AssertionError("host sync in the per-batch path")
    for name in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(torch, "as_tensor", sync)


def _training(method, params, X, Y, g, model, precision="fp32"):
    """A Training of `model` on (X, Y) by hand, as training.setup makes one (no optimizer step counters read)."""
    from gaussreg.data.loading import Splits
    from gaussreg.runs.training import Training
    from gaussreg.science.methods import make_method
    m = make_method(method, params) if isinstance(method, str) else method
    splits = Splits.__new__(Splits)
    splits.train_x, splits.train_y = X, Y
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    spec = {"batch_size": 8, "seed": 0}
    return Training(spec, X.device, splits, model, m, g, opt, None, precision, {})


@pytest.mark.parametrize("method,params", [
    ("baseline", {}), ("augment", {"sigma": 0.3, "folds": 2, "fresh_noise": True}),
    ("augment", {"sigma": 0.3, "folds": 2, "fresh_noise": False}), ("augment", {"sigma": 0.3, "folds": 2, "noise": "shared"}),
    ("regularizer", {"sigma": 0.3, "alpha": 1.0}),
    ("regularizer", {"sigma": 0.3, "alpha": 1.0, "depth": "all"}), ("randsign", {"eps": 0.1}),
    ("fgsm", {"eps": 0.1}), ("regularizer", {"sigma": 0.3, "alpha": 1.0, "sigma_units": "reference"}),
    ("augment", {"sigma": 0.3, "folds": 2, "sigma_units": "reference"}), ("consistency", {"sigma": 0.3}),
    ("stability", {"sigma": 0.3, "alpha": 1.0})])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_and_its_bookkeeping_read_nothing_back_from_the_device(monkeypatch, method, params, precision):
    from gaussreg.data import datasets
    from gaussreg.runs.training import EpochTally
    from gaussreg.science.models import build_model
    torch.manual_seed(0)
    info = datasets.DatasetInfo("tiny", (1, 28, 28), 10, (0.3,), (0.2,))
    X, Y = torch.rand(20, 1, 28, 28), torch.arange(20) % 10
    g = torch.Generator().manual_seed(1)
    t = _training(method, params, X, Y, g, build_model("lenet", info), precision)
    m = t.method
    if params.get("sigma_units") == "reference":  # per channel, as the worker sets it
        m.pixel_sigma = tuple(m.reference_sigma(params, "tiny", info.mean, info.std))
    m.prepare(len(X), (1, 28, 28), g)
    m.batch(X, Y, torch.arange(2), g)  # a fixed bank's seed key is made once per run, not per batch
    real_step = t.opt.step

    def step(*a, **k):  # torch's Adam keeps its step counters on the CPU and reads them; not ours to check
        monkeypatch.undo()
        r = real_step(*a, **k)
        _forbid_host_syncs(monkeypatch)
        return r
    t.opt.step = step
    tally = EpochTally(m.term_names, 9, X.device)
    perm = torch.randperm(len(X) * m.copies, generator=g)
    _forbid_host_syncs(monkeypatch)
    for b in range(3):
        t.step(perm[b * 8:(b + 1) * 8], tally)
    with pytest.raises(AssertionError, match="host sync"):  # the trap was armed all along
        float(tally.sums[0])
    monkeypatch.undo()
    k = len(m.term_names) + 1
    assert torch.isfinite(tally.sums).all() and (tally.sums > 0).all() and tally.first_bad.tolist() == [9] * k
    assert tally.has_logits and tally.seen == len(perm[:24]) and 0 <= int(tally.correct) <= tally.seen


def test_the_first_batch_a_term_went_non_finite_is_kept():
    from gaussreg.runs.training import Diverged, EpochTally
    from gaussreg.science.methods import Baseline

    class Bad(Baseline):
        term_names = ("ce", "reg")

        def loss(self, model, x, y, g):
            L = super().loss(model, x, y, g)
            reg = torch.tensor(float("nan") if self.calls in (2, 4) else 1.0)
            self.calls += 1
            return L._replace(total=L.total + 0 * reg.nan_to_num(), terms={"ce": L.terms["ce"], "reg": reg})
    m = Bad()
    m.calls = 0
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    X, Y = torch.rand(10, 4), torch.arange(10) % 3
    t = _training(m, None, X, Y, None, model)
    tally = EpochTally(m.term_names, 5, X.device)
    for b in range(5):
        t.step(torch.arange(2 * b, 2 * b + 2), tally)
    assert tally.first_bad.tolist() == [5, 2, 5]  # reg first failed at batch 2 (and again at 4); ce and the total never
    assert math.isfinite(tally.sums[0]) and math.isnan(tally.sums[1])
    with pytest.raises(Diverged, match="'reg' became non-finite in epoch 7"):
        tally.close(7)


@pytest.mark.parametrize("error", [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                   "7.79 GiB of which 1.06 GiB is free."),
    lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 9000000000 bytes.")])
def test_an_out_of_memory_run_says_so_in_its_error(tmp_path, monkeypatch, error):
    from gaussreg.runs import worker as w
    from gaussreg.runs.store import Store

    def train(*_a, **_k):
        raise error()
    monkeypatch.setattr(w, "train", train)
    run = queued_run(Store(tmp_path / "runs"), experiment="t")
    assert w.main([str(run.path)]) == 1
    status = run.status()
    assert status["state"] == "failed" and status["out_of_memory"] is True
    assert status["error"].startswith("out of memory on cpu (") and "--per-gpu" in status["error"]


def test_the_per_batch_code_has_no_host_sync_by_construction():
    """Static companion of the test above: the step and the loop around it read no tensor
    value into Python (the loop's only read is the progress event, at most every 0.5 s)."""
    import ast
    import inspect
    import textwrap

    from gaussreg.runs import training as tr
    step = ast.parse(textwrap.dedent(inspect.getsource(tr.Training.step)) + textwrap.dedent(inspect.getsource(tr.EpochTally.add)))
    calls = {(n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", None))
             for n in ast.walk(step) if isinstance(n, ast.Call)}
    assert not calls & {"item", "tolist", "cpu", "numpy", "float", "int", "bool", "as_tensor", "tensor"}, calls
    loop = next(n for n in ast.walk(ast.parse(inspect.getsource(tr.train_epochs)))
                if isinstance(n, ast.For) and ast.unparse(n.iter) == "range(batches)")
    reads = [ast.unparse(n) for n in ast.walk(loop) if isinstance(n, ast.Call)
             and getattr(n.func, "id", getattr(n.func, "attr", None)) in ("float", "int", "item", "tolist", "mean_loss")]
    assert reads == ["tally.mean_loss()"]  # the progress event's loss
    progress = next(n for n in ast.walk(loop) if isinstance(n, ast.If) and "next_progress" in ast.unparse(n.test))
    assert "tally.mean_loss()" in ast.unparse(progress)


class _Killed(BaseException):
    """kill -9 at a checkpoint write: the process is gone, so nothing after it is written."""


class _Status:
    def __init__(self):
        self.fields = {}

    def note(self, **fields):
        self.fields.update(fields)

    update = note


@pytest.mark.parametrize("every,kill_at", [("0", 2), ("0", 3), ("0", 4), ("0", 7), ("3600", 2)])
def test_a_kill_between_checkpoint_writes_loses_at_most_the_epochs_since_the_last_write(tmp_path, monkeypatch,
                                                                                      every, kill_at):
    """README ("GPUs"): best.pt and last.pt are written together, best.pt first, every
    GAUSSREG_CHECKPOINT_S at an epoch end; a kill -9 loses the epochs since the last write.
    Killed before its kill_at-th checkpoint write (1: last.pt at the start, then best.pt of an
    improving epoch and last.pt), the run left on disk a last.pt no newer than its best.pt and
    at most the epochs since the last write lost; resumed, it ends equal to an uninterrupted run."""
    from factories import queued_run as planned

    from gaussreg.runs import training
    from gaussreg.runs.store import Store
    st = Store(tmp_path / "runs")
    keys = dict(FAST, method="augment", params={"sigma": 0.3, "folds": 1}, max_epochs=6, train_subset=300)
    ref, run = planned(st, seed=3, experiment="ref", **keys), planned(st, seed=3, experiment="killed", **keys)
    spec = run.spec()
    expected = training.train(ref.spec(), ref, False, lambda: False, _Status(), lambda _m: None)

    real_write, writes = training.atomic_write_bytes, []

    def write(path, payload):
        writes.append(path.name)
        if len(writes) >= kill_at:
            raise _Killed()
        real_write(path, payload)
    monkeypatch.setattr(training, "atomic_write_bytes", write)
    monkeypatch.setenv("GAUSSREG_CHECKPOINT_S", every)
    with pytest.raises(_Killed):
        training.train(spec, run, False, lambda: False, _Status(), lambda _m: None)
    monkeypatch.setattr(training, "atomic_write_bytes", real_write)

    done = len(run.epochs())  # epochs finished before the kill (their events are written)
    last = torch.load(run.file("last.pt"), weights_only=True)["state"]
    written = writes[:kill_at - 1]
    assert last["epoch"] == written.count("last.pt") - 1  # the one at the start is epoch 0
    if every == "0":
        assert writes[kill_at - 1] in ("best.pt", "last.pt") and done - last["epoch"] <= 1
    else:
        assert written == ["last.pt"] and last["epoch"] == 0 and done == spec["max_epochs"]  # the timer never fired
    if run.file("best.pt").exists():  # never older than last.pt: the model of last.pt's best epoch, or newer
        best = torch.load(run.file("best.pt"), weights_only=True)["state"]
        assert best["epoch"] == last["best_epoch"] or best["epoch"] > last["epoch"]
    else:
        assert last["best_epoch"] == 0
    resumed = training.train(spec, run, True, lambda: False, _Status(), lambda _m: None)
    _compare_results(expected, resumed)
    assert [e["val_loss"] for e in run.epochs()] == [e["val_loss"] for e in ref.epochs()]


def test_a_failed_compile_of_the_regularizer_kernel_is_logged_and_recorded(tmp_path, monkeypatch):
    """Without a compiler the bf16 regularizer's fused kernel runs its maths uncompiled once,
    then the exact kernel: numbers differ in bf16 rounding, so worker.log says when it
    switched and why, and result.json which kernels ran."""
    from gaussreg.runs import training
    from gaussreg.runs.store import Store
    from gaussreg.science import moments
    monkeypatch.setattr(moments, "_compiled", {})
    monkeypatch.setattr(moments, "_ran", set())
    monkeypatch.setattr(moments, "_compile_error", [])

    def compile_(fn, **_kw):
        def broken(*_a):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore lines")
        return broken
    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(moments, "_COMPILE_FROM", 1)  # every bf16 batch takes the fused kernel: a small MLP does
    run = queued_run(Store(tmp_path / "runs"), experiment="t", **{
        **FAST, "method": "regularizer", "params": {"sigma": 0.3, "alpha": 1.0}, "precision": "bf16",
        "max_epochs": 2, "train_subset": 200, "test_subset": 100})
    lines = []
    with pytest.warns(UserWarning, match="torch.compile failed"):
        res = training.train(run.spec(), run, False, lambda: False, _Status(), lines.append)
    rep = res["repeatability"]
    assert rep["regularizer_kernel"] == ["eager", "exact"]
    assert rep["regularizer_compile_error"] == "RuntimeError: InvalidCxxCompiler: No working C++ compiler found"
    switches = [m for m in lines if m.startswith("regularizer kernel")]
    assert switches == ["regularizer kernel: eager, exact (compiling failed: RuntimeError: InvalidCxxCompiler: "
                        "No working C++ compiler found)"]
