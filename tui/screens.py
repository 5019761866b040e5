"""Screens of the dashboard: runs, run detail, compare, launch, and small modals."""

from __future__ import annotations

import threading
from typing import Dict, List, Optional

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import (Button, DataTable, Footer, Header, Input, Label, Log, OptionList, Select,
                             SelectionList, Static)

from gaussreg.spec import describe_params
from gaussreg.store import STATES, RunDir

from .messages import CompareReady, DetailChanged, PlanReady
from .watcher import RunTail
from .widgets import STATE_STYLE, RunsTable, SeriesPlot, SummaryBar, pct

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


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "close")]
    TEXT = """gaussreg tui: launch, watch, compare and browse runs

Runs screen
  enter     open the run's detail (curves, robustness, spec, status, log)
  /         filter by text (any column); the state selector filters by state
  s         sort by the column under the cursor (again: reverse); clicking a header sorts too
  c         compare: the fair-comparison table and accuracy vs robustness
  l         launch experiments of a manifest (detached: runs go on when the TUI quits)
  x         cancel the selected run      r   rerun the selected failed/cancelled run
  X         cancel a whole launch
  ?         this help         ctrl+p   command palette        q   quit

Detail and compare screens: escape goes back.
States: queued, running, completed, failed, cancelled, diverged; a run whose worker
died without a word (stale heartbeat, pid gone) shows as interrupted."""

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.TEXT, id="help-text")
            yield Label("escape to close", classes="dim")


class RunsScreen(Screen):
    AUTO_FOCUS = "#runs"
    BINDINGS = [
        Binding("enter", "open", "detail", show=False),
        Binding("slash", "focus_filter", "filter"),
        Binding("s", "sort", "sort"),
        Binding("c", "app.compare", "compare"),
        Binding("l", "app.launch", "launch"),
        Binding("x", "cancel_run", "cancel run"),
        Binding("r", "rerun", "rerun"),
        Binding("X", "app.cancel_launch", "cancel launch", show=False),
        Binding("question_mark", "app.help", "help"),
        Binding("q", "app.quit", "quit"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="filters"):
            yield Input(placeholder="filter: experiment, method, params, state…", id="filter")
            yield Select([(s, s) for s in STATES + ("corrupt",)], prompt="any state", id="state")
        yield SummaryBar(id="summary")
        yield RunsTable(id="runs")
        yield Footer()

    @property
    def table(self) -> RunsTable:
        return self.query_one(RunsTable)

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

    def action_focus_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_sort(self) -> None:
        if self.table.row_count:
            col = self.table.ordered_columns[self.table.cursor_column].key.value
            self.table.sort_by(col)

    def action_cancel_run(self) -> None:
        if self.table.selected_id:
            self.app.confirm_cancel_run(self.table.selected_id)

    def action_rerun(self) -> None:
        if self.table.selected_id:
            self.app.confirm_rerun(self.table.selected_id)


class RunDetailScreen(Screen):
    BINDINGS = [Binding("escape,backspace", "app.pop_screen", "back"),
                Binding("x", "cancel_run", "cancel run"), Binding("r", "rerun", "rerun"),
                Binding("question_mark", "app.help", "help"), Binding("q", "app.quit", "quit")]

    def __init__(self, run_id: str):
        super().__init__()
        self.run_id = run_id
        self.title = run_id
        self._stop = threading.Event()

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="plots"):
                yield SeriesPlot("loss per epoch", "epoch", "loss", id="loss")
                yield SeriesPlot("validation accuracy per epoch", "epoch", "accuracy", id="acc")
                yield SeriesPlot("robustness vs test sigma", "sigma", "fraction", id="robust")
            with Vertical(id="side"):
                yield Static(id="status")
                with VerticalScroll(id="spec-box"):
                    yield Static(id="spec")
                yield Log(id="log", max_lines=200)
        yield Footer()

    def on_mount(self) -> None:
        self.follow()

    def on_unmount(self) -> None:
        self._stop.set()

    @work(thread=True, exclusive=True, group="detail")
    def follow(self) -> None:
        tail = RunTail(RunDir(self.app.store_root / self.run_id))
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
            "validation": (ep, [e["val_accuracy"] for e in d.epochs])})
        test = d.result or d.test
        if test and test.get("sigmas"):
            series = {"consistency": (test["sigmas"], test["per_sigma"])}
            if test.get("accuracy_per_sigma"):
                series["accuracy"] = (test["sigmas"], test["accuracy_per_sigma"])
            self.query_one("#robust", SeriesPlot).set_series(series)
        st = d.status
        state = st.get("state", "?")
        lines = [Text.assemble("state ", (state, STATE_STYLE.get(state, "")),
                               f"   epoch {st.get('epoch', 0)}/{st.get('max_epochs') or '?'}   device {st.get('device')}")]
        if d.epochs:
            e = d.epochs[-1]
            lines.append(Text(f"last epoch: train {e['train_loss']:.4f}  val {e['val_loss']:.4f}  "
                              f"val acc {pct(e['val_accuracy'])}%  {e['images_per_s']:.0f} img/s"))
        if d.result:
            lines.append(Text(f"test acc {pct(d.result['test_accuracy'])}%   R {pct(d.result['robustness'])}%   "
                              f"best epoch {d.result.get('best_epoch', '?')}/{d.result.get('epochs_run', '?')}",
                              style="bold"))
        if st.get("error"):
            lines.append(Text(f"error: {st['error']}", style="red"))
        self.query_one("#status", Static).update(Text("\n").join(lines))
        if d.spec:
            s = d.spec
            rob = s.get("robustness") or {}
            self.query_one("#spec", Static).update(Text(
                f"{s.get('experiment', '')} · {s['dataset']} · {s['model']} · {s['method']} {describe_params(s)}\n"
                f"seed {s.get('seed', 0)}  max epochs {s['max_epochs']}  batch {s.get('batch_size', '?')}  "
                f"optimizer {s.get('optimizer', '?')}\nrobustness {len(rob.get('sigmas', []))} sigmas, "
                f"{rob.get('samples', 1)} sample(s)"))
        log = self.query_one(Log)
        log.clear()
        log.write(d.log_tail)

    def action_cancel_run(self) -> None:
        self.app.confirm_cancel_run(self.run_id)

    def action_rerun(self) -> None:
        self.app.confirm_rerun(self.run_id)


