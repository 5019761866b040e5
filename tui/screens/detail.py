"""One run: its spec, status, curves and log tail, live."""

from __future__ import annotations

import threading

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, RichLog, Static

from gaussreg.runs.reader import duration, training_time
from gaussreg.runs.spec import describe_params
from gaussreg.runs.store import RunDir, has_control, phase_of, strip_control
from gaussreg.views.style import STATE_STYLE

from ..messages import DetailChanged
from ..watcher import RunDetailWatcher
from ..widgets import SeriesPlot, pct


def _grid(pairs) -> Table:
    """Label/value lines that wrap within the side panel instead of running off it."""
    g = Table.grid(padding=(0, 1))
    g.add_column(style="dim", no_wrap=True)
    g.add_column(overflow="fold")
    for k, v in pairs:  # values are data (run files): Text, never markup
        v = v if isinstance(v, Text) else Text(str(v))
        g.add_row(k, Text(strip_control(v.plain), style=v.style) if has_control(v.plain) else v)
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
        spent = training_time(st, state)  # in all: a resumed run's earlier epochs included
        if spent is not None:
            epochs += f"; {duration(spent)} in all"
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
