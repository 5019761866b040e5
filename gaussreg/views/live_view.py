"""The terminal live view of `gaussreg run`: a row per active run, totals, and a line
per finished run. When stdout is not a terminal (piped, logged) there is no live table:
a line per epoch per run and per phase change instead, so a log never goes silent.
Reads only the run directories (events from the last byte offset) and the scheduler's
snapshots."""

from __future__ import annotations

import time
from typing import Dict, List, Optional

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from gaussreg.runs.spec import describe_params
from gaussreg.runs.store import RunDir, RunFileError, phase_of
from gaussreg.views.style import STATE_STYLE, CleanConsole


class RunProgress:
    """The newest epoch and progress events of one run, and its phase, read incrementally."""

    def __init__(self, run: RunDir):
        self.run, self.events = run, run.tail()
        self.epoch, self.progress = None, None
        self.phase: Optional[str] = None
        self.new_epochs: List[dict] = []  # epoch events not yet printed (line mode)
        try:
            self.spec = run.spec()
        except RunFileError:
            self.spec = None  # the scheduler reports the run's problem; the view shows what it can

    def update(self) -> None:
        events, restarted = self.events.read()
        if restarted:
            self.epoch = self.progress = None
        for e in events:
            if e.get("type") == "epoch":
                self.epoch = e
                self.new_epochs.append(e)
            elif e.get("type") == "progress":
                self.progress = e
            elif e.get("type") in ("start", "resume"):
                self.epoch = self.progress = None
        try:
            self.phase = phase_of(self.run.status())
        except RunFileError:
            self.phase = None


class LiveView:
    def __init__(self, total: int, console: Console = None, lines: Optional[bool] = None):
        self.console = console or CleanConsole()
        self.total = total
        # a line per epoch instead of a live table: where nobody watches a terminal
        self.lines = not self.console.is_terminal if lines is None else lines
        self.tails: Dict[str, RunProgress] = {}
        self.phases: Dict[str, Optional[str]] = {}
        self.live = Live(self.render(None), console=self.console, refresh_per_second=2, transient=True)
        self.t0 = time.time()

    def __enter__(self):
        if not self.lines:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if not self.lines:
            self.live.__exit__(*exc)

    def _follow(self) -> None:
        """Read what the running runs wrote; in line mode print their new epochs and phases."""
        for rid, tail in self.tails.items():
            tail.update()
            if not self.lines:
                tail.new_epochs.clear()
                continue
            max_ep = (tail.spec or {}).get("max_epochs", "?")
            for e in tail.new_epochs:  # R is measured once, after training: the "completed" line has it
                self.console.print(f"epoch {e['epoch']}/{max_ep} {escape(rid)}  loss {e['train_loss']:.4f}  "
                                   f"val acc {e['val_accuracy'] * 100:.2f}%", highlight=False)
            tail.new_epochs.clear()
            if tail.phase != self.phases.get(rid) and tail.phase not in (None, "training", "validating"):
                self.console.print(f"{tail.phase} {escape(rid)}", highlight=False)  # the long quiet parts
            self.phases[rid] = tail.phase

    def on_change(self, snap, what: str, run) -> None:
        """Told by the scheduler (`snap` is its Snapshot) that `run` changed (`what`)."""
        self._follow()
        if what == "started":
            self.tails[run.id] = RunProgress(run)
            spec = self.tails[run.id].spec
            self.console.print(f"[cyan]started[/]   {escape(run.id)}  {escape(describe_params(spec) if spec else '')}")
        elif what in ("skipped", "elsewhere"):
            self.console.print(f"[dim]{what:9}[/] {escape(run.id)}")
        elif what != "tick":
            self.tails.pop(run.id, None)
            self.phases.pop(run.id, None)
            try:
                res = run.result() if what == "completed" else None
            except RunFileError:
                res = None
            wall = f"({res['wall_time_s']:.0f}s)" if res and "wall_time_s" in res else ""
            outcome = snap.outcomes.get(run.id)
            extra = (f"test acc {res['test_accuracy'] * 100:.2f}%  R {res['robustness'] * 100:.2f}%  {wall}" if res
                     else (outcome.error if outcome else "") or "")
            self.console.print(f"[{STATE_STYLE.get(what, '')}]{what:9}[/] {escape(run.id)}  {escape(extra)}")
        if not self.lines:
            self.live.update(self.render(snap))

    def render(self, snap):
        t = Table(expand=False, box=None, header_style="bold")
        for h in ("run", "params", "gpu", "epoch", "loss", "val acc", "img/s", "ETA"):
            t.add_column(h, justify="left" if h in ("run", "params") else "right")
        if snap is None:
            return t
        for a in snap.active:
            tail = self.tails.get(a.run.id)
            if tail is None:
                continue
            ep, pr = tail.epoch, tail.progress
            spec = tail.spec or {}
            max_ep = spec.get("max_epochs", 0)
            epoch = ep["epoch"] if ep else 0
            loss = pr["loss"] if pr and (not ep or pr["epoch"] > ep["epoch"]) else (ep["train_loss"] if ep else None)
            eta = "-"
            if tail.phase not in (None, "training"):
                eta = tail.phase  # validating, evaluating R, certifying: no ETA to give
            elif ep:
                per_epoch = (time.time() - a.started) / max(1, epoch)
                eta = f"≤{per_epoch * (max_ep - epoch):.0f}s"  # early stopping may end sooner
            t.add_row(Text(a.run.id), Text(describe_params(spec)), a.gpu or "cpu", f"{epoch}/{max_ep}",
                      f"{loss:.4f}" if loss is not None else "-",
                      f"{ep['val_accuracy'] * 100:.2f}%" if ep else "-",
                      f"{ep['images_per_s']:.0f}" if ep else "-", eta)
        failed = snap.count("failed", "diverged")
        totals = Text(f"done {snap.count('completed')}  failed {failed}  running {len(snap.active)}  "
                      f"queued {snap.queued}  of {self.total}  ·  {time.time() - self.t0:.0f}s elapsed"
                      + ("  ·  stopping: cancelling workers" if snap.stopping else ""))
        return Group(t, totals)
