"""The keys of every screen."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static


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
  d       remove the selected run and its files, asking (gaussreg rm)
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
