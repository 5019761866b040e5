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

from gaussreg.spec import describe_params
from gaussreg.store import RunDir, RunFileError, parse_iso

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
    state: str = "queued"
    epoch: int = 0
    max_epochs: Optional[int] = None
    best_val_acc: Optional[float] = None
    test_acc: Optional[float] = None
    robustness: Optional[float] = None
    duration: Optional[float] = None
    error: Optional[str] = None


@dataclass
class _Tracked:
    run: RunDir
    spec: Optional[dict]
    status_sig: Optional[tuple] = None
    status: dict = field(default_factory=dict)
    result: Optional[dict] = None
    offset: int = 0
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
        events, tr.offset = tr.run.events(tr.offset)
        for e in events:
            kind = e.get("type")
            if kind == "epoch":
                tr.epoch = e.get("epoch", tr.epoch)
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
        if state == "completed" and tr.result is None:
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
            epoch, best = max(tr.epoch, tr.status.get("epoch") or 0), tr.best_val_acc
        started = parse_iso(tr.status.get("started_at"))
        ended = parse_iso(tr.status.get("finished_at"))
        duration = (ended or now) - started if started and (ended or state == "running") else None
        s = tr.spec
        return RunRow(run.id, s.get("experiment", ""), s.get("dataset", ""), s.get("model", ""), s.get("method", ""),
                      describe_params(s), state, epoch, s.get("max_epochs"), best,
                      res.get("test_accuracy") if res else None, res.get("robustness") if res else None,
                      duration, tr.status.get("error"))

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


class RunTail:
    """Follows one run for the detail screen: new events from the last offset."""

    def __init__(self, run: RunDir):
        self.run = run
        self.offset = 0
        self.epochs: Dict[int, dict] = {}
        self.test: Optional[dict] = None
        self._sigs = None

    def poll(self) -> Optional[Detail]:
        """A Detail when anything changed since the last poll, else None."""
        sigs = tuple(_sig(self.run.file(f)) for f in ("status.json", "events.jsonl", "result.json", "worker.log"))
        if sigs == self._sigs:
            return None
        self._sigs = sigs
        events, self.offset = self.run.events(self.offset)
        for e in events:
            if e.get("type") == "epoch":
                self.epochs[e["epoch"]] = e
            elif e.get("type") == "test":
                self.test = e
            elif e.get("type") == "start":
                self.epochs, self.test = {}, None
        try:
            spec, status, result = self.run.spec(), self.run.status(), self.run.result()
            status = {**status, "state": self.run.state(status)}
        except RunFileError as e:
            spec, status, result = None, {"state": "corrupt", "error": str(e)}, None
        return Detail(self.run.id, [self.epochs[k] for k in sorted(self.epochs)], status, spec, result, self.test,
                      self.run.log_tail(40))
