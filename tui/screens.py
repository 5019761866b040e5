"""Screens of the dashboard: runs, run detail, compare, launch, and small modals."""

from __future__ import annotations

import threading
from typing import Dict, List, Optional

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import (Button, DataTable, Footer, Header, Input, Label, OptionList, RichLog, Select,
                             SelectionList, Static)

from gaussreg.launch.request import LaunchError, LaunchRequest, Plan, plan
from gaussreg.runs import manifest, reader
from gaussreg.runs.spec import describe_params
from gaussreg.runs.store import STATE_STYLE, STATES, RunDir, Store, phase_of, short_id
from gaussreg.views import report
from gaussreg.views.report import budget_problem, cost_cells, cost_lines

from .messages import CompareReady, DetailChanged, OverlayReady, PlanReady
from .watcher import RunDetailWatcher, overlay_series
from .widgets import COLUMNS, SERIES_COLORS, RunsTable, SeriesPlot, SummaryBar, pct

METHOD_COLORS = {"baseline": "white", "augment": "orange", "regularizer": "cyan", "randsign": "magenta",
                 "fgsm": "red"}


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(Text(self.question))  # run ids are data, not markup
            with Horizontal():
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class SortScreen(ModalScreen[Optional[str]]):
    """Pick the column to sort the runs table by (the current one again reverses it)."""
    BINDINGS = [Binding("escape", "dismiss_none", "close")]

    def __init__(self, current: Optional[str], reverse: bool):
        super().__init__()
        self.current, self.reverse = current, reverse

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="menu"):
            yield Label("Sort runs by (the current column again: reversed)")
            yield OptionList(*[label + ("  (current, reversed)" if key == self.current and self.reverse
                                        else "  (current)" if key == self.current else "")
                               for key, label in COLUMNS], id="sort-columns")

    def on_mount(self) -> None:
        keys = [k for k, _ in COLUMNS]
        self.query_one(OptionList).highlighted = keys.index(self.current) if self.current in keys else 0

    @on(OptionList.OptionSelected)
    def picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(COLUMNS[event.option_index][0])

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "close")]
    # lines of at most 72 characters: the dialog is 74 wide inside at 80 columns, so no line
    # is wrapped in the middle of a sentence
    TEXT = """gaussreg tui: launch, watch, compare and browse runs

Runs screen
  enter   the run's detail (curves, robustness, spec, status, log)
  /       filter by text (any column); the selector filters by state
  s       sort by any column (a menu; the same column again reverses)
  space   mark a run;  o  overlay the curves of the marked runs
  c       compare: the fair table and accuracy vs robustness
  l       launch experiments of a manifest, locally (they go on after
          quit) or on Slurm (one sbatch array job)
  x       cancel the selected run (scancel for a Slurm run)
  r       train the selected run again if it is failed, cancelled,
          interrupted, diverged or queued (a Slurm run is resubmitted
          to Slurm with its launch's settings)
  X       cancel a whole launch (every run it trains)
  ?       this help      ctrl+p  command palette      q  quit

Detail, overlay and compare screens: escape goes back; in the
detail, p shows the next plot when they do not fit one above another;
in compare, a budget X (enter) lets only configurations trained in at
most X times the baseline's time compete (gaussreg table --budget).
States: queued, running, completed, failed, cancelled, diverged; a run
whose worker died without a word (its lock is free; on another host, a
stale heartbeat) shows as interrupted. A running run says when it
validates, evaluates R or certifies."""

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="dialog"):  # scrolls where the screen is lower than the text
            yield Static(self.TEXT, id="help-text")
            yield Label("escape to close", classes="dim")


