"""The one reader of a run directory's rows: what `gaussreg ls`, the fair table, the exports
and the TUI show of each run, built by RunReader from the store's checked files and
re-read only where something changed."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import List, Optional

from gaussreg.runs.spec import describe_params
from gaussreg.runs.store import LIVE, RunDir, RunFileError, Store, not_launched, parse_iso, phase_of


@dataclass(frozen=True)
class RunRow:
    """One run as every list of runs shows it (`gaussreg ls`, the TUI's runs table)."""
    id: str
    experiment: str = ""
    dataset: str = ""
    model: str = ""
    method: str = ""
    params: str = ""  # describe_params without the seed (it has its own field)
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
    slurm_reason: Optional[str] = None  # why Slurm has not started a queued Slurm run (squeue; the TUI asks)
    not_launched: bool = False  # queued, but its launch has ended (Ctrl-C): nothing will start it (store.not_launched)


def training_time(status: dict, state: str, now: Optional[float] = None) -> Optional[float]:
    """Seconds the run has trained in all, as `ls`, `show` and the TUI show it: this attempt
    (started_at to finished_at, or to now while it runs) plus what the worker recorded of the
    attempts before it (time_before_s: the finished epochs a resume took over; an epoch cut
    short is redone, so not counted). None before it started."""
    started, ended = parse_iso(status.get("started_at")), parse_iso(status.get("finished_at"))
    if not started or not (ended or state == "running"):
        return None
    before = status.get("time_before_s")
    before = before if isinstance(before, (int, float)) and not isinstance(before, bool) and before > 0 else 0.0
    # max: a start dated by a node whose clock is ahead must not show a negative duration
    return before + max(0.0, (ended or (time.time() if now is None else now)) - started)


def duration(s: Optional[float]) -> str:
    """A training time as every view writes it: 4m05s, 2h13m; "-" when there is none."""
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def stat_signature(path) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size)


class RunReader:
    """The one builder of a run's row, for the report, `ls` and the TUI. Called again, it reads
    only what changed: status.json when its stat changed, result.json once per completion,
    events.jsonl from the last offset (a rerun's new file is noticed and what the old one
    said is dropped). spec, status and result hold what was read last."""

    def __init__(self, run: RunDir):
        self.run = run
        self.status: dict = {}
        self.result: Optional[dict] = None
        self.row: Optional[RunRow] = None
        self._status_sig = None
        self._tail = None
        self._epoch, self._best_val_acc, self._events_read = 0, None, False
        try:
            self.spec: Optional[dict] = run.spec()
        except RunFileError as e:
            self.spec, self.status = None, {"state": "corrupt", "error": str(e)}

    def _read_events(self) -> None:
        if self._tail is None:
            self._tail = self.run.tail()
        events, restarted = self._tail.read()
        if restarted:  # a rerun began a new events file: what the old one said is gone
            self._epoch, self._best_val_acc = 0, None
        for e in events:
            kind = e.get("type")
            if kind == "epoch":  # a resume may redo an epoch: the count never goes back
                self._epoch = max(self._epoch, e["epoch"])
                if e.get("best"):
                    self._best_val_acc = e.get("val_accuracy")
            elif kind == "start":  # a fresh start forgets what an earlier attempt wrote
                self._epoch, self._best_val_acc = 0, None
        self._events_read = True

    def update(self, now: Optional[float] = None) -> RunRow:
        """The run's row as of now (the previous one when nothing it shows can have changed)."""
        now = time.time() if now is None else now
        run = self.run
        if self.spec is None:
            self.row = RunRow(run.id, state="corrupt", error=self.status.get("error"))
            return self.row
        sig = stat_signature(run.status_file)
        if sig == self._status_sig and self.row is not None and self.row.state not in LIVE:
            return self.row  # a finished run whose status has not changed: nothing to redo
        if sig != self._status_sig:
            self._status_sig = sig
            try:
                self.status = run.status()
            except RunFileError as e:
                self.status = {"state": "corrupt", "error": str(e)}
        state = self.status.get("state", "queued")
        if state != "corrupt":
            state = run.state(self.status)
        if state != "completed":
            self.result = None  # a rerun of a completed run: its old result no longer holds
        elif self.result is None:
            try:
                self.result = run.result() or {}
            except RunFileError as e:
                self.result, state = {}, "corrupt"
                self.status = {**self.status, "error": str(e)}
        res = self.result if state == "completed" else None
        if res:
            epoch, best = res.get("epochs_run", 0), res.get("best_val_accuracy")
        else:
            if state in LIVE or not self._events_read:
                self._read_events()
            epoch, best = self._epoch, self._best_val_acc
        duration = training_time(self.status, state, now)
        s = self.spec
        self.row = RunRow(run.id, s.get("experiment", ""), s.get("dataset", ""), s.get("model", ""),
                          s.get("method", ""), describe_params(s, with_seed=False), s.get("seed"), state, epoch,
                          s.get("max_epochs"), best, res.get("test_accuracy") if res else None,
                          res.get("robustness") if res else None, duration,
                          self.status.get("error") or (run.heartbeat_note(self.status) if state == "interrupted"
                                                       else None),
                          self.status.get("slurm_job"), phase_of({**self.status, "state": state}),
                          not_launched=not_launched(self.status, state, run.path.parent))
        return self.row


def list_runs(store: Store, experiment: Optional[str] = None) -> List[dict]:
    """One record per run: id, spec, state, result (None unless completed), error, slurm_job
    and its `row` (RunRow, the same builder as the TUI's); unreadable runs are reported with
    state 'corrupt'."""
    rows = []
    for run in store.runs():
        reader = RunReader(run)
        if reader.spec is not None and experiment and reader.spec.get("experiment") != experiment:
            continue
        row = reader.update()
        rows.append({"id": run.id, "spec": reader.spec, "state": row.state,
                     "result": (reader.result or None) if row.state == "completed" else None, "error": row.error,
                     "slurm_job": row.slurm_job, "row": row})
    return rows


def has_runs(store: Store, experiment: str) -> bool:
    """Whether list_runs(store, experiment) lists anything, reading spec.json files only up
    to the first run it would list (an unreadable spec counts, as there)."""
    for run in store.runs():
        try:
            if run.spec().get("experiment") == experiment:
                return True
        except RunFileError:
            return True
    return False
