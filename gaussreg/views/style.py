"""The colours every view gives a run's state (the CLI's tables, the live views, the TUI)."""

STATE_STYLE = {"completed": "green", "failed": "bold red", "diverged": "magenta", "cancelled": "yellow",
               "interrupted": "dark_orange", "running": "bold cyan", "queued": "dim", "elsewhere": "dim",
               "skipped": "dim", "corrupt": "reverse red"}