class RunsScreen(Screen):
    AUTO_FOCUS = "#runs"
    BINDINGS = [
        Binding("enter", "open", "detail", show=False),
        # "/" and space are in the filter's placeholder and the help; the other keys fit 80 columns
        Binding("slash", "focus_filter", "filter", show=False),
        Binding("escape", "leave_filter", "back to the runs", show=False),
        Binding("s", "sort", "sort"),
        Binding("space", "mark", "mark", show=False),
        Binding("o", "overlay", "overlay"),
        Binding("c", "app.compare", "compare"),
        Binding("l", "app.launch", "launch"),
        Binding("x", "cancel_run", "cancel"),
        Binding("r", "rerun", "rerun"),
        Binding("X", "app.cancel_launch", "stop launch"),
        Binding("question_mark", "app.help", "help"),
        Binding("q", "app.quit", "quit"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="filters"):
            yield Input(placeholder="/ filter: experiment, method, params, state…  (space marks a run)",
                        id="filter")
            yield Select([(s, s) for s in STATES + ("corrupt",)], prompt="any state", id="state")
        yield SummaryBar(id="summary")
        yield RunsTable(id="runs")
        # compact, and the palette (ctrl+p) left to the help: every key then fits 80 columns
        yield Footer(compact=True, show_command_palette=False)

    ready = False  # composed and mounted: only then can rows be shown

    @property
    def table(self) -> RunsTable:
        return self.query_one(RunsTable)

    def on_mount(self) -> None:
        self.ready = True
        self.show_rows([], self.app.rows(), rebuild=True)  # rows read before this screen existed

    def on_unmount(self) -> None:
        self.ready = False

    def keep(self, row) -> bool:
        text = self.query_one("#filter", Input).value.strip().lower()
        select = self.query_one("#state", Select)
        if not select.is_blank() and row.state != select.value:
            return False
        if not text:
            return True
        hay = " ".join(str(v) for v in (row.id, row.experiment, row.dataset, row.model, row.method, row.params,
                                        row.state)).lower()
        return all(word in hay for word in text.split())

    def show_rows(self, changed, all_rows, rebuild: bool = False) -> None:
        """Show store rows. The store reader's messages can arrive while this screen is being
        composed or torn down (app start, quit): such a message is dropped, since on_mount
        catches up from app.rows() and a removed screen needs nothing."""
        if not self.ready or not self.is_attached or not self.query(RunsTable):
            return
        if rebuild:
            self.table.rebuild(all_rows, self.keep)
        else:
            self.table.sync(changed, self.keep)
        self.query_one(SummaryBar).show(all_rows, self.table.row_count)

    @on(Input.Changed, "#filter")
    @on(Select.Changed, "#state")
    def filter_changed(self) -> None:
        self.show_rows([], self.app.rows(), rebuild=True)

    @on(Input.Submitted, "#filter")
    def filter_done(self) -> None:
        self.table.focus()

    @on(DataTable.HeaderSelected)
    def header(self, event: DataTable.HeaderSelected) -> None:
        self.table.sort_by(event.column_key.value)

    @on(DataTable.RowSelected)
    def selected(self, event: DataTable.RowSelected) -> None:
        self.app.push_screen(RunDetailScreen(event.row_key.value))

    def action_open(self) -> None:
        if self.table.selected_id:
            self.app.push_screen(RunDetailScreen(self.table.selected_id))

    def action_mark(self) -> None:
        self.table.toggle_mark()

    def action_overlay(self) -> None:
        runs = self.table.marked or ([self.table.selected_id] if self.table.selected_id else [])
        if runs:
            self.app.push_screen(OverlayScreen(list(runs)))
        else:
            self.app.notify("mark runs with space first, then o overlays their curves")

    def action_focus_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_leave_filter(self) -> None:
        """escape in the filter box: back to the table, the filter kept (as enter does)."""
        self.table.focus()

    def action_sort(self) -> None:
        def chosen(column: Optional[str]) -> None:
            if column:
                self.table.sort_by(column)
        self.app.push_screen(SortScreen(self.table.sorted_by, self.table.reverse), chosen)

    def action_cancel_run(self) -> None:
        if self.table.selected_id:
            self.app.confirm_cancel_run(self.table.selected_id)

    def action_rerun(self) -> None:
        if self.table.selected_id:
            self.app.confirm_rerun(self.table.selected_id)


def _grid(pairs) -> Table:
    """Label/value lines that wrap within the side panel instead of running off it."""
    g = Table.grid(padding=(0, 1))
    g.add_column(style="dim", no_wrap=True)
    g.add_column(overflow="fold")
    for k, v in pairs:  # values are data (run files): Text, never markup
        g.add_row(k, v if isinstance(v, Text) else Text(str(v)))
    return g


def _optimizer(o: dict) -> str:
    parts = [str(o.get("name", "?")), f"lr {o.get('lr'):g}" if isinstance(o.get("lr"), (int, float)) else ""]
    for k, v in o.items():
        if k not in ("name", "lr"):
            parts.append(f"{k.replace('_', ' ')} {', '.join(f'{x:g}' for x in v) if isinstance(v, list) else v}")
    return "  ".join(p for p in parts if p)


def _log_line(line: str) -> str:
    """`2026-01-01T10:00:05.123+00:00 text` -> `10:00:05 text`: the date is the same all run long."""
    stamp, _, rest = line.partition(" ")
    return f"{stamp[11:19]} {rest}" if len(stamp) >= 19 and stamp[10:11] == "T" else line


class RunDetailScreen(Screen):
    BINDINGS = [Binding("escape,backspace", "app.pop_screen", "back"),
                Binding("p", "next_plot", "next plot"),
                Binding("x", "cancel_run", "cancel run"), Binding("r", "rerun", "rerun"),
                Binding("question_mark", "app.help", "help"), Binding("q", "app.quit", "quit")]
    PLOTS = ("loss", "acc", "robust")
    COMPACT_BELOW = 34  # rows: below this the plots are shown one at a time (p switches)

    def __init__(self, run_id: str):
        super().__init__()
        self.run_id = run_id
        self.title = run_id
        self.shown_plot = 0
        self._stop = threading.Event()

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="plots"):
                yield SeriesPlot("loss", "epoch", "", integer_x=True,
                                 colors={"train": "cyan", "validation": "orange"}, id="loss")
                yield SeriesPlot("validation accuracy %", "epoch", "", integer_x=True,
                                 colors={"validation": "orange"}, ybounds=(0, 100), id="acc")
                yield SeriesPlot("under test noise %", "sigma (pixel units)", "",
                                 colors={"consistency": "cyan", "accuracy": "green"}, ybounds=(0, 100), id="robust")
            with Vertical(id="side"):
                yield Static(id="status")
                with VerticalScroll(id="spec-box"):
                    yield Static(id="spec")
                yield RichLog(id="log", max_lines=200, wrap=True, markup=False, highlight=False)
        yield Footer()

    def on_mount(self) -> None:
        self.follow()

    def on_resize(self) -> None:
        compact = self.size.height < self.COMPACT_BELOW
        for i, name in enumerate(self.PLOTS):
            self.query_one(f"#{name}").display = not compact or i == self.shown_plot

    def action_next_plot(self) -> None:
        self.shown_plot = (self.shown_plot + 1) % len(self.PLOTS)
        self.on_resize()

    def on_unmount(self) -> None:
        self._stop.set()

    @work(thread=True, exclusive=True, group="detail")
    def follow(self) -> None:
        tail = RunDetailWatcher(RunDir(self.app.store_root / self.run_id))
        while not self._stop.is_set():
            detail = tail.poll()
            if detail is not None:
                self.post_message(DetailChanged(detail))
            self._stop.wait(self.app.poll_s)

    @on(DetailChanged)
    def show(self, message: DetailChanged) -> None:
        d = message.detail
        ep = [e["epoch"] for e in d.epochs]
        self.query_one("#loss", SeriesPlot).set_series({
            "train": (ep, [e["train_loss"] for e in d.epochs]),
            "validation": (ep, [e["val_loss"] for e in d.epochs])})
        self.query_one("#acc", SeriesPlot).set_series({
            "validation": (ep, [e["val_accuracy"] * 100 for e in d.epochs])})
        test = d.result or d.test
        if test and test.get("sigmas"):
            series = {"consistency": (test["sigmas"], [v * 100 for v in test["per_sigma"]])}
            if test.get("accuracy_per_sigma"):
                series["accuracy"] = (test["sigmas"], [v * 100 for v in test["accuracy_per_sigma"]])
            self.query_one("#robust", SeriesPlot).set_series(series)
        self.query_one("#status", Static).update(self._status(d))
        if d.spec:
            self.query_one("#spec", Static).update(self._spec(d.spec))
        log = self.query_one(RichLog)
        log.clear()
        for line in d.log_tail.splitlines():
            log.write(_log_line(line))

    @staticmethod
    def _status(d) -> Table:
        st = d.status
        state = st.get("state", "?")
        done, total = (d.epochs[-1]["epoch"] if d.epochs else 0), st.get("max_epochs") or "?"
        # one meaning everywhere: epochs done; a running run also names the epoch in progress
        phase = phase_of(st)
        # after the last epoch (evaluating R, certifying) no epoch is running
        epochs = (f"{done}/{total} done, epoch {done + 1} running"
                  if state == "running" and phase in (None, "training", "validating") else f"{done}/{total} done")
        if state == "running" and phase in (None, "training") and d.progress:  # within an epoch: how far its batches are
            p = d.progress
            batches = f"batch {p['batch']}/{p['batches']}, " if "batch" in p and "batches" in p else ""
            epochs += f": {batches}loss {p['loss']:.4f}"
        shown = Text(state, style=STATE_STYLE.get(state, ""))
        if phase and phase != "training":
            shown += Text(f", {phase}", style="cyan")
        rows = [("state", shown), ("epochs", epochs),
                ("device", str(st.get("device") or "-") + (f" in {st['precision']}" if st.get("precision") else ""))]
        if d.epochs:
            e = d.epochs[-1]
            rows.append(("last epoch", f"loss {e['train_loss']:.4f} train, {e['val_loss']:.4f} val; "
                                       f"val acc {pct(e['val_accuracy'])}%; {e['images_per_s']:.0f} img/s"))
        if d.result:
            r = d.result
            rows.append(("test", Text(f"acc {pct(r['test_accuracy'])}%  R {pct(r['robustness'])}%  "
                                      f"(best epoch {r.get('best_epoch', '?')} of {r.get('epochs_run', '?')})", style="bold")))
        if d.certified:
            c = d.certified
            rows.append(("certified", f"acc at sigma {', '.join(f'{v:g}' for v in c['sigmas'])}: "
                                      + "  ".join(f"r={k} {pct(v)}%" for k, v in c["accuracy"].items())))
        if st.get("error"):
            rows.append(("error", Text(str(st["error"]), style="red")))
        return _grid(rows)

    @staticmethod
    def _spec(s: dict) -> Table:
        rob = s.get("robustness", {})
        sig = rob.get("sigmas") or []
        return _grid([
            ("run", f"{s.get('experiment')} · {s.get('method')} {describe_params(s, with_seed=False)}"),
            ("data", f"{s.get('dataset')} · {s.get('model')}"),
            ("seed", str(s.get("seed"))),
            ("training", f"≤ {s.get('max_epochs')} epochs, batch {s.get('batch_size')}"),
            ("optimizer", _optimizer(s.get("optimizer") or {})),
            ("robustness", f"{len(sig)} sigmas {min(sig, default=0):g}–{max(sig, default=0):g}, "
                           f"{rob.get('samples', 1)} sample(s)")])

    def action_cancel_run(self) -> None:
        self.app.confirm_cancel_run(self.run_id)

    def action_rerun(self) -> None:
        self.app.confirm_rerun(self.run_id)


