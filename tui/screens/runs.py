"""The runs of the store: the table, the filter and the summary."""

from __future__ import annotations

from typing import Optional

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Select

from gaussreg.runs.store import STATES

from ..widgets import RunsTable, SummaryBar
from .detail import RunDetailScreen
from .overlay import OverlayScreen
from .sort import SortScreen


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
        Binding("d,delete", "remove_run", "remove", show=False),  # in the help: the footer is full at 80 columns
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

    def action_remove_run(self) -> None:
        if self.table.selected_id:
            self.app.confirm_remove_run(self.table.selected_id)

    def action_rerun(self) -> None:
        if self.table.selected_id:
            self.app.confirm_rerun(self.table.selected_id)
