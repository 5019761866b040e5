"""The fair comparison of an experiment, as `gaussreg table` computes it."""

from __future__ import annotations

from typing import Dict, List, Optional

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Select, Static

from gaussreg.runs import reader
from gaussreg.runs.store import Store
from gaussreg.views import report
from gaussreg.views.report import budget_problem
from gaussreg.views.style import METHOD_STYLE

from ..messages import CompareReady
from ..widgets import SeriesPlot

METHOD_COLORS = METHOD_STYLE


class CompareScreen(Screen):
    """The comparison as `gaussreg table` shows it (report.comparison_text: means ± std, the
    two-standard-error check, the selection split, cost), and the scatter of every completed
    run; below COMPACT_BELOW rows one of the two at a time (p switches)."""
    BINDINGS = [Binding("escape,backspace", "app.pop_screen", "back"), Binding("p", "switch", "table/plot"),
                Binding("question_mark", "app.help", "help"), Binding("q", "app.quit", "quit")]
    COMPACT_BELOW = 34

    def __init__(self, experiments: List[str], experiment: Optional[str] = None):
        super().__init__()
        self.title = "compare"
        self.experiments = experiments
        self.experiment = experiment or (experiments[0] if experiments else None)
        self.setting: Optional[str] = None  # the comparison shown, by its label, when the experiment has several
        self.budget: Optional[float] = None  # as `gaussreg table --budget`: times the baseline's training time
        self._labels: List[str] = []
        self._last: Optional[CompareReady] = None
        self._header: List[str] = []  # the table's columns, as report.comparison_text names them
        self.plot_shown = False  # below COMPACT_BELOW rows: the plot instead of the table

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
        with VerticalScroll(id="compare-body"):
            yield Static(id="compare-title")
            yield DataTable(id="best", cursor_type="row")
            yield Static(id="compare-footer")
        yield SeriesPlot("every completed run: R % vs clean test accuracy %", "test accuracy %", "", kind="scatter",
                         colors=METHOD_COLORS, ybounds=(0, 100), id="scatter")
        yield Footer()

    def on_mount(self) -> None:
        if self.experiment:
            self.load(self.experiment)

    def on_resize(self) -> None:
        compact = self.size.height < self.COMPACT_BELOW
        body = self.query_one("#compare-body")
        body.display = not compact or not self.plot_shown
        body.styles.height = "1fr" if compact else "auto"
        body.styles.max_height = None if compact else "65%"  # the plot keeps the rest
        self.query_one("#scatter").display = not compact or self.plot_shown

    def action_switch(self) -> None:
        self.plot_shown = not self.plot_shown
        self.on_resize()

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
        title, header, rows, footer = report.comparison_text(rec)  # what `gaussreg table` shows, word for word
        self.query_one("#compare-title", Static).update(Text(title))
        if header != self._header:  # the certified columns come and go
            t.clear(columns=True)
            for h in header:
                t.add_column(h, key=h)
            self._header = header
        for e, r in zip(rec["best"], rows):  # method and params are data: Text, never markup
            t.add_row(Text(r[0], style=METHOD_COLORS.get(e["method"], "")), Text(r[1]), *r[2:], key=e["method"])
        self.query_one("#compare-footer", Static).update(Text("\n".join(footer)))
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
