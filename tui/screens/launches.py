"""The detached launches of the store, to cancel one."""

from __future__ import annotations

from typing import List, Optional

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList


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
