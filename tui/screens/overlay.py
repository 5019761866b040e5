"""The curves of several marked runs, overlaid."""

from __future__ import annotations

from typing import List

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from rich.columns import Columns
from rich.text import Text
from textual.widgets import Footer, Header, Static

from gaussreg.runs.store import short_id

from ..messages import OverlayReady
from ..watcher import overlay_series
from ..widgets import RICH_COLOR, SERIES_COLORS, SeriesPlot


class OverlayScreen(Screen):
    """The curves of several runs on shared axes, one colour per run (what W&B and TensorBoard
    users do first): loss, validation accuracy, and consistency and accuracy under noise; one
    legend above them names each run's colour, short id, method and parameters."""
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
        self.run_colors = colors
        yield Header()
        yield Static(id="overlay-legend")
        with Vertical(id="overlay"):
            for row in (self.PLOTS[:2], self.PLOTS[2:]):
                with Horizontal():
                    for key, title, x, integer in row:
                        yield SeriesPlot(title, x, "", integer_x=integer, colors=colors, show_legend=False,
                                         ybounds=None if key == "loss" else (0, 100), id=f"overlay-{key}")
        yield Footer()

    def on_mount(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, group="overlay")
    def load(self) -> None:
        self.post_message(OverlayReady(*overlay_series(self.app.store_root, self.run_ids)))

    @on(OverlayReady)
    def show(self, message: OverlayReady) -> None:
        parts = []
        for name, label in message.labels.items():  # the runs' order; a run's words stay on one line
            color = self.run_colors[name]
            parts.append(Text(f"● {name} {label}", style=RICH_COLOR.get(color, color)))
        self.query_one("#overlay-legend", Static).update(Columns(parts, padding=(0, 2)))
        for key, _, _, _ in self.PLOTS:
            self.query_one(f"#overlay-{key}", SeriesPlot).set_series(message.series[key])