class OverlayScreen(Screen):
    """The curves of several runs on shared axes, one colour per run (what W&B and TensorBoard
    users do first): loss, validation accuracy, and consistency and accuracy under noise."""
    BINDINGS = [Binding("escape,backspace", "app.pop_screen", "back"), Binding("question_mark", "app.help", "help"),
                Binding("q", "app.quit", "quit")]
    PLOTS = (("loss", "train loss", "epoch", True), ("acc", "validation accuracy %", "epoch", True),
             ("consistency", "R: prediction unchanged %", "sigma", False),
             ("noisy", "accuracy under noise %", "sigma", False))

    def __init__(self, run_ids: List[str]):
        super().__init__()
        self.run_ids = run_ids
        self.title = f"overlay of {len(run_ids)} run(s)"

    def compose(self) -> ComposeResult:
        colors = {short_id(r): SERIES_COLORS[i % len(SERIES_COLORS)] for i, r in enumerate(self.run_ids)}
        yield Header()
        with Vertical(id="overlay"):
            for row in (self.PLOTS[:2], self.PLOTS[2:]):
                with Horizontal():
                    for key, title, x, integer in row:
                        yield SeriesPlot(title, x, "", integer_x=integer, colors=colors,
                                         ybounds=None if key == "loss" else (0, 100), id=f"overlay-{key}")
        yield Footer()

    def on_mount(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, group="overlay")
    def load(self) -> None:
        self.post_message(OverlayReady(overlay_series(self.app.store_root, self.run_ids)))

    @on(OverlayReady)
    def show(self, message: OverlayReady) -> None:
        for key, _, _, _ in self.PLOTS:
            self.query_one(f"#overlay-{key}", SeriesPlot).set_series(message.series[key])


