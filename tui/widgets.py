"""Widgets of the dashboard: the runs table, the summary bar, and series plots."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from rich.markup import escape
from rich.text import Text
from textual.widgets import DataTable, Static
from textual_plotext import PlotextPlot

from gaussreg.launch.slurm import fatal
from gaussreg.runs.reader import duration
from gaussreg.runs.store import STATES, short_id, strip_control
from gaussreg.views.style import STATE_STYLE

from .watcher import RunRow

# (key, label) of the runs table, in order: what tells runs apart and their results first, so
# an 80-column screen shows up to R (the experiment, often one value for every row, comes after)
COLUMNS: List[Tuple[str, str]] = [
    ("id", "id"), ("method", "method"), ("params", "params"), ("seed", "seed"), ("state", "state"),
    ("test_acc", "test acc"), ("robustness", "R"), ("epoch", "epochs"), ("best_val_acc", "val acc"),
    ("duration", "time"), ("experiment", "experiment"), ("dataset", "dataset"), ("model", "model")]
DEFAULT_ORDER = ("experiment", "method", "params", "seed")  # until the user sorts
# a running run's phase in the state cell, short: the columns right of it stay on an 80-column screen
PHASE_SHORT = {"validating": "val", "evaluating R": "eval R", "certifying": "certify"}


def pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 100:.2f}"


def _data(text: str) -> str:
    return escape(strip_control(text))


def cells(row: RunRow) -> Dict[str, object]:
    return {
        "id": short_id(row.id), "seed": "-" if row.seed is None else str(row.seed),
        # strings of a run's files are data: escaped (a '[' in them is not markup), without control sequences
        "experiment": _data(row.experiment), "dataset": _data(row.dataset), "model": _data(row.model),
        "method": _data(row.method), "params": _data(row.params),
        "state": Text(row.state, style=STATE_STYLE.get(row.state, ""))
        # a running run says what it does when that is not training (the quiet phases)
        + (Text(f" {PHASE_SHORT.get(row.phase, row.phase)}", style="cyan")
           if row.phase and row.phase != "training" else "")
        + (Text(f" {row.slurm_job}", style="dim") if row.slurm_job else "")  # Slurm runs: their array task
        + (Text(f" ({row.slurm_reason})", style="bold red" if fatal(row.slurm_reason) or row.slurm_reason == "not in squeue"
                                                     else "yellow")
           if row.slurm_reason else "")  # and why Slurm has not started it
        + (Text(" (not launched)", style="yellow") if row.not_launched else ""),  # its launch ended: none will
        "epoch": f"{row.epoch}/{row.max_epochs}" if row.max_epochs else str(row.epoch),
        "best_val_acc": pct(row.best_val_acc), "test_acc": pct(row.test_acc), "robustness": pct(row.robustness),
        "duration": duration(row.duration)}


def sort_key(value) -> tuple:
    """Numbers sort as numbers, '-' last, text as text."""
    s = value.plain if isinstance(value, Text) else str(value)
    head = s.split("/")[0]
    try:
        return (0, float(head), s)
    except ValueError:
        return (2, 0.0, s) if s == "-" else (1, 0.0, s)


class RunsTable(DataTable):
    """Every run of the store; rows are updated in place (update_cell), so the cursor
    and the scroll position stay where the user left them, and the selected run stays
    selected when rows are added or sorted."""

    def __init__(self, **kw):
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self.sorted_by: Optional[str] = None  # None: DEFAULT_ORDER
        self.reverse = False
        self.shown: Dict[str, Dict[str, object]] = {}
        self.marked: List[str] = []  # runs marked (space) for the overlay, in marking order

    def toggle_mark(self) -> None:
        rid = self.selected_id
        if rid is None:
            return
        if rid in self.marked:
            self.marked.remove(rid)
        else:
            self.marked.append(rid)
        self.update_cell(rid, "id", self._id_cell(rid), update_width=True)

    def _id_cell(self, rid: str) -> Text:
        return Text(("● " if rid in self.marked else "") + short_id(rid), style="bold" if rid in self.marked else "")

    def on_mount(self) -> None:
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    def sync(self, rows: Iterable[RunRow], keep: Callable[[RunRow], bool]) -> None:
        """Bring the table up to date with changed rows."""
        was_empty = not self.shown  # nothing was selected by anyone yet: start at the top
        added = False
        for row in rows:
            new = cells(row)
            old = self.shown.get(row.id)
            if not keep(row):
                if old is not None:
                    self.remove_row(row.id)
                    del self.shown[row.id]
                continue
            if row.id in self.marked:
                new["id"] = self._id_cell(row.id)
            if old is None:
                self.add_row(*(new[k] for k, _ in COLUMNS), key=row.id)
                added = True
            else:
                for key, value in new.items():
                    if value != old[key]:  # a value can be wider than its column was: never cut it
                        self.update_cell(row.id, key, value, update_width=True)
            self.shown[row.id] = new
        if added:
            self._order(keep_selected=not was_empty)
            # new rows can widen columns; once the new widths are in, redraw the header
            # and the rows that were drawn with the old ones
            self.call_after_refresh(self._redraw)

    def _redraw(self) -> None:
        self._clear_caches()
        self.refresh()

    def rebuild(self, rows: Iterable[RunRow], keep: Callable[[RunRow], bool]) -> None:
        """After the filter changed: the only time rows are cleared."""
        self.clear()
        self.shown = {}
        self.sync(rows, keep)

    def sort_by(self, column: str) -> None:
        """Sort by a column; the same column again reverses."""
        self.reverse = not self.reverse if self.sorted_by == column else False
        self.sorted_by = column
        self._order()

    def _order(self, keep_selected: bool = True) -> None:
        selected = self.selected_id if keep_selected else None
        columns = (self.sorted_by,) if self.sorted_by else DEFAULT_ORDER
        self.sort(*columns, key=lambda v: tuple(map(sort_key, v)) if len(columns) > 1 else sort_key(v),
                  reverse=self.reverse)
        if selected is not None and selected in self.shown:
            self.move_cursor(row=self.get_row_index(selected), animate=False)

    @property
    def selected_id(self) -> Optional[str]:
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value


class SummaryBar(Static):
    def show(self, rows: Sequence[RunRow], shown: int) -> None:
        c = Counter(r.state for r in rows)
        parts = [Text(f"{len(rows)} run{'' if len(rows) == 1 else 's'} ({shown} shown)  ")]
        for state in STATES + ("corrupt",):
            if c.get(state) or state in ("queued", "running", "completed", "failed"):
                parts.append(Text(f"{state} {c.get(state, 0)}  ", style=STATE_STYLE.get(state, "")))
        self.update(Text.assemble(*parts))


SERIES_COLORS = ("cyan", "orange", "magenta", "green", "red", "yellow", "blue", "white")
RICH_COLOR = {"orange": "dark_orange"}  # plotext's name -> Rich's name for the same colour


class SeriesPlot(PlotextPlot):
    """A plot whose data is kept as named series (x, y), so what is drawn can be read back.
    The legend is the border title (coloured names), never drawn over the data; `integer_x`
    puts ticks on whole numbers only (epochs); the y range hugs the data (a robustness of
    99.8-100 % is shown as such, not flattened against 0-100)."""

    DEFAULT_CSS = "SeriesPlot { border: round $panel; border-title-align: left; }"

    def __init__(self, title: str, xlabel: str = "", ylabel: str = "", kind: str = "line",
                 integer_x: bool = False, colors: Optional[Dict[str, str]] = None,
                 ybounds: Optional[Tuple[float, float]] = None, **kw):
        super().__init__(**kw)
        self.title, self.xlabel, self.ylabel, self.kind = title, xlabel, ylabel, kind
        self.integer_x, self.series_colors = integer_x, dict(colors or {})
        self.ybounds = ybounds  # e.g. (0, 100) for percentages: the padding never passes them
        self.series: Dict[str, Tuple[List[float], List[float]]] = {}
        self.vlines: List[Tuple[float, str]] = []

    def color(self, name: str) -> str:
        if name not in self.series_colors:
            self.series_colors[name] = SERIES_COLORS[len(self.series_colors) % len(SERIES_COLORS)]
        return self.series_colors[name]

    def set_series(self, series: Dict[str, Tuple[List[float], List[float]]],
                   vlines: Sequence[Tuple[float, str]] = ()) -> None:
        if series == self.series and list(vlines) == self.vlines:
            return
        self.series, self.vlines = dict(series), list(vlines)
        self.redraw()

    def on_mount(self) -> None:
        self.redraw()

    def legend(self) -> Text:
        parts: List[object] = [self.title]
        for name, (xs, _) in self.series.items():
            if xs:
                color = self.color(name)
                parts += ["  ", ("● " + name, RICH_COLOR.get(color, color))]
        return Text.assemble(*parts)

    def redraw(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.xlabel(self.xlabel)
        plt.ylabel(self.ylabel)
        self.border_title = self.legend()
        xs_all, ys_all = [], []
        for name, (xs, ys) in self.series.items():
            if xs:
                xs_all += list(xs)
                ys_all += list(ys)
                (plt.scatter if self.kind == "scatter" else plt.plot)(
                    xs, ys, color=self.color(name), marker="dot" if self.kind == "scatter" else "braille")
        for x, color in self.vlines:
            plt.vline(x, color)
        if ys_all:
            lo, hi = min(ys_all), max(ys_all)
            pad = (hi - lo) * 0.05 or max(abs(hi) * 0.001, 1e-3)
            lo, hi = lo - pad, hi + pad
            if self.ybounds:
                lo, hi = max(lo, self.ybounds[0]), min(hi, self.ybounds[1])
            plt.ylim(lo, hi)
        if self.integer_x and xs_all:
            lo, hi = int(min(xs_all)), int(max(xs_all))
            step = max(1, (hi - lo) // 6 + (1 if (hi - lo) % 6 else 0))
            plt.xticks(list(range(lo, hi + 1, step)))
        self.refresh()
