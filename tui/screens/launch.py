"""The launch dialog: a manifest's experiments and where to train them, checked into a plan."""

from __future__ import annotations

from typing import Optional

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, SelectionList, Static

from gaussreg.launch.request import LaunchError, LaunchRequest, Plan, plan
from gaussreg.runs import manifest
from gaussreg.runs.store import RunDir

from ..messages import PlanReady


class LaunchScreen(ModalScreen[Optional[Plan]]):
    """Pick a manifest and experiments, and the backend: local (GPUs, runs per GPU, parallel
    CPU runs) or Slurm (partition, time, GPUs per run; one sbatch array job, as `gaussreg run
    --backend slurm`). The request is checked by gaussreg (`launch.plan`) before the dialog
    closes, so a bad value is an error here, not a line in a log. Usable at 80x24."""
    BINDINGS = [Binding("escape", "dismiss_none", "cancel")]

    def __init__(self, manifest: str, store: str):
        super().__init__()
        self.manifest, self.store = manifest, store

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="launch"):
            yield Label("Launch experiments (detached: they keep training when the TUI quits)")
            with Horizontal(classes="row"):
                yield Input(self.manifest, placeholder="manifest.toml", id="manifest")
                yield Button("Load", id="load")
            yield Static(id="plan-error")
            yield SelectionList(id="experiments")
            with Horizontal(classes="row", id="local-row"):
                yield Label("GPUs")
                yield Input("auto", id="gpus", classes="short")
                yield Label("per GPU")
                yield Input("1", id="per-gpu", type="integer", classes="short")
                yield Label("CPU runs")
                yield Input("1", id="max-parallel", type="integer", classes="short")
            # shown instead of the local row when the backend is slurm; empty: the manifest's [slurm] value
            with Horizontal(classes="row", id="slurm-row"):
                yield Label("partition")
                yield Input(id="partition", placeholder="default")
                yield Label("time")
                yield Input(id="time", placeholder="04:00:00", classes="time")
                yield Label("GPUs/run")
                yield Input(id="gpus-per-run", placeholder="0", classes="short")
            with Horizontal(classes="row"):
                yield Label("backend")
                yield Select([("local", "local"), ("slurm", "slurm")], value="local", allow_blank=False,
                             id="backend")
                yield Button("Launch", id="launch", variant="success")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#slurm-row").display = False
        self.plan(self.manifest)

    @on(Select.Changed, "#backend")
    def backend_changed(self, event: Select.Changed) -> None:
        slurm = event.value == "slurm"
        self.query_one("#slurm-row").display = slurm
        self.query_one("#local-row").display = not slurm
        self.error("")

    @on(Button.Pressed, "#load")
    @on(Input.Submitted, "#manifest")
    def reload(self) -> None:
        self.plan(self.query_one("#manifest", Input).value)

    @work(thread=True, exclusive=True, group="plan")
    def plan(self, path: str) -> None:
        try:
            m = manifest.load(path)
        except manifest.ManifestError as e:
            self.post_message(PlanReady(path, [], str(e)))
            return
        exps = []
        for e in m.experiments:
            done = sum(1 for r in e.runs if RunDir(self.app.store_root / r.id).result_file.exists())
            exps.append({"name": e.name, "runs": len(e.runs), "completed": done})
        self.post_message(PlanReady(path, exps, slurm=m.slurm))

    @on(PlanReady)
    def show_plan(self, message: PlanReady) -> None:
        sel = self.query_one(SelectionList)
        sel.clear_options()
        self.query_one("#plan-error", Static).update(Text(message.error or "", style="red"))
        self.manifest = message.manifest
        table = message.slurm or {}  # what an empty Slurm field means: the manifest's value
        for field_id, key, default in (("partition", "partition", "default"), ("time", "time", "default"),
                                       ("gpus-per-run", "gpus_per_run", "0")):
            self.query_one(f"#{field_id}", Input).placeholder = str(table.get(key, default))
        for e in message.experiments:
            pending = e["runs"] - e["completed"]
            sel.add_option((Text(f"{e['name']}  ({pending} pending, {e['completed']} completed)"), e["name"],
                            pending > 0))

    def request(self) -> Optional[LaunchRequest]:
        """The request the fields describe, or None with the reason shown."""
        chosen = self.query_one(SelectionList).selected
        if not chosen:
            self.error("choose at least one experiment")
            return None
        if self.query_one("#backend", Select).value == "slurm":
            return self._slurm_request(tuple(chosen))
        numbers = {}
        for field_id, name in (("per-gpu", "runs per GPU"), ("max-parallel", "CPU runs")):
            text = self.query_one(f"#{field_id}", Input).value.strip() or "1"
            # ASCII digits of sane length: int() of "٣" or of 5,000 digits must not surprise or crash;
            # launch.plan bounds the number by the machine's cores
            if not (text.isascii() and text.isdigit() and len(text) <= 9) or int(text) < 1:
                self.error(f"{name} must be a whole number ≥ 1, not {text!r}")
                return None
            numbers[field_id] = int(text)
        return LaunchRequest(self.manifest, str(self.store), tuple(chosen),
                             gpus=self.query_one("#gpus", Input).value.strip() or "auto",
                             per_gpu=numbers["per-gpu"], max_parallel=numbers["max-parallel"])

    def _slurm_request(self, chosen: tuple) -> Optional[LaunchRequest]:
        """A Slurm request: empty fields keep the manifest's [slurm] values; gaussreg.launch.slurm
        checks the rest (time format, ...) in launch.plan, whose message is shown here."""
        value = lambda field_id: self.query_one(f"#{field_id}", Input).value.strip() or None  # noqa: E731
        gpus = value("gpus-per-run")
        if gpus is not None and not gpus.isdigit():
            self.error(f"GPUs per run must be a whole number ≥ 0, not {gpus!r}")
            return None
        overrides = {"partition": value("partition"), "time": value("time"),
                     "gpus_per_run": int(gpus) if gpus is not None else None}
        return LaunchRequest(self.manifest, str(self.store), chosen, backend="slurm", slurm=overrides)

    def error(self, text: str) -> None:
        self.query_one("#plan-error", Static).update(Text(text, style="red"))

    @on(Button.Pressed, "#launch")
    def launch(self) -> None:
        req = self.request()
        if req is not None:  # the check can take seconds (nvidia-smi, a big grid): never silent
            self.query_one("#plan-error", Static).update(Text("checking the request (manifest, GPUs, data)…",
                                                              style="dim"))
            self.check(req)

    @work(thread=True, exclusive=True, group="plan")
    def check(self, req: LaunchRequest) -> None:
        try:
            p = plan(req)
            if p.missing_data:
                raise LaunchError(next(iter(p.missing_data.values())))
        except LaunchError as e:
            self.app.call_from_thread(self.error, str(e))
            return
        self.app.call_from_thread(self.dismiss, p)  # the checked plan: launched as it is, not planned again

    @on(Button.Pressed, "#cancel")
    def action_dismiss_none(self) -> None:
        self.dismiss(None)
