"""`gaussreg export`: the store in long format for pandas, one row per run, per epoch
or per (run, split, sigma), as CSV or JSON lines."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from typing import Iterable, Iterator, List

from gaussreg.runs.reader import list_runs
from gaussreg.runs.store import RunFileError, Store, open_plain, strip_control, too_large
from gaussreg.views.report import certified_runs, config_key, run_metrics

WHATS = ("runs", "epochs", "sigmas")
FORMATS = ("csv", "jsonl")
RUN_KEYS = ("dataset", "model", "max_epochs", "batch_size", "train_subset", "test_subset", "split_seed")
RESULT_KEYS = ("best_epoch", "epochs_run", "best_val_loss", "train_time_s", "train_cpu_s", "train_gpu_s", "steps",
               "robustness_time_s", "wall_time_s", "parameters", "device_name")
PASSES = ("clean", "noisy", "expected")  # result["images"]: forward passes by kind, as images_<kind>


def _ident(row: dict) -> dict:
    s = row["spec"]
    out = {"run_id": row["id"], "experiment": s.get("experiment", ""), "method": s["method"], "seed": s.get("seed"),
           "state": row["state"]}
    out.update({f"param_{k}": v for k, v in s.get("params", {}).items()})
    out.update({k: s.get(k) for k in RUN_KEYS})
    out["lr"] = s.get("optimizer", {}).get("lr")
    # runs with equal config ids are seeds of one configuration
    out["config"] = hashlib.sha1(config_key(s).encode()).hexdigest()[:10]
    return out


def run_rows(store: Store, experiment=None, whole: bool = False, warn=None) -> Iterable[dict]:
    """One flat row per run; `whole` adds the run's spec, result (with its per-sigma
    curves) and certificates, from which report.table_of_export recomputes the fair table."""
    tolerances = {}
    rows = [r for r in list_runs(store, experiment) if r["spec"] is not None]
    certified = certified_runs(store, rows, warn) if whole else {}
    for r in rows:
        row = _ident(r)
        res = r["result"] or {}
        m = run_metrics(res) if res else {}
        row.update({k: m.get(k) for k in ("test_accuracy", "test_robustness", "test_noisy_accuracy", "val_accuracy",
                                           "val_robustness", "val_noisy_accuracy")})
        row.update({k: res.get(k) for k in RESULT_KEYS})
        images = res.get("images") if isinstance(res.get("images"), dict) else {}
        row.update({f"images_{k}": images.get(k) for k in PASSES})  # None (empty) for runs before cost was recorded
        row["error"] = r["error"]
        exp = row["experiment"]
        if exp not in tolerances:
            tolerances[exp] = float(store.experiment(exp).get("tolerance", 0.0))
        row["tolerance"] = tolerances[exp]
        if whole:
            row.update(spec=r["spec"], result=r["result"], certified=certified.get(r["id"]))
        yield row


def epoch_rows(store: Store, experiment=None) -> Iterable[dict]:
    for r in list_runs(store, experiment):
        if r["spec"] is None:
            continue
        ident = {k: v for k, v in _ident(r).items() if k in ("run_id", "experiment", "method", "seed", "config")}
        try:
            epochs = store.get(r["id"]).epochs()
        except RunFileError:
            continue  # one unreadable run never stops the export
        for e in epochs:
            row = {**ident, **{k: e.get(k) for k in ("epoch", "train_loss", "train_accuracy", "val_loss", "val_ce",
                                                     "val_accuracy", "lr", "epoch_time", "images_per_s", "best")}}
            row.update({f"train_{k}": v for k, v in (e.get("train_terms") or {}).items()})
            yield row


def sigma_rows(store: Store, experiment=None) -> Iterable[dict]:
    for r in list_runs(store, experiment):
        res = r["result"]
        if not res or r["spec"] is None:
            continue
        ident = {k: v for k, v in _ident(r).items() if not k.startswith(RUN_KEYS) and k not in ("state",)}
        for split, cons, acc in (("test", "per_sigma", "accuracy_per_sigma"),
                                 ("val", "val_per_sigma", "val_accuracy_per_sigma")):
            sig, c, a = res.get("sigmas") or [], res.get(cons) or [], res.get(acc) or []
            for i, s in enumerate(sig):
                yield {**ident, "split": split, "sigma": s, "consistency": c[i] if i < len(c) else None,
                       "accuracy": a[i] if i < len(a) else None}


def _cell(v):
    """CSV numbers to 6 significant digits (0.7663000000000002 -> 0.7663); None empty."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, str):
        return strip_control(v)  # CSV is read in terminals too; JSON lines escape them themselves
    return v


def render_lines(rows: Iterable[dict], fmt: str) -> Iterator[str]:
    """The lines of the export, as they are made: JSON lines one row at a time; CSV once
    every row is known (its header is the union of their keys)."""
    if fmt == "jsonl":
        for r in rows:
            yield json.dumps(r) + "\n"
        return
    rows = list(rows)
    header: List[str] = []
    for r in rows:
        header.extend(k for k in r if k not in header)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(v) for k, v in r.items()})
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
    yield buf.getvalue()


def render(rows: Iterable[dict], fmt: str) -> str:
    return "".join(render_lines(rows, fmt))


def export_lines(store: Store, what: str = "runs", fmt: str = "csv", experiment=None, warn=None) -> Iterator[str]:
    """`gaussreg export`'s output piece by piece (memory stays flat in the size of events.jsonl);
    `warn` hears of malformed certificates, which are left out."""
    if what not in WHATS:
        raise ValueError(f"what must be one of {', '.join(WHATS)}, not {what!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if what == "runs":  # JSON lines carry whole runs: the fair table can be recomputed from them
        rows = run_rows(store, experiment, whole=fmt == "jsonl", warn=warn)
    else:
        rows = {"epochs": epoch_rows, "sigmas": sigma_rows}[what](store, experiment)
    return render_lines(rows, fmt)


def export(store: Store, what: str = "runs", fmt: str = "csv", experiment=None, warn=None) -> str:
    return "".join(export_lines(store, what, fmt, experiment, warn))


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
