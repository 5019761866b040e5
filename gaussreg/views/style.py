"""How the views print: the colours every view gives a run's state (the CLI's tables, the
live views, the TUI), and a console that never passes a store's control sequences on."""

from rich.console import Console
from rich.segment import Segment
from rich.text import Text

from gaussreg.runs.store import has_control, strip_control

STATE_STYLE = {"completed": "green", "failed": "bold red", "diverged": "magenta", "cancelled": "yellow",
               "interrupted": "dark_orange", "running": "bold cyan", "queued": "dim", "elsewhere": "dim",
               "skipped": "dim", "corrupt": "reverse red"}


class CleanConsole(Console):
    """A Rich console that strips terminal control sequences from the text it prints: run
    ids, spec values, errors and logs come from a store others write, and must not move
    the cursor, retitle the terminal or clear it. Its own styles still colour the output
    (they are the segments' styles, not their text). Into a pipe or a log (not a terminal)
    text is printed as lines as long as they are (soft wrap), never broken at 80 columns in
    the middle of a phrase or a path; tables still get their layout (cli.print_whole)."""

    def print(self, *objects, soft_wrap=None, **kw):
        if soft_wrap is None and not self.is_terminal and all(isinstance(o, (str, Text)) for o in objects):
            soft_wrap = True
        super().print(*objects, soft_wrap=soft_wrap, **kw)

    def render(self, renderable, options=None):
        for seg in super().render(renderable, options):
            if seg.control is None and has_control(seg.text):
                yield Segment(strip_control(seg.text), seg.style)
            else:
                yield seg
