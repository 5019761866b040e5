"""The live view of a Slurm launch (`gaussreg run --backend slurm --follow`): its runs'
states from the run directories, and from squeue why Slurm has not started the queued ones."""

from __future__ import annotations

import os
import time
from typing import Dict, List

from rich.live import Live
from rich.markup import escape
from rich.table import Table

from gaussreg.launch.slurm import SQUEUE_MIN_S, Task, fatal, pending_reasons, squeue, unwritten_runs
from gaussreg.runs.store import TERMINAL, RunDir, RunFileError, Store
from gaussreg.views.style import STATE_STYLE


def follow(store: Store, run_ids: List[str], console, poll_s: float = 1.0, squeue_s: float = SQUEUE_MIN_S) -> int:
    """The live view of a Slurm launch: reads the run directories every `poll_s` and
    squeue every `squeue_s` (>= 10 s). Returns when no run can change any more (0), or
    when a run waits for a reason that will not resolve (1, after saying which runs)."""
    squeue_s = max(SQUEUE_MIN_S, squeue_s)
    runs = [RunDir(store.root / r) for r in run_ids]
    live_tasks: Dict[str, Task] = {}
    unwritten: Dict[str, str] = {}  # run id -> its array task, while its directory is still to be written
    next_squeue, t0 = 0.0, time.time()

    def snapshot():
        rows = []
        for run in runs:
            try:
                status = run.status()
                state = run.state(status)
            except RunFileError as e:
                rows.append((run.id, "failed", "", "", str(e)))
                continue
            job = status.get("slurm_job") or unwritten.get(run.id, "")
            task = live_tasks.get(job)
            reason = task.reason if task and task.state == "PENDING" else ""
            rows.append((run.id, state, job,
                         f"{status.get('epoch') or 0}/{status.get('max_epochs') or '?'}",
                         reason if reason and reason != "None" else (status.get("error") or "")))
        return rows

    def done(rows) -> bool:
        for rid, state, job, _, _ in rows:
            if state in TERMINAL:
                continue
            if state in ("queued", "running", "interrupted") and job in live_tasks:
                return False  # Slurm still has it (an interrupted one is being requeued)
            if state == "running":
                return False  # finishing its last write; its heartbeat will tell
        return True

    def render(rows):
        t = Table(box=None, header_style="bold")
        for h in ("run", "state", "slurm job", "epoch", "reason / error"):
            t.add_column(h)
        counts = {}
        for rid, state, job, ep, why in rows:
            counts[state] = counts.get(state, 0) + 1
            if state not in ("completed",):
                t.add_row(rid, f"[{STATE_STYLE.get(state, '')}]{state}[/]", job, ep, escape(why))
        t.caption = "  ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"  ·  {time.time() - t0:.0f}s"
        return t

    with Live(render(snapshot()), console=console, refresh_per_second=1, transient=True) as view:
        while True:
            if time.monotonic() >= next_squeue:
                live_tasks = squeue()
                next_squeue = time.monotonic() + squeue_s
                # a big launch's directories are written after sbatch: until then its runs are Slurm's all the same
                unwritten = unwritten_runs(store, live_tasks) if not all(os.path.lexists(r.path) for r in runs) else {}
                reasons = pending_reasons(run_ids, store, live_tasks, unwritten)
                bad = {r: why for r, why in reasons.items() if fatal(why)}
                if bad:
                    view.stop()
                    for why in sorted(set(bad.values())):
                        ids = [r for r, w in bad.items() if w == why]
                        console.print(f"[bold red]error:[/] Slurm will not start {len(ids)} run(s) ({escape(why)}): "
                                      + ", ".join(ids), highlight=False)
                    return 1
                rows = snapshot()
                if done(rows):
                    break
            else:
                rows = snapshot()
                if all(r[1] in TERMINAL for r in rows):
                    break
            view.update(render(rows))
            time.sleep(poll_s)
    return 0
