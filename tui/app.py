"""The gaussreg dashboard: `gaussreg tui [--store runs] [--manifest experiments.toml]`."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, Iterable, List

from textual import on, work
from textual.app import App, SystemCommand
from textual.screen import Screen

from gaussreg.launch import slurm
from gaussreg.launch.control import ControlError, cancel_launch, cancel_run, launches, restart
from gaussreg.launch.request import LaunchError, launch
from gaussreg.runs.store import RunDir, RunFileError, Store

from .messages import RunsChanged
from .screens import CompareScreen, ConfirmScreen, HelpScreen, LaunchesScreen, LaunchScreen, RunsScreen
from .watcher import RunRow, StoreWatcher


class GaussregApp(App):
    TITLE = "gaussreg"
    CSS = """
    #filters { height: 3; }
    #filter { width: 1fr; }
    #state { width: 24; }
    #summary { height: 1; padding: 0 1; }
    #plots { width: 2fr; }
    #side { width: 1fr; }
    #status { height: auto; padding: 0 1; }
    #spec-box { height: 7; padding: 0 1; }
    #log { height: 1fr; border-top: solid $primary; }
    #compare-title, #compare-footer { height: auto; padding: 0 1; }
    #best { height: auto; max-height: 12; }
    #compare-selects { height: auto; }
    #experiment { width: 1fr; max-width: 60; }
    #setting { width: 1fr; max-width: 60; }
    #budget { width: 22; }
    #budget-error { height: auto; padding: 0 1; }
    ModalScreen { align: center middle; }
    #dialog { width: 90; max-width: 100%; height: auto; max-height: 90%; border: thick $primary; background: $surface;
              padding: 1 2; }
    #dialog > Horizontal { height: auto; }  /* else a row of buttons takes the whole height */
    #dialog .row { height: 3; }
    #dialog Label { padding: 1 1 0 0; }
    #dialog.menu { width: 60; }
    #sort-columns { height: auto; max-height: 16; }
    #experiments { height: 6; }
    #overlay Horizontal { height: 1fr; }
    #dialog.launch { overflow-y: auto; }  /* a two-line error at 80x24 scrolls instead of hiding the buttons */
    #dialog.launch .row Input { width: 1fr; }
    #dialog.launch .row Input.short { width: 10; }
    #dialog.launch .row Input#gpus { width: 12; }  /* "auto" and a cursor, or "0,1,2" */
    #dialog.launch .row Input.time { width: 14; }
    #dialog.launch .row Select { width: 14; margin-right: 2; }
    #dialog.launch .row Button { width: auto; min-width: 10; margin-right: 2; }
    #dialog.launch .row Label { width: auto; padding: 1 1 0 1; }
    #plan-error { height: auto; }
    """

    def __init__(self, store: str = "runs", manifest: str = "experiments.toml", poll_s: float = 1.0):
        super().__init__()
        self.store_root = Path(store)
        self.manifest = manifest
        self.poll_s = poll_s
        self.watcher = StoreWatcher(self.store_root)
        self._rows: Dict[str, RunRow] = {}
        self._stop = threading.Event()
        self.loaded = False  # the first scan has been shown

    def on_mount(self) -> None:
        self.sub_title = f"store {self.store_root}"
        self.push_screen(RunsScreen())
        self.watch_store()

    def on_unmount(self) -> None:
        self._stop.set()

    def rows(self) -> List[RunRow]:
        return list(self._rows.values())

    @work(thread=True, exclusive=True, group="store")
    def watch_store(self) -> None:
        """The store reader: scans, and posts what changed. The only reader of the store
        for the runs table, so the UI thread never touches a file."""
        first = True
        while not self._stop.is_set():
            changed = self.watcher.scan()
            if changed or first or self.watcher.removed:
                self.post_message(RunsChanged(changed, first, self.watcher.removed))
                first = False
            self._stop.wait(self.poll_s)

    @on(RunsChanged)
    def runs_changed(self, message: RunsChanged) -> None:
        for row in message.rows:
            self._rows[row.id] = row
        for rid in message.removed:
            self._rows.pop(rid, None)
        for screen in self.screen_stack:
            if isinstance(screen, RunsScreen):  # it ignores what arrives before it is mounted or after
                screen.show_rows(message.rows, self.rows(), rebuild=bool(message.removed))
            elif isinstance(screen, CompareScreen) and screen.is_attached:
                screen.store_changed({r.experiment for r in message.rows})
        self.loaded = True

    # ------------------------------------------------------------ actions

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_compare(self) -> None:
        exps = sorted({r.experiment for r in self._rows.values() if r.experiment})
        current = None
        runs = next((s for s in self.screen_stack if isinstance(s, RunsScreen)), None)
        if runs and runs.table.selected_id in self._rows:
            current = self._rows[runs.table.selected_id].experiment
        self.push_screen(CompareScreen(exps, current))

    def action_launch(self) -> None:
        self.push_screen(LaunchScreen(self.manifest, str(self.store_root)), self._launch)

    @work(thread=True, group="control")
    def _launch(self, plan) -> None:
        """One scheduler process for the whole plan the dialog checked (it owns the GPUs and cores
        it was given)."""
        if not plan:
            return
        request = plan.request
        try:
            info = launch(plan)
        except LaunchError as e:
            self.call_from_thread(self.notify, str(e), severity="error", markup=False)
            return
        if info.get("backend") == "slurm":
            skipped = f"; {len(info['skipped'])} skipped (queued, running or finished)" if info["skipped"] else ""
            text = (f"submitted {len(info['submitted'])} run(s) as Slurm array job {info['job_id']}{skipped}"
                    if info["job_id"] else f"nothing to submit{skipped}")
            self.call_from_thread(self.notify, text, markup=False)
            return
        self.call_from_thread(self.notify, f"launched {', '.join(request.experiments)} (pid {info['pid']}); "
                                           f"log {info['log']}", markup=False)

    # what each control can act on; anything else is refused before asking
    CANCELLABLE = ("running",)
    RERUNNABLE = ("failed", "cancelled", "interrupted", "diverged", "queued")

    def _refused(self, run_id: str, allowed: tuple, what: str) -> bool:
        row = self._rows.get(run_id)
        if row is None or row.state in allowed or (what == "cancel" and row.slurm_job and row.state == "queued"):
            return False  # a queued Slurm run can be cancelled: scancel drops its pending task
        hint = {"completed": " (to train a completed run again: gaussreg run --rerun)",
                "running": " (cancel it first with x)"}.get(row.state, "")
        self.notify(f"{what} refused: run {run_id} is {row.state}; only {', '.join(allowed)} runs can be"
                    f"{' cancelled' if what == 'cancel' else ' trained again'}{hint}", severity="error", markup=False)
        return True

    def confirm_cancel_run(self, run_id: str) -> None:
        if self._refused(run_id, self.CANCELLABLE, "cancel"):
            return

        def answer(yes: bool) -> None:
            if yes:
                self._control("cancel", run_id)
        self.push_screen(ConfirmScreen(f"Cancel run {run_id}? Its worker saves last.pt and stops."), answer)

    def confirm_rerun(self, run_id: str) -> None:
        if self._refused(run_id, self.RERUNNABLE, "rerun"):
            return

        def answer(yes: bool) -> None:
            if yes:
                self._control("rerun", run_id)
        row = self._rows.get(run_id)
        where = (" through Slurm, with the settings it was submitted with" if row and row.slurm_job else "")
        self.push_screen(ConfirmScreen(f"Train run {run_id} again{where} (from its last.pt when it has one)?"),
                         answer)

    def confirm_remove_run(self, run_id: str) -> None:
        """The runs screen's remove key: Store.remove, as `gaussreg rm`, after a yes."""
        run = Store(self.store_root).get(run_id) if run_id in self._rows else None
        why = Store(self.store_root).removal_refused(run) if run is not None else f"no run {run_id}"
        if why:
            self.notify(f"remove refused: {why}", severity="error", markup=False)
            return

        def answer(yes: bool) -> None:
            if yes:
                self._remove(run_id)
        self.push_screen(ConfirmScreen(f"Remove run {run_id} from the store, with its checkpoints, certificates "
                                       "and log? This cannot be undone."), answer)

    @work(thread=True, group="control")
    def _remove(self, run_id: str) -> None:
        st = Store(self.store_root)
        try:
            st.remove(st.get(run_id))
            self.call_from_thread(self.notify, f"removed {run_id}", markup=False)
        except (OSError, RunFileError) as e:
            self.call_from_thread(self.notify, f"remove failed: {getattr(e, 'strerror', None) or e}",
                                  severity="error", markup=False)

    @work(thread=True, group="control")
    def _control(self, what: str, run_id: str) -> None:
        run = RunDir(self.store_root / run_id)
        try:
            if what == "cancel" and _on_slurm(run):  # scancel its array task
                self.call_from_thread(self.notify, f"{run_id}: {slurm.cancel(run)}", markup=False)
            elif what == "cancel":
                self.call_from_thread(self.notify, cancel_run(run), markup=False)  # waits up to its grace period
            elif _on_slurm(run):  # a cluster run trains on the cluster again, never on this login node
                sub = slurm.resubmit(run)
                self.call_from_thread(self.notify, f"resubmitted {run_id} as Slurm array job {sub.job_id}",
                                      markup=False)
            else:
                p = restart(run)
                self.call_from_thread(self.notify, f"training {run_id} again (pid {p.pid})", markup=False)
        except (ControlError, RunFileError) as e:  # RunFileError: a run directory that is a link, a bad lock
            self.call_from_thread(self.notify, str(e), severity="error", markup=False)

    @work(thread=True, group="control")
    def action_cancel_launch(self) -> None:
        found = launches(Store(self.store_root))
        self.call_from_thread(self.push_screen, LaunchesScreen(found), self._confirm_cancel_launch)

    def _confirm_cancel_launch(self, pid) -> None:
        if pid is None:
            return

        def answer(yes: bool) -> None:
            if yes:
                self._cancel_launch(pid)
        self.push_screen(ConfirmScreen(f"Cancel launch pid {pid} and every run it is training?"), answer)

    @work(thread=True, group="control")
    def _cancel_launch(self, pid: int) -> None:
        try:
            cancel_launch(Store(self.store_root), pid)
            self.call_from_thread(self.notify, f"cancelling launch {pid}", markup=False)
        except ControlError as e:
            self.call_from_thread(self.notify, str(e), severity="error", markup=False)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Compare", "The fair comparison of an experiment", self.action_compare)
        yield SystemCommand("Launch", "Launch experiments of a manifest", self.action_launch)
        yield SystemCommand("Cancel launch", "Stop a running launch and its runs", self.action_cancel_launch)
        yield SystemCommand("Help", "Keys and states", self.action_help)


def run_app(store: str = "runs", manifest: str = "experiments.toml") -> None:
    GaussregApp(store, manifest).run()


def _on_slurm(run: RunDir) -> bool:
    try:
        return slurm.is_slurm(run.status())
    except RunFileError:
        return False
