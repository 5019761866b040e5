"""The terminal live view of `gaussreg run`: a row per active run, totals, and a line
per finished run. Reads only the run directories (events from the last byte offset)."""

from __future__ import annotations

import time
from typing import Dict

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .spec import describe_params
from .store import RunDir, RunFileError

STATE_STYLE = {"completed": "green", "failed": "red", "diverged": "magenta", "cancelled": "yellow",
               "interrupted": "yellow", "running": "cyan", "queued": "dim", "elsewhere": "dim", "skipped": "dim"}


class RunTail:
    """The newest epoch and progress events of one run, read incrementally."""

    def __init__(self, run: RunDir):
        self.run, self.events = run, run.tail()
        self.epoch, self.progress = None, None
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
            elif e.get("type") == "progress":
                self.progress = e
            elif e.get("type") in ("start", "resume"):
                self.epoch = self.progress = None


class LiveView:
    def __init__(self, total: int, console: Console = None):
        self.console = console or Console()
        self.total = total
        self.tails: Dict[str, RunTail] = {}
        self.live = Live(self.render(None), console=self.console, refresh_per_second=2, transient=True)
        self.t0 = time.time()

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        self.live.__exit__(*exc)

    def on_change(self, sched, what: str, run) -> None:
        if what == "started":
            self.tails[run.id] = RunTail(run)
            spec = self.tails[run.id].spec
            self.console.print(f"[cyan]started[/]   {escape(run.id)}  {escape(describe_params(spec) if spec else '')}")
        elif what in ("skipped", "elsewhere"):
            self.console.print(f"[dim]{what:9}[/] {escape(run.id)}")
        elif what != "tick":
            self.tails.pop(run.id, None)
            try:
                res = run.result() if what == "completed" else None
            except RunFileError:
                res = None
            wall = f"({res['wall_time_s']:.0f}s)" if res and "wall_time_s" in res else ""
            outcome = sched.summary.outcomes.get(run.id)
            extra = (f"test acc {res['test_accuracy'] * 100:.2f}%  R {res['robustness'] * 100:.2f}%  {wall}" if res
                     else (outcome.error if outcome else "") or "")
            self.console.print(f"[{STATE_STYLE.get(what, '')}]{what:9}[/] {escape(run.id)}  {escape(extra)}")
        self.live.update(self.render(sched))

    def render(self, sched):
        t = Table(expand=False, box=None, header_style="bold")
        for h in ("run", "params", "gpu", "epoch", "loss", "val acc", "img/s", "ETA"):
            t.add_column(h, justify="left" if h in ("run", "params") else "right")
        if sched is not None:
            for a in sched.active.values():
                tail = self.tails.get(a.run.id)
                if tail is None:
                    continue
                tail.update()
                ep, pr = tail.epoch, tail.progress
                spec = tail.spec or {}
                max_ep = spec.get("max_epochs", 0)
                epoch = ep["epoch"] if ep else 0
                loss = pr["loss"] if pr and (not ep or pr["epoch"] > ep["epoch"]) else (ep["train_loss"] if ep else None)
                eta = "-"
                if ep:
                    per_epoch = (time.time() - a.started) / max(1, epoch)
                    eta = f"≤{per_epoch * (max_ep - epoch):.0f}s"  # early stopping may end sooner
                t.add_row(Text(a.run.id), Text(describe_params(spec)), a.slot.gpu or "cpu", f"{epoch}/{max_ep}",
                          f"{loss:.4f}" if loss is not None else "-",
                          f"{ep['val_accuracy'] * 100:.2f}%" if ep else "-",
                          f"{ep['images_per_s']:.0f}" if ep else "-", eta)
            s = sched.summary
            failed = s.count("failed", "diverged")
            totals = Text(f"done {s.count('completed')}  failed {failed}  running {len(sched.active)}  "
                          f"queued {len(sched.queue)}  of {self.total}  ·  {time.time() - self.t0:.0f}s elapsed"
                          + ("  ·  stopping: cancelling workers" if sched.stopping else ""))
            return Group(t, totals)
        return t
