"""The README's name `gaussreg.report`: the fair table is `gaussreg.views.report` and the
reader of a run's rows (RunReader) `gaussreg.runs.reader`, since the package was split into layers."""
from gaussreg.runs.reader import RunReader, RunRow, list_runs  # noqa: F401
from gaussreg.views.report import *  # noqa: F401,F403