class CompareScreen(Screen):
    BINDINGS = [Binding("escape,backspace", "app.pop_screen", "back"), Binding("question_mark", "app.help", "help"),
                Binding("q", "app.quit", "quit")]

    def __init__(self, experiments: List[str], experiment: Optional[str] = None):
        super().__init__()
        self.title = "compare"
        self.experiments = experiments
        self.experiment = experiment or (experiments[0] if experiments else None)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Select([(Text(e), e) for e in self.experiments], value=self.experiment or Select.NULL,
                     prompt="experiment", id="experiment", allow_blank=not self.experiments)
        yield Static(id="compare-title")
        yield DataTable(id="best", cursor_type="row")
        yield Static(id="compare-footer")
        yield SeriesPlot("clean accuracy vs robustness (every completed run)", "test accuracy", "R", kind="scatter",
                         id="scatter")
        yield Footer()

    def on_mount(self) -> None:
        t = self.query_one("#best", DataTable)
        for key, label in [("method", "method"), ("params", "params"), ("acc", "acc %"), ("dacc", "Δacc"),
                           ("r", "R %"), ("dr", "ΔR"), ("seeds", "seeds")]:
            t.add_column(label, key=key)
        if self.experiment:
            self.load(self.experiment)

    @on(Select.Changed, "#experiment")
    def changed(self, event: Select.Changed) -> None:
        if event.value is not Select.NULL and event.value != self.experiment:
            self.experiment = event.value
            self.load(event.value)

    @work(thread=True, exclusive=True, group="compare")
    def load(self, experiment: str) -> None:
        from gaussreg import report
        from gaussreg.store import Store
        store = Store(self.app.store_root)
        table = report.fair_table(store, experiment)
        points = [{"method": r["spec"]["method"], "accuracy": r["result"]["test_accuracy"],
                   "robustness": r["result"]["robustness"]}
                  for r in report.collect(store, experiment) if r["result"]]
        self.post_message(CompareReady(experiment, table, points))

    @on(CompareReady)
    def show(self, message: CompareReady) -> None:
        t = self.query_one("#best", DataTable)
        t.clear()
        recs = message.table["experiments"]
        if not recs:
            self.query_one("#compare-title", Static).update("no runs")
            return
        rec = recs[0]
        b = rec["baseline"]
        self.query_one("#compare-title", Static).update(Text(
            f"{rec['experiment']} · {rec['dataset']} · {rec['model']} · tolerance {rec['tolerance'] * 100:.2f}% · "
            + (f"baseline acc {pct(b['accuracy'])}%, R {pct(b['robustness'])}%" if b else "no completed baseline")))
        for e in rec["best"]:
            t.add_row(Text(e["method"], style=METHOD_COLORS.get(e["method"], "")), Text(describe_params(e)),
                      pct(e["accuracy"]), f"{e['d_accuracy'] * 100:+.2f}", pct(e["robustness"]),
                      f"{e['d_robustness'] * 100:+.2f}", str(e["seeds"]), key=e["method"])
        ef = rec["equivalent_folds"]
        counts = ", ".join(f"{m} {c['eligible']}/{c['completed']}/{c['total']}" for m, c in rec["counts"].items())
        self.query_one("#compare-footer", Static).update(Text(
            (f"equivalent folds of augmentation: {ef['text']}\n" if ef else "")
            + f"runs eligible/completed/total: {counts}"))
        series: Dict[str, tuple] = {}
        for p in message.points:
            xs, ys = series.setdefault(p["method"], ([], []))
            xs.append(p["accuracy"])
            ys.append(p["robustness"])
        vlines = [(b["accuracy"] - rec["tolerance"], "red"), (b["accuracy"], "white")] if b else []
        self.query_one("#scatter", SeriesPlot).set_series(series, vlines)


