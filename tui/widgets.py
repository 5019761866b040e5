"""Widgets of the dashboard: the runs table, the summary bar, and series plots."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from rich.markup import escape
from rich.text import Text
from textual.widgets import DataTable, Static
from textual_plotext import PlotextPlot

from gaussreg.store import STATES

from .watcher import RunRow

STATE_STYLE = {"completed": "green", "failed": "bold red", "diverged": "magenta", "cancelled": "yellow",
               "interrupted": "dark_orange", "running": "bold cyan", "queued": "dim", "corrupt": "reverse red"}

# (key, label) of the runs table, in order
COLUMNS: List[Tuple[str, str]] = [
    ("method", "method"), ("params", "params"), ("state", "state"), ("epoch", "epoch"),
    ("best_val_acc", "val acc"), ("test_acc", "test acc"), ("robustness", "R"), ("duration", "time"),
    ("experiment", "experiment"), ("dataset", "dataset"), ("model", "model")]  # what matters first: 80 columns


def pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 100:.2f}"


def duration(s: Optional[float]) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def cells(row: RunRow) -> Dict[str, object]:
    return {
        # strings of a run's files are data: escaped, a '[' in them is not markup
        "experiment": escape(row.experiment), "dataset": escape(row.dataset), "model": escape(row.model),
        "method": escape(row.method), "params": escape(row.params), "state": Text(row.state, style=STATE_STYLE.get(row.state, "")),
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
    and the scroll position stay where the user left them."""

    def __init__(self, **kw):
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self.sorted_by: Optional[str] = None
        self.reverse = False
        self.shown: Dict[str, Dict[str, object]] = {}

    def on_mount(self) -> None:
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    def sync(self, rows: Iterable[RunRow], keep: Callable[[RunRow], bool]) -> None:
        """Bring the table up to date with changed rows."""
        added = False
        for row in rows:
            new = cells(row)
            old = self.shown.get(row.id)
            if not keep(row):
                if old is not None:
                    self.remove_row(row.id)
                    del self.shown[row.id]
                continue
            if old is None:
                self.add_row(*(new[k] for k, _ in COLUMNS), key=row.id)
                added = True
            else:
                for key, value in new.items():
                    if value != old[key]:
                        self.update_cell(row.id, key, value)
            self.shown[row.id] = new
        if added:
            if self.sorted_by:
                self.sort(self.sorted_by, key=sort_key, reverse=self.reverse)
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
        self.reverse = not self.reverse if self.sorted_by == column else False
        self.sorted_by = column
        self.sort(column, key=sort_key, reverse=self.reverse)

    @property
    def selected_id(self) -> Optional[str]:
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value


class SummaryBar(Static):
    def show(self, rows: Sequence[RunRow], shown: int) -> None:
        c = Counter(r.state for r in rows)
        parts = [Text(f"{len(rows)} runs ({shown} shown)  ")]
        for state in STATES + ("corrupt",):
            if c.get(state) or state in ("queued", "running", "completed", "failed"):
                parts.append(Text(f"{state} {c.get(state, 0)}  ", style=STATE_STYLE.get(state, "")))
        self.update(Text.assemble(*parts))


class SeriesPlot(PlotextPlot):
    """A plot whose data is kept as named series (x, y), so what is drawn can be read back."""

    def __init__(self, title: str, xlabel: str = "", ylabel: str = "", kind: str = "line", **kw):
        super().__init__(**kw)
        self.title, self.xlabel, self.ylabel, self.kind = title, xlabel, ylabel, kind
        self.series: Dict[str, Tuple[List[float], List[float]]] = {}
        self.vlines: List[Tuple[float, str]] = []

    def set_series(self, series: Dict[str, Tuple[List[float], List[float]]],
                   vlines: Sequence[Tuple[float, str]] = ()) -> None:
        if series == self.series and list(vlines) == self.vlines:
            return
        self.series, self.vlines = dict(series), list(vlines)
        self.redraw()

    def on_mount(self) -> None:
        self.redraw()

    def redraw(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(self.title)
        plt.xlabel(self.xlabel)
        plt.ylabel(self.ylabel)
        for name, (xs, ys) in self.series.items():
            if xs:
                (plt.scatter if self.kind == "scatter" else plt.plot)(xs, ys, label=name,
                                                                   marker="dot" if self.kind == "scatter" else "braille")
        for x, color in self.vlines:
            plt.vline(x, color)
        self.refresh()