class CompareScreen(Screen):
    BINDINGS = [Binding("escape,backspace", "app.pop_screen", "back"), Binding("question_mark", "app.help", "help"),
                Binding("q", "app.quit", "quit")]

    def __init__(self, experiments: List[str], experiment: Optional[str] = None):
        super().__init__()
        self.title = "compare"
        self.experiments = experiments
        self.experiment = experiment or (experiments[0] if experiments else None)
        self.setting: Optional[str] = None  # the comparison shown, by its label, when the experiment has several
        self.budget: Optional[float] = None  # as `gaussreg table --budget`: times the baseline's training time
        self._labels: List[str] = []
        self._last: Optional[CompareReady] = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="compare-selects"):
            yield Select([(Text(e), e) for e in self.experiments], value=self.experiment or Select.NULL,
                         prompt="experiment", id="experiment", allow_blank=not self.experiments)
            # an experiment whose runs differ in a setting (dataset, max_epochs, ...) is several
            # comparisons, each with its own baseline: this picks one; hidden when there is one
            yield Select([], prompt="setting", id="setting")
            yield Input(placeholder="budget × (enter)", id="budget")
        yield Static(id="budget-error")
        yield Static(id="compare-title")
        yield DataTable(id="best", cursor_type="row")
        yield Static(id="compare-footer")
        yield SeriesPlot("every completed run: R % vs clean test accuracy %", "test accuracy %", "", kind="scatter",
                         colors=METHOD_COLORS, ybounds=(0, 100), id="scatter")
        yield Footer()

    def on_mount(self) -> None:
        t = self.query_one("#best", DataTable)
        for key, label in [("method", "method"), ("params", "params"), ("acc", "acc %"), ("dacc", "Δacc"),
                           ("r", "R %"), ("dr", "ΔR"), ("seeds", "seeds"), ("steps", "steps ×"), ("time", "time ×"),
                           ("epochs", "best/epochs")]:
            t.add_column(label, key=key)
        if self.experiment:
            self.load(self.experiment)

    @on(Select.Changed, "#experiment")
    def changed(self, event: Select.Changed) -> None:
        if event.value is not Select.NULL and event.value != self.experiment:
            self.experiment = event.value
            self.setting = None
            self.load(event.value)

    @on(Select.Changed, "#setting")
    def setting_changed(self, event: Select.Changed) -> None:
        if event.value is not Select.NULL and event.value != self.setting and self._last is not None:
            self.setting = event.value
            self.show(self._last)

    @on(Input.Submitted, "#budget")
    def budget_changed(self, event: Input.Submitted) -> None:
        """A budget as `gaussreg table --budget` takes it (empty: none); a bad one is said
        in one sentence below the selectors and changes nothing."""
        text = event.value.strip()
        try:
            value = float(text) if text else None
        except ValueError:
            value = text
        problem = budget_problem(value, "the budget") if value is not None else None
        self.query_one("#budget-error", Static).update(Text(problem or "", style="red"))
        if problem is None and value != self.budget:
            self.budget = value
            if self.experiment:
                self.load(self.experiment)

    @staticmethod
    def _label(rec: dict) -> str:
        return " ".join(f"{k}={v}" for k, v in rec.get("setting", {}).items()) or f"{rec['dataset']} · {rec['model']}"

    def store_changed(self, experiments: set) -> None:
        """Runs changed in the store: follow them when they are this experiment's."""
        if self.experiment in experiments:
            self.load(self.experiment)

    @work(thread=True, exclusive=True, group="compare")
    def load(self, experiment: str) -> None:
        store = Store(self.app.store_root)
        table = report.fair_table(store, experiment, budget=self.budget)
        points = [{"id": r["id"], "method": r["spec"]["method"], "accuracy": r["result"]["test_accuracy"],
                   "robustness": r["result"]["robustness"]}
                  for r in reader.list_runs(store, experiment) if r["result"]]
        self.post_message(CompareReady(experiment, table, points))

    @on(CompareReady)
    def show(self, message: CompareReady) -> None:
        if message.experiment != self.experiment or message.table["budget"] != self.budget:
            return  # a load for the experiment or budget chosen before
        self._last = message
        t = self.query_one("#best", DataTable)
        t.clear()
        recs = message.table["experiments"]
        chooser = self.query_one("#setting", Select)
        chooser.display = len(recs) > 1
        if not recs:
            self.query_one("#compare-title", Static).update("no runs")
            return
        labels = [self._label(r) for r in recs]
        if labels != self._labels:
            self._labels = labels
            chooser.set_options([(Text(lab), lab) for lab in labels])  # this blanks the choice
        # the selector holds the user's choice (also one whose Changed is still on its way)
        if chooser.value in labels:
            self.setting = chooser.value
        elif self.setting not in labels:  # at first: the first setting with a baseline
            self.setting = labels[recs.index(next((r for r in recs if r["baseline"]), recs[0]))]
        if chooser.value != self.setting:
            chooser.value = self.setting
        rec = recs[labels.index(self.setting)]
        b = rec["baseline"]
        self.query_one("#compare-title", Static).update(Text(
            f"{rec['experiment']} · {rec['dataset']} · {rec['model']} · tolerance {rec['tolerance'] * 100:.2f}% · "
            + (f"budget {self.budget:g}× the baseline's time · " if self.budget is not None else "")
            + (f"baseline acc {pct(b['accuracy'])}%, R {pct(b['robustness'])}%" if b else "no completed baseline")))
        for e in rec["best"]:
            t.add_row(Text(e["method"], style=METHOD_COLORS.get(e["method"], "")), Text(describe_params(e)),
                      pct(e["accuracy"]), f"{e['d_accuracy'] * 100:+.2f}", pct(e["robustness"]),
                      f"{e['d_robustness'] * 100:+.2f}", str(e["seeds"]), *cost_cells(e), key=e["method"])
        ef = rec["equivalent_folds"]
        counts = ", ".join(f"{m} {c['eligible']}/{c['completed']}/{c['total']}" for m, c in rec["counts"].items())
        certs = ", ".join(f"{e['method']} " + "/".join(pct(v) for v in e["certified"]["accuracy"].values())
                          for e in rec["best"] if e.get("certified"))
        self.query_one("#compare-footer", Static).update(Text(
            (f"equivalent augmentation (the paper's Ñ = folds + 1): {ef['text']}\n" if ef else "")
            + f"runs eligible/completed/total: {counts}"
            + (f"\ncertified acc % at radius 0/0.25/0.5: {certs}" if certs else "")
            + "".join(f"\n{line}" for line in cost_lines(rec))))
        series: Dict[str, tuple] = {}
        ids = {i for c in rec["configurations"] for i in c["run_ids"]}  # this setting's completed runs
        for p in message.points:
            if p["id"] not in ids:
                continue
            xs, ys = series.setdefault(p["method"], ([], []))
            xs.append(p["accuracy"] * 100)
            ys.append(p["robustness"] * 100)
        # the tolerance band: eligible runs lie right of the red line
        vlines = [((b["accuracy"] - rec["tolerance"]) * 100, "red"), (b["accuracy"] * 100, "white")] if b else []
        self.query_one("#scatter", SeriesPlot).set_series(series, vlines)


