"""Reading the run store incrementally, off the UI thread.

`StoreWatcher.scan()` returns the rows that changed since the last scan, each built by
gaussreg.runs.reader.RunReader (status.json when it changed, events.jsonl of live runs from
the last byte offset, result.json once). `RunDetailWatcher` follows one run for the detail
screen. Neither imports textual: the app runs them in thread workers and posts what
they return."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from gaussreg.launch import slurm
from gaussreg.runs.reader import RunReader, RunRow, stat_signature
from gaussreg.runs.spec import describe_params
from gaussreg.runs.store import LIVE, SPEC_FILE, RunDir, RunFileError, parse_iso, short_id, strip_control
from gaussreg.views.report import run_certified


class StoreWatcher:
    """Every run of the store, each followed by gaussreg's RunReader (the builder `ls` and
    the report use too), plus Slurm's pending reasons for queued Slurm runs."""

    def __init__(self, root, squeue_s: float = slurm.SQUEUE_MIN_S):
        self.root = Path(root)
        self.tracked: Dict[str, RunReader] = {}
        self.shown: Dict[str, RunRow] = {}  # the rows as last returned (with Slurm's reasons)
        # Slurm's pending reasons: one squeue for all runs, at most every SQUEUE_MIN_S (it
        # loads the controller), and only while some Slurm run is queued or running
        self.squeue_s = max(slurm.SQUEUE_MIN_S, squeue_s)
        self.tasks: Dict[str, slurm.Task] = {}
        self.squeue_at: Optional[float] = None  # when the last squeue answered
        self.squeue_calls = 0
        self.squeue_error: Optional[str] = None
        self._next_squeue = 0.0
        self.scans = 0
        self.removed: List[str] = []  # run ids the last scan found gone

    def _poll_squeue(self) -> None:
        if time.monotonic() < self._next_squeue:
            return
        if not any(t.row and t.row.slurm_job and t.row.state in LIVE for t in self.tracked.values()):
            return
        self._next_squeue = time.monotonic() + self.squeue_s
        self.squeue_calls += 1
        try:
            self.tasks, self.squeue_at, self.squeue_error = slurm.squeue(), time.time(), None
        except slurm.SlurmError as e:  # no reasons then; the runs' files still say the rest
            self.tasks, self.squeue_at, self.squeue_error = {}, None, str(e)

    def _reason(self, status: dict, state: str) -> Optional[str]:
        job = status.get("slurm_job")
        if state != "queued" or not job or self.squeue_at is None:
            return None
        task = self.tasks.get(job)
        if task is None:  # asked after it was submitted, and Slurm no longer has it: it will not start
            submitted = parse_iso(status.get("submitted_at"))
            return "not in squeue" if submitted and submitted < self.squeue_at else None
        if task.state == "PENDING" and task.reason and task.reason != "None":
            return task.reason
        return None

    def scan(self) -> List[RunRow]:
        """Rows that are new or changed since the previous scan."""
        now = time.time()
        changed = []
        self.scans += 1
        self._poll_squeue()
        try:
            entries = [e for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(("_", "."))]
        except OSError:  # no store yet, or one that became a file or unreadable: nothing to show
            entries = []
        present = set()
        for entry in entries:
            # the runs `ls` lists (Store.runs): a folder with a spec.json, even a broken one
            if not os.path.lexists(os.path.join(entry.path, SPEC_FILE)):
                continue
            present.add(entry.name)
            reader = self.tracked.get(entry.name)
            if reader is None:
                reader = self.tracked[entry.name] = RunReader(RunDir(entry.path))
            row = reader.update(now)
            reason = self._reason(reader.status, row.state)
            if reason:
                row = replace(row, slurm_reason=reason)
            if row != self.shown.get(entry.name):
                self.shown[entry.name] = row
                changed.append(row)
        # deleted or renamed away since the last scan: no longer a run of the store, as in `ls`
        self.removed = [name for name in self.shown if name not in present]
        for name in self.removed:
            self.shown.pop(name)
            self.tracked.pop(name, None)
        return changed

    def rows(self) -> List[RunRow]:
        return list(self.shown.values())


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


class RunDetailWatcher:
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
        run = self.run
        sigs = tuple(stat_signature(f) for f in (run.status_file, run.events_file, run.result_file, run.log_file))
        sigs += tuple(stat_signature(f) for f in run.certification_files())
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


def overlay_series(root, run_ids: List[str]) -> Tuple[Dict[str, Dict[str, tuple]], Dict[str, str]]:
    """Curves of several runs for the overlay, keyed by plot then by short run id: train loss
    and validation accuracy (%) per epoch, consistency and accuracy under noise (%) per sigma;
    and what each short id is: its method and parameters ("regularizer alpha=1 sigma=0.5").
    A run whose files cannot be read contributes nothing."""
    out: Dict[str, Dict[str, tuple]] = {"loss": {}, "acc": {}, "consistency": {}, "noisy": {}}
    labels: Dict[str, str] = {}
    for rid in run_ids:
        run, name = RunDir(Path(root) / rid), short_id(rid)
        try:
            spec, epochs, result = run.spec(), run.epochs(), run.result()
        except RunFileError:
            continue
        labels[name] = strip_control(f"{spec.get('method', '?')} {describe_params(spec)}".strip())
        ep = [e["epoch"] for e in epochs if isinstance(e.get("epoch"), int)]
        out["loss"][name] = (ep, [e.get("train_loss") for e in epochs if isinstance(e.get("epoch"), int)])
        out["acc"][name] = (ep, [e.get("val_accuracy", 0) * 100 for e in epochs if isinstance(e.get("epoch"), int)])
        if result and result.get("sigmas"):
            out["consistency"][name] = (result["sigmas"], [v * 100 for v in result.get("per_sigma", [])])
            if result.get("accuracy_per_sigma"):
                out["noisy"][name] = (result["sigmas"], [v * 100 for v in result["accuracy_per_sigma"]])
    return out, labels
