"""Runs written by hand, for the tests, in one place.

A test says which kind of run it needs and keeps its own numbers; how a run directory is
made (a resolved spec, its id, the store's writers) is written once, here:

- `spec(**keys)`: a resolved spec, a synthetic MLP baseline unless keys say otherwise.
- `queued_run(st, **keys)` / `queued_runs(root, seeds, experiment)`: planned runs nobody
  trained yet (spec.json and a queued status, as a launch writes them).
- `spec_only_run(parent, name, **spec)`: a directory holding only spec.json, written as
  given (not resolved), which is what a worker may be started on.
- `written_run(st, status=..., result=..., events=..., log=..., **keys)`: a run with the
  files a worker leaves, as given.
- Three recipes built on it, for the views: `dashboard_run` (the TUI's fixtures: full
  status, epoch and test events, worker.log), `figure_run` (plots and exports: epochs and
  validation curves) and `table_run` (the fair table: the result's numbers only).
"""
import json

from gaussreg.runs.spec import resolve, run_id
from gaussreg.runs.store import RunDir, Store, atomic_write_json

BASE = {"dataset": "synthetic", "model": "mlp", "method": "baseline"}
SIGMAS = [0.0, 0.25, 0.5]  # the robustness sigmas of the dashboard's and the figures' runs
T0 = "2026-01-01T10:00:00.000+00:00"  # when the dashboard's runs started
T1 = "2026-01-01T10:02:05.000+00:00"  # and when they last said something


def spec(**keys) -> dict:
    return resolve({**BASE, **keys})


def queued_run(st: Store, **keys) -> RunDir:
    s = spec(**keys)
    return st.create(s, run_id(s))


def queued_runs(root, seeds, experiment: str):
    """A store at `root` with one queued run per seed; (the store, the run ids in seed order)."""
    st = Store(root)
    return st, [queued_run(st, seed=s, experiment=experiment).id for s in seeds]


def spec_only_run(parent, name: str = "run", **spec_json) -> RunDir:
    d = parent / name
    d.mkdir()
    (d / "spec.json").write_text(json.dumps(spec_json))
    return RunDir(d)


def jsonl(events) -> str:
    return "".join(json.dumps(e) + "\n" for e in events)


def written_run(st: Store, *, status: dict, result=None, events=None, log=None, **keys) -> RunDir:
    """A run whose result.json, status.json, events.jsonl and worker.log are the ones given
    (a file given as None is not written)."""
    run = queued_run(st, **keys)
    if result is not None:
        atomic_write_json(run.result_file, result)
    run.write_status(status)
    if events is not None:
        run.file("events.jsonl").write_text(jsonl(events))
    if log is not None:
        run.file("worker.log").write_text(log)
    return run


def dashboard_epoch(e, loss, val, acc) -> dict:
    return {"type": "epoch", "time": T0, "epoch": e, "train_loss": loss, "train_terms": {"ce": loss},
            "val_loss": val, "val_ce": val, "val_accuracy": acc, "lr": 1e-3, "epoch_time": 1.0,
            "images_per_s": 1000.0, "best": True}


def dashboard_run(st: Store, method, acc=None, rob=None, state="completed", seed=0, epochs=3, **params) -> RunDir:
    """A run of experiment fx as the TUI shows it: `epochs` epochs (loss 2/e, validation
    accuracy 0.5 + 0.1 e), and when completed a result (with its cost: steps and CPU
    seconds) and test event with test accuracy `acc` and R `rob`; a failed run has one
    epoch and an error."""
    status = {"state": state, "pid": 1, "host": "elsewhere", "device": "cpu", "started_at": T0, "updated_at": T1,
              "finished_at": T1, "epoch": epochs, "max_epochs": epochs, "error": None}
    events = [dashboard_epoch(e, 2.0 / e, 2.5 / e, 0.5 + 0.1 * e) for e in range(1, epochs + 1)]
    res = None
    if state == "completed":
        copies = params.get("folds", 0) + 1  # the cost a worker records: augment's folds make it dearer
        res = {"test_accuracy": acc, "robustness": rob, "sigmas": SIGMAS, "per_sigma": [1.0, rob, rob - 0.2],
               "accuracy_per_sigma": [acc, acc - 0.1, acc - 0.3], "best_epoch": epochs, "epochs_run": epochs,
               "best_val_accuracy": events[-1]["val_accuracy"], "val_robustness": rob, "test_loss": 0.5,
               "device": "cpu", "steps": 4 * epochs * copies, "train_cpu_s": 10.0 * copies + 2 * (method == "regularizer")}
        events.append({"type": "test", "time": T1, "test_accuracy": acc, "robustness": rob, "sigmas": SIGMAS,
                       "per_sigma": res["per_sigma"], "accuracy_per_sigma": res["accuracy_per_sigma"]})
    if state == "failed":
        status["error"] = "boom: simulated failure"
        events = events[:1]
    run = written_run(st, status=status, result=res, events=events, method=method, params=params, seed=seed,
                      experiment="fx", max_epochs=epochs, robustness={"sigmas": SIGMAS})
    run.file("worker.log").write_text(f"{T0} start {run.id}\n{T1} {state}\n")  # names the run: after its id is known
    return run


def figure_run(st: Store, method, acc, rob, seed=0, state="completed", **params) -> str:
    """A run of experiment P with two epochs and, when completed, test and validation
    curves over SIGMAS (R `rob`, accuracy `acc`); its id."""
    epochs = [{"type": "epoch", "epoch": e, "train_loss": 1.0 / e + 1e-17, "train_terms": {"ce": 1.0 / e},
               "val_loss": 1.1 / e, "val_ce": 1.1 / e, "val_accuracy": acc - 0.01, "lr": 1e-3, "epoch_time": 0.5,
               "images_per_s": 1000.0, "best": True} for e in (1, 2)]
    res = None
    if state == "completed":
        res = {"test_accuracy": acc, "robustness": rob, "sigmas": SIGMAS, "per_sigma": [1.0, rob, rob - 0.1],
               "accuracy_per_sigma": [acc, acc - 0.1, acc - 0.3], "best_val_accuracy": acc - 0.01,
               "val_robustness": rob + 0.0000000000000002, "val_per_sigma": [1.0, rob, rob - 0.12],
               "val_accuracy_per_sigma": [acc, acc - 0.12, acc - 0.3], "best_epoch": 2, "epochs_run": 2}
    return written_run(st, status={"state": state}, result=res, events=epochs, method=method, params=params,
                       seed=seed, experiment="P", robustness={"sigmas": SIGMAS}).id


def table_run(st: Store, exp, method, acc=None, rob=None, seed=0, state="completed", val=None, keys=None, noisy=None,
              cost=None, **params) -> str:
    """A run of experiment `exp` with only what the fair table reads; validation numbers
    equal the test ones unless val=(acc, R) says otherwise; `noisy` is the accuracy at
    sigma 0 and 0.5; `cost` adds result fields (test_report.spent makes a worker's); its id."""
    res = None
    if state == "completed":
        va, vr = val if val else (acc, rob)
        res = {"test_accuracy": acc, "robustness": rob, "best_val_accuracy": va, "val_robustness": vr}
        if noisy is not None:
            res.update(sigmas=[0.0, 0.5], accuracy_per_sigma=noisy)
        res.update(cost or {})
    return written_run(st, status={"state": state}, result=res, method=method, params=params, seed=seed,
                       experiment=exp, **(keys or {})).id
