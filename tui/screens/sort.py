"""Choose the runs table's sort column."""

from __future__ import annotations

from typing import Optional

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList

from ..widgets import COLUMNS


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