class LaunchScreen(ModalScreen[Optional[dict]]):
    """Pick a manifest and experiments, GPUs and runs per GPU; returns the launch request."""
    BINDINGS = [Binding("escape", "dismiss_none", "cancel")]

    def __init__(self, manifest: str):
        super().__init__()
        self.manifest = manifest

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Launch experiments (detached: they keep training when the TUI quits)")
            with Horizontal(classes="row"):
                yield Input(self.manifest, placeholder="manifest.toml", id="manifest")
                yield Button("Load", id="load")
            yield Static(id="plan-error")
            yield SelectionList(id="experiments")
            with Horizontal(classes="row"):
                yield Label("GPUs")
                yield Input("all", id="gpus")
                yield Label("runs per GPU")
                yield Input("1", id="per-gpu", type="integer")
            with Horizontal(classes="row"):
                yield Button("Launch", id="launch", variant="success")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.plan(self.manifest)

    @on(Button.Pressed, "#load")
    @on(Input.Submitted, "#manifest")
    def reload(self) -> None:
        self.plan(self.query_one("#manifest", Input).value)

    @work(thread=True, exclusive=True, group="plan")
    def plan(self, path: str) -> None:
        from gaussreg import manifest
        try:
            m = manifest.load(path)
        except manifest.ManifestError as e:
            self.post_message(PlanReady(path, [], str(e)))
            return
        exps = []
        for e in m.experiments:
            done = sum(1 for r in e.runs if RunDir(self.app.store_root / r.id).file("result.json").exists())
            exps.append({"name": e.name, "runs": len(e.runs), "completed": done})
        self.post_message(PlanReady(path, exps))

    @on(PlanReady)
    def show_plan(self, message: PlanReady) -> None:
        sel = self.query_one(SelectionList)
        sel.clear_options()
        self.query_one("#plan-error", Static).update(Text(message.error or "", style="red"))
        self.manifest = message.manifest
        for e in message.experiments:
            pending = e["runs"] - e["completed"]
            sel.add_option((Text(f"{e['name']}  ({pending} pending, {e['completed']} completed)"), e["name"],
                            pending > 0))

    @on(Button.Pressed, "#launch")
    def launch(self) -> None:
        chosen = self.query_one(SelectionList).selected
        per_gpu = self.query_one("#per-gpu", Input).value or "1"
        if not chosen:
            self.query_one("#plan-error", Static).update(Text("choose at least one experiment", style="red"))
            return
        self.dismiss({"manifest": self.manifest, "experiments": list(chosen),
                      "gpus": self.query_one("#gpus", Input).value.strip() or "all", "per_gpu": per_gpu})

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
                        else "No running launches in this store.")
            yield OptionList(*[Text(f"pid {x['pid']}  {x['label']}  since {str(x.get('started_at'))[:19]}")
                               for x in self.launches],
                             id="launches")

    @on(OptionList.OptionSelected)
    def picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.launches[event.option_index]["pid"])

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
