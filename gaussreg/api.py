"""The notebook API: a run store (or a `gaussreg export --what runs --format jsonl` file of
one) as pandas DataFrames, and a trained run's model.

    import gaussreg.api as gr
    runs = gr.runs("runs")                 # one row per run: its parameters, accuracies, R, cost
    table = gr.fair_table("runs")          # `gaussreg table`, one row per chosen configuration
    model = gr.load_trained(runs.run_id[0], store="runs")

The frames have the columns of `gaussreg export` (runs, epochs, sigmas) and of `gaussreg
table --format json` (fair_table), with fractions, not percentages. Reading never imports
torch (only load_trained does); pandas is imported when a frame is made, and is the
optional extra `api`. A bad argument raises ApiError, a model that cannot be loaded
TrainedRunError: one sentence each, never an exit."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import List, Optional, Union

from gaussreg.runs.reader import has_runs
from gaussreg.runs.spec import describe_params
from gaussreg.runs.store import Store
from gaussreg.views import export as ex
from gaussreg.views import report
from gaussreg.views.report import CERT_RADII

StoreLike = Union[str, os.PathLike, Store]
TABLES = ("best", "best_per_sigma", "all")  # which entries of each comparison fair_table gives


class ApiError(ValueError):
    """A bad argument of the notebook API: one sentence naming what is wrong and where."""


def _pandas():
    try:
        import pandas  # here: only making a frame needs it, and it is an optional extra
    except ImportError:
        raise ApiError('gaussreg.api needs pandas, which is not installed: pip install "gaussreg[api]"') from None
    return pandas


def _source(store: StoreLike, experiment: Optional[str], epochs: bool = False) -> ex.Source:
    """A store, or the records of an export file; ApiError when it is neither, or when it has
    no runs of `experiment`."""
    where = store.root if isinstance(store, Store) else Path(store)
    st: ex.Source
    if where.is_dir():
        st = Store(where)
    elif where.is_file():
        if epochs:
            raise ApiError(f"{where} is an export of runs, which carries no epochs: read the epochs from the store")
        try:
            st = ex.read_runs(where)
        except ValueError as e:
            raise ApiError(str(e)) from None
    else:
        raise ApiError(f"the store {where} does not exist")
    if experiment is not None and not (has_runs(st, experiment) if isinstance(st, Store) else any(
            r["spec"].get("experiment") == experiment for r in st)):
        raise ApiError(f"no runs of experiment {experiment!r} in {where}")
    return st


def _frame(pd, rows: List[dict], what: str):
    return pd.DataFrame(rows, columns=ex.columns(rows, what))


def runs(store: StoreLike = "runs", experiment: Optional[str] = None):
    """One row per run (the columns of `gaussreg export`): run_id, experiment, method, params
    (their text) and each parameter as param_<name>, seed, state, the run's settings, config
    (equal for the seeds of one configuration), test and validation accuracy, R
    (test_robustness) and noisy accuracy, the cost (steps, images_*, train_*_s) and times,
    the error of a failed run and the experiment's tolerance."""
    pd = _pandas()  # first: without it, say so before reading the store
    return _frame(pd, list(ex.run_rows(_source(store, experiment), experiment)), "runs")


def epochs(store: StoreLike = "runs", experiment: Optional[str] = None):
    """One row per (run, epoch): losses and their terms (train_<term>), validation accuracy,
    lr, epoch time; the run's id, method, params and seed to group and label by. From a
    store only (an export of runs carries no epochs)."""
    pd = _pandas()
    return _frame(pd, list(ex.epoch_rows(_source(store, experiment, epochs=True), experiment)), "epochs")


def sigmas(store: StoreLike = "runs", experiment: Optional[str] = None):
    """One row per (completed run, split, sigma): prediction consistency and accuracy under
    noise (the curves whose trapezoidal averages are R and the noisy accuracy)."""
    pd = _pandas()
    return _frame(pd, list(ex.sigma_rows(_source(store, experiment), experiment)), "sigmas")


# the columns of a fair_table row, in this order; then any other key of the table's entries
ENTRY = ["method", "params", "seeds", "accuracy", "accuracy_std", "d_accuracy", "robustness", "robustness_std",
         "d_robustness", "standard_error", "exceeds_2se", "noisy_accuracy", "d_noisy_accuracy",
         "selection_accuracy", "selection_robustness", "steps", "steps_x", "time_s", "time_kind", "time_x",
         "wall_s", "best_epochs", "epochs_run", "still_improving"]
