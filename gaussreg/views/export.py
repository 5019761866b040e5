"""`gaussreg export`: the store (or an export of its runs) in long format for pandas, one
row per run, per epoch or per (run, split, sigma), as CSV or JSON lines.

Every row of an export has the same columns in the same order, whichever run comes first:
JSON lines write every column in every line (null where a run has none), because a reader
that takes its columns from the first lines (polars' read_ndjson) drops the others; the
param_* columns of all methods come sorted by name right after `params` (their text)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Union

from gaussreg.runs.reader import list_runs
from gaussreg.runs.spec import describe_params
from gaussreg.runs.store import RunFileError, Store, open_plain, strip_control, too_large
from gaussreg.views.report import certified_runs, config_key, run_metrics

WHATS = ("runs", "epochs", "sigmas")
FORMATS = ("csv", "jsonl")
RUN_KEYS = ("dataset", "model", "max_epochs", "batch_size", "train_subset", "test_subset", "split_seed")
RESULT_KEYS = ("best_epoch", "epochs_run", "best_val_loss", "train_time_s", "train_cpu_s", "train_gpu_s", "steps",
               "robustness_time_s", "wall_time_s", "parameters", "device_name")
PASSES = ("clean", "noisy", "expected")  # result["images"]: forward passes by kind, as images_<kind>
EPOCH_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_ce", "val_accuracy", "lr", "epoch_time",
              "images_per_s", "best")
WHOLE = ("spec", "result", "certified")  # what JSON lines of --what runs add: the whole run


def _ident(row: dict) -> dict:
    s = row["spec"]
    out = {"run_id": row["id"], "experiment": s.get("experiment", ""), "method": s["method"],
           "params": describe_params(s, with_seed=False)}  # a label for curves: "alpha=1 sigma=0.5"
    out.update({f"param_{k}": v for k, v in sorted(s.get("params", {}).items())})
    out.update(seed=s.get("seed"), state=row["state"])
    out.update({k: s.get(k) for k in RUN_KEYS})
    out["lr"] = s.get("optimizer", {}).get("lr")
    # runs with equal config ids are seeds of one configuration
    out["config"] = hashlib.sha1(config_key(s).encode()).hexdigest()[:10]
    return out


def _is_param(key: str) -> bool:
    return key.startswith("param_")


def _is_term(key: str) -> bool:  # an epoch's train_<term> (the loss's named parts: they vary by method)
    return key.startswith("train_") and key not in EPOCH_KEYS


# the families of columns that vary by method, each sorted by name right after its anchor
FAMILIES = {"runs": (("params", _is_param),), "sigmas": (("params", _is_param),),
            "epochs": (("params", _is_param), ("best", _is_term))}


def columns(rows: Iterable[dict], what: str = "runs") -> List[str]:
    """The columns of an export of `rows` (of kind `what`): the union of their keys, in the
    order the rows give them, except that each family of columns that varies by method
    (param_*, and an epoch's train_<term>) comes sorted by name after its anchor, whatever
    run comes first."""
    families = FAMILIES[what]
    seen: Dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r))
    out = []
    for k in seen:
        if any(is_member(k) for _, is_member in families):
            continue
        out.append(k)
        for anchor, is_member in families:
            if k == anchor:
                out.extend(sorted(m for m in seen if is_member(m)))
    placed = set(out)  # a family whose anchor no row has (rows not made here) keeps its place at the end
    return out + [k for k in seen if k not in placed]


# ---------------------------------------------------------------- where the runs come from

Source = Union[Store, List[dict]]  # a store, or the records of a --what runs --format jsonl export (read_runs)


def store_records(store: Store, experiment=None, whole: bool = False, warn=None) -> List[dict]:
    """The runs of a store as the exports read them: list_runs records with a readable spec,
    each with its experiment's `tolerance` and, when `whole`, its `certified` accuracy."""
    rows = [r for r in list_runs(store, experiment) if r["spec"] is not None]
    certified = certified_runs(store, rows, warn) if whole else {}
    tolerances: Dict[str, float] = {}
    for r in rows:
        exp = r["spec"].get("experiment", "")
        if exp not in tolerances:
            tolerances[exp] = float(store.experiment(exp).get("tolerance", 0.0))
        r.update(tolerance=tolerances[exp], certified=certified.get(r["id"]))
    return rows


def export_records(records: Iterable[dict], experiment=None) -> List[dict]:
    """The same records from the lines of a `--what runs --format jsonl` export (read_runs):
    an export can be exported again, in the columns of this version."""
    return [{"id": rec["run_id"], "spec": rec["spec"], "state": rec.get("state"), "result": rec.get("result"),
             "error": rec.get("error"), "tolerance": rec.get("tolerance"), "certified": rec.get("certified")}
            for rec in records if not experiment or rec["spec"].get("experiment") == experiment]


def records_of(source: Source, experiment=None, whole: bool = False, warn=None) -> List[dict]:
    if isinstance(source, Store):
        return store_records(source, experiment, whole, warn)
    return export_records(source, experiment)


# ---------------------------------------------------------------- rows

def run_row(r: dict, whole: bool = False) -> dict:
    """One run's flat row (a record of records_of); `whole` adds the run's spec, result (with
    its per-sigma curves) and certificates, from which report.table_of_export recomputes the
    fair table."""
    row = _ident(r)
    res = r["result"] or {}
    m = run_metrics(res) if res else {}
    row.update({k: m.get(k) for k in ("test_accuracy", "test_robustness", "test_noisy_accuracy", "val_accuracy",
                                       "val_robustness", "val_noisy_accuracy")})
    row.update({k: res.get(k) for k in RESULT_KEYS})
    images = res.get("images") if isinstance(res.get("images"), dict) else {}
    row.update({f"images_{k}": images.get(k) for k in PASSES})  # None (empty) for runs before cost was recorded
    row["error"] = r.get("error")
    row["tolerance"] = r.get("tolerance")
    if whole:
        row.update(spec=r["spec"], result=r["result"], certified=r.get("certified"))
    return row


def run_rows(store: Source, experiment=None, whole: bool = False, warn=None) -> Iterator[dict]:
    """One flat row per run (run_row) of a store or of an export's records."""
    return (run_row(r, whole) for r in records_of(store, experiment, whole, warn))


def _epoch_rows(store: Store, records: List[dict]) -> Iterator[dict]:
    for r in records:
        ident = {k: v for k, v in _ident(r).items() if k not in RUN_KEYS and k not in ("state", "lr")}
        try:
            epochs = store.get(r["id"]).epochs()
        except RunFileError:
            continue  # one unreadable run never stops the export
        for e in epochs:
            row = {**ident, **{k: e.get(k) for k in EPOCH_KEYS}}
            row.update({f"train_{k}": v for k, v in (e.get("train_terms") or {}).items()})
            yield row


def epoch_rows(store: Store, experiment=None) -> Iterator[dict]:
    """One row per (run, epoch), read piece by piece from each run's events.jsonl."""
    return _epoch_rows(store, records_of(store, experiment))


def _sigma_rows(records: List[dict]) -> Iterator[dict]:
    for r in records:
        res = r["result"]
        if not res:
            continue
        ident = {k: v for k, v in _ident(r).items() if k not in RUN_KEYS and k != "state"}
        for split, cons, acc in (("test", "per_sigma", "accuracy_per_sigma"),
                                 ("val", "val_per_sigma", "val_accuracy_per_sigma")):
            sig, c, a = res.get("sigmas") or [], res.get(cons) or [], res.get(acc) or []
            for i, s in enumerate(sig):
                yield {**ident, "split": split, "sigma": s, "consistency": c[i] if i < len(c) else None,
                       "accuracy": a[i] if i < len(a) else None}


def sigma_rows(store: Source, experiment=None) -> Iterator[dict]:
    """One row per (run, split, sigma) of the completed runs of a store or of an export's records."""
    return _sigma_rows(records_of(store, experiment))


# ---------------------------------------------------------------- rendering

def _cell(v):
    """CSV numbers to 6 significant digits (0.7663000000000002 -> 0.7663); None empty."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, str):
        return strip_control(v)  # CSV is read in terminals too; JSON lines escape them themselves
    return v


def render_lines(rows: Iterable[dict], fmt: str, header: Optional[List[str]] = None,
                 what: str = "runs") -> Iterator[str]:
    """The lines of the export. Both formats need every column before the first row: CSV for
    its header, JSON lines to write each column in each line. Given `header` (columns() of
    these rows, found by a first pass), JSON lines are written one row at a time; without it
    the rows are gathered first."""
    if header is None:
        rows = list(rows)
        header = columns(rows, what)
    if fmt == "jsonl":
        for r in rows:
            yield json.dumps({k: r.get(k) for k in header}) + "\n"
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(v) for k, v in r.items()})
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
    yield buf.getvalue()


def render(rows: Iterable[dict], fmt: str, what: str = "runs") -> str:
    return "".join(render_lines(rows, fmt, what=what))


def export_lines(source: Source, what: str = "runs", fmt: str = "csv", experiment=None, warn=None) -> Iterator[str]:
    """`gaussreg export`'s output piece by piece, of a store or of the records of a `--what runs
    --format jsonl` export (read_runs; they carry no epochs). Memory stays flat in the size of
    events.jsonl: the epochs' JSON lines read the events twice, once for the columns (every
    line has them all) and once for the rows. `warn` hears of malformed certificates, which
    are left out."""
    if what not in WHATS:
        raise ValueError(f"what must be one of {', '.join(WHATS)}, not {what!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if what == "epochs" and not isinstance(source, Store):
        raise ValueError("an export of runs carries no epochs: export --what epochs from the store")
    whole = what == "runs" and fmt == "jsonl"  # JSON lines carry whole runs: the fair table can be recomputed
    records = records_of(source, experiment, whole, warn)
    make: Callable[[], Iterator[dict]] = {
        "runs": lambda: (run_row(r, whole) for r in records),
        "epochs": lambda: _epoch_rows(source, records),
        "sigmas": lambda: _sigma_rows(records)}[what]
    if fmt == "csv":
        return render_lines(make(), fmt, what=what)
    return render_lines(make(), fmt, columns(make(), what))


def export(source: Source, what: str = "runs", fmt: str = "csv", experiment=None, warn=None) -> str:
    return "".join(export_lines(source, what, fmt, experiment, warn))


MAX_EXPORT = 1 << 30  # a --from file: ~10 kB a run, so 100,000 runs; more is parsed into far more memory
MAX_RECORD = 64 << 20  # one line of it: a run with its spec, result and certificates


def read_runs(path) -> List[dict]:
    """The records of a `gaussreg export --what runs --format jsonl` file; ValueError naming
    the file and line when it is not one (or is no regular file, or too large to read)."""
    out = []
    try:
        # a regular file only: a FIFO or a device (--from /dev/zero) would hang or never end
        with open(open_plain(path, follow=True), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_EXPORT:
                raise ValueError(too_large(path, size, MAX_EXPORT))
            for n, raw in enumerate(iter(lambda: f.readline(MAX_RECORD + 1), b""), 1):
                if len(raw) > MAX_RECORD:
                    raise ValueError(f"{path}:{n}: the line is too large (more than {MAX_RECORD >> 20} MB)")
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise ValueError(f"{path}:{n}: not a JSON line") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("spec"), dict) or "run_id" not in rec:
                    raise ValueError(f"{path}:{n}: not a run of `gaussreg export --what runs --format jsonl` "
                                     "(it needs run_id and spec)")
                out.append(rec)
    except FileNotFoundError:
        raise ValueError(f"{path}: does not exist") from None
    except RunFileError as e:
        raise ValueError(str(e)) from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: is not UTF-8 text") from None
    return out
