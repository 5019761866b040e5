"""Reading the run store incrementally, off the UI thread.

`StoreWatcher.scan()` returns the rows that changed since the last scan: it stats
status.json, tails events.jsonl of live runs from the last byte offset, and reads
result.json once. `RunTail` follows one run for the detail screen. Neither imports
textual: the app runs them in thread workers and posts what they return."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from gaussreg.report import run_certified
from gaussreg.spec import describe_params
from gaussreg.store import EventTail, RunDir, RunFileError, parse_iso, phase_of

LIVE = ("running", "queued")  # states whose rows change without their status file changing


@dataclass(frozen=True)
class RunRow:
    """What the runs table shows of one run."""
    id: str
    experiment: str = ""
    dataset: str = ""
    model: str = ""
    method: str = ""
    params: str = ""
    seed: Optional[int] = None
    state: str = "queued"
    epoch: int = 0  # epochs done (never the one in progress), as everywhere
    max_epochs: Optional[int] = None
    best_val_acc: Optional[float] = None
    test_acc: Optional[float] = None
    robustness: Optional[float] = None
    duration: Optional[float] = None
    error: Optional[str] = None
    slurm_job: Optional[str] = None  # "JOBID_INDEX" for runs submitted with --backend slurm
    phase: Optional[str] = None  # what a running worker does: "validating", "evaluating R", ...


@dataclass
class _Tracked:
    run: RunDir
    spec: Optional[dict]
    status_sig: Optional[tuple] = None
    status: dict = field(default_factory=dict)
    result: Optional[dict] = None
    tail: Optional[EventTail] = None
    epoch: int = 0
    best_val_acc: Optional[float] = None
    events_read: bool = False
    row: Optional[RunRow] = None


def _sig(path: Path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size)


class StoreWatcher:
    def __init__(self, root):
        self.root = Path(root)
        self.tracked: Dict[str, _Tracked] = {}

    def _track(self, path: Path) -> _Tracked:
        run = RunDir(path)
        try:
            spec = run.spec()
        except RunFileError as e:
            tr = _Tracked(run, None)
            tr.status = {"state": "corrupt", "error": str(e)}
            return tr
        return _Tracked(run, spec)

    def _read_events(self, tr: _Tracked) -> None:
        if tr.tail is None:
            tr.tail = tr.run.tail()
        events, restarted = tr.tail.read()
        if restarted:  # a rerun began a new events file: what the old one said is gone
            tr.epoch, tr.best_val_acc = 0, None
        for e in events:
            kind = e.get("type")
            if kind == "epoch":  # a resume may redo an epoch: the count never goes back
                ep = e.get("epoch")
                tr.epoch = max(tr.epoch, ep) if isinstance(ep, int) else tr.epoch
                if e.get("best"):
                    tr.best_val_acc = e.get("val_accuracy")
            elif kind == "start":  # a fresh start forgets what an earlier attempt wrote
                tr.epoch, tr.best_val_acc = 0, None
        tr.events_read = True

    def _update(self, tr: _Tracked, now: float) -> RunRow:
        run = tr.run
        if tr.spec is None:
            return RunRow(run.id, state="corrupt", error=tr.status.get("error"))
        sig = _sig(run.file("status.json"))
        if sig == tr.status_sig and tr.row is not None and tr.row.state not in LIVE:
            return tr.row  # a finished run whose status has not changed: nothing to redo
        if sig != tr.status_sig:
            tr.status_sig = sig
            try:
                tr.status = run.status()
            except RunFileError as e:
                tr.status = {"state": "corrupt", "error": str(e)}
        state = tr.status.get("state", "queued")
        if state != "corrupt":
            state = run.state(tr.status)
        if state != "completed":
            tr.result = None  # a rerun of a completed run: its old result no longer holds
        elif tr.result is None:
            try:
                tr.result = run.result() or {}
            except RunFileError as e:
                tr.result, state = {}, "corrupt"
                tr.status = {**tr.status, "error": str(e)}
        res = tr.result if state == "completed" else None
        if res:
            epoch, best = res.get("epochs_run", 0), res.get("best_val_accuracy")
        else:
            if state in LIVE or not tr.events_read:
                self._read_events(tr)
            epoch, best = tr.epoch, tr.best_val_acc
        started = parse_iso(tr.status.get("started_at"))
        ended = parse_iso(tr.status.get("finished_at"))
        duration = (ended or now) - started if started and (ended or state == "running") else None
        s = tr.spec
        return RunRow(run.id, s.get("experiment", ""), s.get("dataset", ""), s.get("model", ""), s.get("method", ""),
                      describe_params(s, with_seed=False), s.get("seed"), state, epoch, s.get("max_epochs"), best,
                      res.get("test_accuracy") if res else None, res.get("robustness") if res else None,
                      duration, tr.status.get("error"), tr.status.get("slurm_job"),
                      phase_of({**tr.status, "state": state}))

    def scan(self) -> List[RunRow]:
        """Rows that are new or changed since the previous scan."""
        now = time.time()
        changed = []
        try:
            entries = [e for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(("_", "."))]
        except FileNotFoundError:
            return []
        for entry in entries:
            tr = self.tracked.get(entry.name)
            if tr is None:
                if not os.path.lexists(os.path.join(entry.path, "spec.json")):
                    continue
                tr = self.tracked[entry.name] = self._track(Path(entry.path))
            row = self._update(tr, now)
            if row != tr.row:
                tr.row = row
                changed.append(row)
        return changed

    def rows(self) -> List[RunRow]:
        return [t.row for t in self.tracked.values() if t.row is not None]


@dataclass
class Detail:
    """Everything the detail screen shows of one run, as of one read."""
    run_id: str
    epochs: List[dict]
    status: dict
    spec: Optional[dict]
    result: Optional[dict]
    test: Optional[dict]
    log_tail: str
    certified: Optional[dict] = None  # report.run_certified: certified accuracy at a few radii
    progress: Optional[dict] = None  # the latest progress event of the epoch in progress (batch, batches, loss)


class RunTail:
    """Follows one run for the detail screen: new events from the last offset."""

    def __init__(self, run: RunDir):
        self.run = run
        self.tail = run.tail()
        self.epochs: Dict[int, dict] = {}
        self.test: Optional[dict] = None
        self.progress: Optional[dict] = None
        self._sigs = None

    def poll(self) -> Optional[Detail]:
        """A Detail when anything changed since the last poll, else None."""
        sigs = tuple(_sig(self.run.file(f)) for f in ("status.json", "events.jsonl", "result.json", "worker.log"))
        sigs += tuple(_sig(f) for f in self.run.certification_files())
        if sigs == self._sigs:
            return None
        self._sigs = sigs
        events, restarted = self.tail.read()
        if restarted:
            self.epochs, self.test, self.progress = {}, None, None
        for e in events:
            if e.get("type") == "epoch":
                self.epochs[e["epoch"]] = e
            elif e.get("type") == "progress":
                self.progress = e
            elif e.get("type") == "test":
                self.test = e
            elif e.get("type") == "start":
                self.epochs, self.test, self.progress = {}, None, None
        try:
            spec, status, result = self.run.spec(), self.run.status(), self.run.result()
            status = {**status, "state": self.run.state(status)}
        except RunFileError as e:
            spec, status, result = None, {"state": "corrupt", "error": str(e)}, None
        done = max(self.epochs, default=0)
        progress = self.progress if self.progress and self.progress["epoch"] > done else None
        return Detail(self.run.id, [self.epochs[k] for k in sorted(self.epochs)], status, spec, result, self.test,
                      self.run.log_tail(40), run_certified(self.run), progress)


def overlay_series(root, run_ids: List[str]) -> Dict[str, Dict[str, tuple]]:
    """Curves of several runs for the overlay, keyed by plot then by short run id: train loss
    and validation accuracy (%) per epoch, consistency and accuracy under noise (%) per sigma.
    A run whose files cannot be read contributes nothing."""
    from .widgets import short_id
    out: Dict[str, Dict[str, tuple]] = {"loss": {}, "acc": {}, "consistency": {}, "noisy": {}}
    for rid in run_ids:
        run, name = RunDir(Path(root) / rid), short_id(rid)
        try:
            epochs, result = run.epochs(), run.result()
        except RunFileError:
            continue
        ep = [e["epoch"] for e in epochs if isinstance(e.get("epoch"), int)]
        out["loss"][name] = (ep, [e.get("train_loss") for e in epochs if isinstance(e.get("epoch"), int)])
        out["acc"][name] = (ep, [e.get("val_accuracy", 0) * 100 for e in epochs if isinstance(e.get("epoch"), int)])
        if result and result.get("sigmas"):
            out["consistency"][name] = (result["sigmas"], [v * 100 for v in result.get("per_sigma", [])])
            if result.get("accuracy_per_sigma"):
                out["noisy"][name] = (result["sigmas"], [v * 100 for v in result["accuracy_per_sigma"]])
    return out