class LaunchScreen(ModalScreen[Optional[Plan]]):
    """Pick a manifest and experiments, and the backend: local (GPUs, runs per GPU, parallel
    CPU runs) or Slurm (partition, time, GPUs per run; one sbatch array job, as `gaussreg run
    --backend slurm`). The request is checked by gaussreg (`launch.plan`) before the dialog
    closes, so a bad value is an error here, not a line in a log. Usable at 80x24."""
    BINDINGS = [Binding("escape", "dismiss_none", "cancel")]

    def __init__(self, manifest: str, store: str):
        super().__init__()
        self.manifest, self.store = manifest, store

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="launch"):
            yield Label("Launch experiments (detached: they keep training when the TUI quits)")
            with Horizontal(classes="row"):
                yield Input(self.manifest, placeholder="manifest.toml", id="manifest")
                yield Button("Load", id="load")
            yield Static(id="plan-error")
            yield SelectionList(id="experiments")
            with Horizontal(classes="row", id="local-row"):
                yield Label("GPUs")
                yield Input("auto", id="gpus", classes="short")
                yield Label("per GPU")
                yield Input("1", id="per-gpu", type="integer", classes="short")
                yield Label("CPU runs")
                yield Input("1", id="max-parallel", type="integer", classes="short")
            # shown instead of the local row when the backend is slurm; empty: the manifest's [slurm] value
            with Horizontal(classes="row", id="slurm-row"):
                yield Label("partition")
                yield Input(id="partition", placeholder="default")
                yield Label("time")
                yield Input(id="time", placeholder="04:00:00", classes="time")
                yield Label("GPUs/run")
                yield Input(id="gpus-per-run", placeholder="0", classes="short")
            with Horizontal(classes="row"):
                yield Label("backend")
                yield Select([("local", "local"), ("slurm", "slurm")], value="local", allow_blank=False,
                             id="backend")
                yield Button("Launch", id="launch", variant="success")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#slurm-row").display = False
        self.plan(self.manifest)

    @on(Select.Changed, "#backend")
    def backend_changed(self, event: Select.Changed) -> None:
        slurm = event.value == "slurm"
        self.query_one("#slurm-row").display = slurm
        self.query_one("#local-row").display = not slurm
        self.error("")

    @on(Button.Pressed, "#load")
    @on(Input.Submitted, "#manifest")
    def reload(self) -> None:
        self.plan(self.query_one("#manifest", Input).value)

    @work(thread=True, exclusive=True, group="plan")
    def plan(self, path: str) -> None:
        try:
            m = manifest.load(path)
        except manifest.ManifestError as e:
            self.post_message(PlanReady(path, [], str(e)))
            return
        exps = []
        for e in m.experiments:
            done = sum(1 for r in e.runs if RunDir(self.app.store_root / r.id).result_file.exists())
            exps.append({"name": e.name, "runs": len(e.runs), "completed": done})
        self.post_message(PlanReady(path, exps, slurm=m.slurm))

    @on(PlanReady)
    def show_plan(self, message: PlanReady) -> None:
        sel = self.query_one(SelectionList)
        sel.clear_options()
        self.query_one("#plan-error", Static).update(Text(message.error or "", style="red"))
        self.manifest = message.manifest
        table = message.slurm or {}  # what an empty Slurm field means: the manifest's value
        for field_id, key, default in (("partition", "partition", "default"), ("time", "time", "default"),
                                       ("gpus-per-run", "gpus_per_run", "0")):
            self.query_one(f"#{field_id}", Input).placeholder = str(table.get(key, default))
        for e in message.experiments:
            pending = e["runs"] - e["completed"]
            sel.add_option((Text(f"{e['name']}  ({pending} pending, {e['completed']} completed)"), e["name"],
                            pending > 0))

    def request(self) -> Optional[LaunchRequest]:
        """The request the fields describe, or None with the reason shown."""
        chosen = self.query_one(SelectionList).selected
        if not chosen:
            self.error("choose at least one experiment")
            return None
        if self.query_one("#backend", Select).value == "slurm":
            return self._slurm_request(tuple(chosen))
        numbers = {}
        for field_id, name in (("per-gpu", "runs per GPU"), ("max-parallel", "CPU runs")):
            text = self.query_one(f"#{field_id}", Input).value.strip() or "1"
            if not text.isdigit() or int(text) < 1:
                self.error(f"{name} must be a whole number ≥ 1, not {text!r}")
                return None
            numbers[field_id] = int(text)
        return LaunchRequest(self.manifest, str(self.store), tuple(chosen),
                             gpus=self.query_one("#gpus", Input).value.strip() or "auto",
                             per_gpu=numbers["per-gpu"], max_parallel=numbers["max-parallel"])

    def _slurm_request(self, chosen: tuple) -> Optional[LaunchRequest]:
        """A Slurm request: empty fields keep the manifest's [slurm] values; gaussreg.launch.slurm
        checks the rest (time format, ...) in launch.plan, whose message is shown here."""
        value = lambda field_id: self.query_one(f"#{field_id}", Input).value.strip() or None  # noqa: E731
        gpus = value("gpus-per-run")
        if gpus is not None and not gpus.isdigit():
            self.error(f"GPUs per run must be a whole number ≥ 0, not {gpus!r}")
            return None
        overrides = {"partition": value("partition"), "time": value("time"),
                     "gpus_per_run": int(gpus) if gpus is not None else None}
        return LaunchRequest(self.manifest, str(self.store), chosen, backend="slurm", slurm=overrides)

    def error(self, text: str) -> None:
        self.query_one("#plan-error", Static).update(Text(text, style="red"))

    @on(Button.Pressed, "#launch")
    def launch(self) -> None:
        req = self.request()
        if req is not None:
            self.check(req)

    @work(thread=True, exclusive=True, group="plan")
    def check(self, req: LaunchRequest) -> None:
        try:
            p = plan(req)
            if p.missing_data:
                raise LaunchError(next(iter(p.missing_data.values())))
        except LaunchError as e:
            self.app.call_from_thread(self.error, str(e))
            return
        self.app.call_from_thread(self.dismiss, p)  # the checked plan: launched as it is, not planned again

    @on(Button.Pressed, "#cancel")
    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class LaunchesScreen(ModalScreen[Optional[int]]):
    """The detached launches of this store that are still running; pick one to cancel."""
    BINDINGS = [Binding("escape", "dismiss_none", "close")]

    def __init__(self, launches: List[dict]):
        super().__init__()
        self.launches = launches

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Running launches: enter cancels one (after confirmation)" if self.launches
                        else "No running launches in this store (escape closes this).")
            yield OptionList(*[Text(f"pid {x['pid']}  {x['label']}  since {str(x.get('started_at'))[:19]}")
                               for x in self.launches],
                             id="launches")

    @on(OptionList.OptionSelected)
    def picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.launches[event.option_index]["pid"])

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
