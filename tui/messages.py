"""Messages from the reader threads to the widgets: the UI thread never reads files."""

from __future__ import annotations

from typing import List, Optional

from textual.message import Message

from .watcher import Detail, RunRow


class RunsChanged(Message):
    def __init__(self, rows: List[RunRow], first: bool = False, removed: Optional[List[str]] = None):
        super().__init__()
        self.rows, self.first, self.removed = rows, first, list(removed or [])


class DetailChanged(Message):
    def __init__(self, detail: Detail):
        super().__init__()
        self.detail = detail


class CompareReady(Message):
    def __init__(self, experiment: str, table: dict, points: List[dict]):
        super().__init__()
        self.experiment, self.table, self.points = experiment, table, points


class PlanReady(Message):
    def __init__(self, manifest: str, experiments: List[dict], error: Optional[str] = None,
                 slurm: Optional[dict] = None):
        super().__init__()
        self.manifest, self.experiments, self.error = manifest, experiments, error
        self.slurm = slurm  # the manifest's [slurm] table


class OverlayReady(Message):
    def __init__(self, series: dict, labels: dict):
        super().__init__()
        self.series = series  # plot key -> {short run id: (xs, ys)}
        self.labels = labels  # short run id -> its method and parameters