NESTED = ("params", "certified", "images", "states", "run_ids")  # entry keys flattened (or placed last) below


def _entry_row(rec: dict, table: dict, e: dict, which: str) -> dict:
    row = {"experiment": rec["experiment"], "dataset": rec["dataset"], "model": rec["model"]}
    # the comparison's setting: the run keys whose values tell this experiment's comparisons apart
    row.update({k: v for k, v in rec["setting"].items() if k not in row})
    row.update(tolerance=rec["tolerance"], selection=rec["selection"], budget=table.get("budget"))
    if which == "best_per_sigma":
        row["sigma"] = e["sigma"]
    row.update({k: e.get(k) for k in ENTRY})
    row["params"] = describe_params(e, with_seed=False)
    row.update({f"param_{k}": v for k, v in sorted(e["params"].items())})
    row.update({k: v for k, v in e.items() if k not in row and k not in NESTED and k != "sigma"})
    images = e.get("images") if isinstance(e.get("images"), dict) else {}
    row.update({f"images_{k}": images.get(k) for k in ex.PASSES})
    cert = e.get("certified")
    row.update({f"certified_{r:g}": cert["accuracy"][f"{r:g}"] if cert else None for r in CERT_RADII})
    row["certified_runs"] = cert["runs"] if cert else None
    row["run_ids"] = list(e["run_ids"])
    return row


def fair_table(store: StoreLike = "runs", experiment: Optional[str] = None, tolerance: Optional[float] = None,
               select: str = "validation", budget: Optional[float] = None, which: str = "best"):
    """`gaussreg table` as a frame: one row per chosen configuration (the best eligible of each
    method) and comparison, with the comparison (experiment, dataset, model, the setting keys
    that tell it apart, tolerance, selection, budget), the configuration (method, params and
    param_<name>), and the numbers `gaussreg table --format json` has: test accuracy, R and
    noisy accuracy as fractions (means, std over seeds, differences to the baseline, whether
    ΔR exceeds two standard errors), the selection numbers, cost, certified accuracy
    (certified_<radius>) and run ids. `which` = "best_per_sigma" gives the best per training
    sigma (with `sigma`), "all" every configuration (with `eligible` and `reason`)."""
    pd = _pandas()
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not 0 <= tolerance <= 1):
        raise ApiError(f"tolerance must be a fraction in [0, 1], not {tolerance!r}")
    if select not in report.SELECTIONS:
        raise ApiError(f"select must be one of {', '.join(report.SELECTIONS)}, not {select!r}")
    if budget is not None and report.budget_problem(budget, "budget"):
        raise ApiError(report.budget_problem(budget, "budget"))
    if which not in TABLES:
        raise ApiError(f"which must be one of {', '.join(TABLES)}, not {which!r}")
    src = _source(store, experiment)
    if isinstance(src, Store):  # a malformed certificate is left out, as in `gaussreg table`, with a warning
        t = report.fair_table(src, experiment, tolerance, select, budget, lambda m: warnings.warn(m, stacklevel=3))
    else:
        t = report.table_of_export([r for r in src if not experiment or r["spec"].get("experiment") == experiment],
                                   tolerance, select, budget)
    key = "configurations" if which == "all" else which
    rows = [_entry_row(rec, t, e, which) for rec in t["experiments"] for e in rec[key]]
    return _frame(pd, rows, "runs")


def load_trained(run_id_or_checkpoint: Union[str, os.PathLike], store: StoreLike = "runs", device: str = "cpu",
                 data_dir: Optional[Union[str, os.PathLike]] = None):
    """A trained run's model (torch.nn.Module, in eval mode, on `device`: the CPU unless
    asked) with the weights of its best validation epoch (best.pt), by run id (or a unique
    prefix) in `store`, run directory or checkpoint file. Its test data must be where its
    spec says (or in `data_dir`): the model is built for it. TrainedRunError (one sentence)
    when it cannot be loaded. gaussreg.runs.trained.load_trained also gives the test split."""
    # here: torch is imported by loading a model, and by nothing else of this module
    from gaussreg.runs import trained
    root = store.root if isinstance(store, Store) else Path(store)
    t = trained.load_trained(run_id_or_checkpoint, root, device, Path(data_dir) if data_dir is not None else None)
    return t.model


def __getattr__(name: str):
    if name == "TrainedRunError":  # the error of load_trained, without importing torch before it is needed
        from gaussreg.runs.trained import TrainedRunError
        return TrainedRunError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

