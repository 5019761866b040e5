"""The `gaussreg` command line."""

from __future__ import annotations

import errno
import json
import math
import os
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from gaussreg import __version__
from gaussreg.data import datasets, download
from gaussreg.data import loading as data
from gaussreg.launch import slurm
from gaussreg.launch.control import GRACE_S, ControlError, cancel_run
from gaussreg.launch.gpus import GpuPlaceError, take_gpu_place, wants_gpu
from gaussreg.launch.request import LaunchError, LaunchRequest, Plan, launch, plan, submit_slurm, write_experiments
from gaussreg.launch.scheduler import Scheduler
from gaussreg.runs import manifest as mf
from gaussreg.runs import reader
from gaussreg.runs.device import autocast
from gaussreg.runs.spec import MAX_SAMPLES, SpecError, default_certify_sigma, describe_params, resolve, valid_device
from gaussreg.runs.store import FINISHED, STATES, RunDir, RunFileError, Store, check_locking, strip_control
from gaussreg.science.robustness import certify_batch, robustness
from gaussreg.views import export as ex
from gaussreg.views import plot as plots
from gaussreg.views import report, slurm_view
from gaussreg.views.export import read_runs
from gaussreg.views.live_view import LiveView
from gaussreg.views.style import STATE_STYLE, CleanConsole

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Train networks robust to Gaussian input noise and compare them fairly.")
data_app = typer.Typer(no_args_is_help=True, help="List and fetch datasets.")
app.add_typer(data_app, name="data")
# every output of a command goes through these: they strip what the store holds of control sequences
console = CleanConsole()
err_console = CleanConsole(stderr=True)

EXIT_BAD_INPUT = 2
BIG_GRID = 1000  # a grid larger than this is more likely a typo than a plan: ask for --yes
COUNT_MAX = 2**31 - 1  # counts (runs, draws, images, CPUs): far beyond any real one, within what C code takes
SEED_MAX = 2**63 - 1  # torch and numpy take seeds of 64 bits


def int_flag(hi: int, lo: Optional[int] = None):
    """A callback range-checking an integer flag as it is parsed: a number past 64 bits
    (or past what the flag can mean) is one sentence, not an OverflowError later. The
    lower bounds the commands check themselves, with their own words, are left to them."""
    def check(param: typer.CallbackParam, value):
        if value is not None and (value > hi or (lo is not None and value < lo)):
            fail(f"{param.opts[0]} must be {'at most' if lo is None else f'from {lo} to'} {hi}, not {value}")
        return value
    return check


COUNT, SEED = int_flag(COUNT_MAX), int_flag(SEED_MAX, 0)
def a_path(what: str):
    """The parser of a path flag or argument: an empty one is refused (Path('') is the current
    folder, which the user did not name: `--store ''` must not make a store of wherever they are)."""
    def parse(value) -> Path:
        if isinstance(value, Path):  # the default
            return value
        if value == "":
            fail(f"{what} is an empty path; name a file or folder ('.' for the current folder)")
        return Path(value)
    return parse


StoreOpt = typer.Option(Path("runs"), "--store", parser=a_path("--store"), metavar="PATH", help="The run store folder.")
ManifestArg = typer.Argument(Path("experiments.toml"), parser=a_path("MANIFEST"), metavar="MANIFEST",
                             help="The experiment manifest (TOML).")
GpusPerRunOpt = typer.Option(None, "--gpus-per-run", callback=COUNT, help="Slurm: GPUs per run (default 0).")
CpusPerRunOpt = typer.Option(None, "--cpus-per-run", callback=COUNT, help="Slurm: CPUs per run (default 1).")
DataDirOpt = typer.Option(None, "--data-dir", parser=a_path("--data-dir"), metavar="PATH",
                          help="Data root (default: $GAUSSREG_DATA, else ./data).")


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def fail(message: str, code: int = EXIT_BAD_INPUT):
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def writable_store(store: Path) -> None:
    """The store folder exists (made if needed) and this user may write it; else one sentence, exit 2."""
    if store.exists() and not store.is_dir():
        fail(f"--store {store} is a file, not a folder")
    existed = store.exists()
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the store folder {store} ({e.strerror})")
    if not os.access(store, os.W_OK | os.X_OK):
        fail(f"the store folder {store} is not writable by this user")
    no_locks = check_locking(store)
    if no_locks:
        if not existed:
            store.rmdir()  # nothing half-written
        fail(no_locks)


def readable_store(store: Path) -> None:
    if store.exists() and not store.is_dir():
        fail(f"--store {store} is a file, not a folder")


def existing_store(store: Path) -> None:
    """Commands that read a store say so when it is not there (a typo), instead of showing nothing."""
    readable_store(store)
    if not store.is_dir():
        fail(f"the store {store} does not exist")


class OutputError(OSError):
    """Standard output cannot be written (a full disk, /dev/full, an I/O error)."""


def stdout_gone() -> None:
    """Our reader went away (`gaussreg run | head`, a closed terminal): from now on output
    goes to /dev/null and the work goes on; the exit code still tells how it went."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass


def _console_lost_its_reader() -> None:
    # Rich's default is to exit(1) on a broken pipe; a sweep must outlive its output
    stdout_gone()
    console.quiet = True


console.on_broken_pipe = _console_lost_its_reader


def print_plain(title: str, header: List[str], rows) -> None:
    """A listing too long for a table (more than BIG_GRID rows): tab-separated lines, written
    as they come (Rich takes most of a minute to lay out 100,000 rows, and a reader of that
    many pipes it anyway); control sequences from the store stripped."""
    out = sys.stdout
    out.write(strip_control(title) + "\n" + "\t".join(header) + "\n")
    for cells in rows:
        out.write("\t".join(strip_control(str(c)) for c in cells) + "\n")


def print_whole(renderable) -> None:
    """Print a table without cut cells. Rich fits a table to the console, wrapping text at
    spaces and, below its minimum width, cutting cells ("85.…"); and it sizes a file or pipe
    as 80 columns. There the table gets the width it needs (up to 160 columns, then its
    text wraps); a terminal narrower than the minimum still cuts, and says so."""
    m = Measurement.get(console, console.options.update_width(10_000), renderable)
    wide = min(m.maximum, max(m.minimum, 160))
    if not console.is_terminal and wide > console.width:
        fits = console.width
        console.width = wide  # print(width=) cannot widen past the console's width
        try:
            console.print(renderable, crop=False)
        finally:
            console.width = fits
        return
    console.print(renderable)
    if console.is_terminal and console.width < m.minimum:
        console.print(f"[dim]cells are cut to fit {console.width} columns (the table needs {m.minimum}): widen "
                      "the terminal, or use --format markdown or csv[/]", highlight=False)


def survive_closed_output(fn):
    """fn, for a launch's output: when stdout is gone (a closed pipe or terminal) or cannot
    be written (a full disk), the output stops and the sweep goes on."""
    def call(*args, **kw):
        try:
            return fn(*args, **kw)
        except OutputError as e:
            stdout_gone()
            console.quiet = True
            if e.errno not in (errno.EPIPE, errno.EIO):
                err_console.print(f"[yellow]warning:[/] cannot write the output ({escape(e.strerror or str(e))}); "
                                  "the runs go on", highlight=False, soft_wrap=True)
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EIO):
                raise
            stdout_gone()
    return call


def _version(value: bool):
    if value:
        console.print(f"gaussreg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


class TableFormat(str, Enum):
    table = "table"
    markdown = "markdown"
    csv = "csv"
    json = "json"


class Selection(str, Enum):
    validation = "validation"
    test = "test"


class ListFormat(str, Enum):
    table = "table"
    json = "json"


# ---------------------------------------------------------------- run

@app.command()
def run(manifest: Path = ManifestArg,
        store: Path = StoreOpt,
        experiment: Optional[List[str]] = typer.Option(None, "--experiment",
                                                       help="Only this experiment (exact name; repeat for more)."),
        only: Optional[str] = typer.Option(None, help="Only experiments, run ids or methods matching this glob."),
        gpus: str = typer.Option("auto", help="'auto' (every visible GPU, else the CPU), 'all' (every visible "
                                               "GPU; an error without one), 'none' (CPU), or a list of indices "
                                               "among the visible GPUs ('0,1'), GPU UUIDs and MIG ids."),
        per_gpu: Optional[int] = typer.Option(None, "--per-gpu", callback=COUNT, help="Runs sharing one GPU (default 1)."),
        max_parallel: Optional[int] = typer.Option(None, "--max-parallel", callback=COUNT,
                                                   help="At most this many runs at once (CPU default: 1)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="List the expanded runs and their ids; launch nothing."),
        rerun: bool = typer.Option(False, "--rerun", help="Train finished runs again."),
        follow: Optional[bool] = typer.Option(None, "--follow/--detach",
                                              help="Watch until done (default; with --backend slurm: return "
                                                   "after submitting), or start in the background and return."),
        data_dir: Optional[Path] = DataDirOpt,
        backend: str = typer.Option("local", "--backend", help="local (this box) or slurm (sbatch array jobs)."),
        partition: Optional[str] = typer.Option(None, "--partition", help="Slurm partition."),
        time_limit: Optional[str] = typer.Option(None, "--time", help="Slurm time limit per task, e.g. 04:00:00."),
        gpus_per_run: Optional[int] = GpusPerRunOpt,
        cpus_per_run: Optional[int] = CpusPerRunOpt,
        mem: Optional[str] = typer.Option(None, "--mem", help="Slurm: memory per run, e.g. 16G."),
        array_parallelism: Optional[int] = typer.Option(None, "--array-parallelism", callback=COUNT,
                                                        help="Slurm: at most K array tasks at once."),
        sbatch_arg: Optional[List[str]] = typer.Option(None, "--sbatch-arg",
                                                       help="Slurm: extra sbatch arguments (repeatable)."),
        yes: bool = typer.Option(False, "--yes", help=f"Launch a grid of more than {BIG_GRID} runs."),
        plan_file: Optional[Path] = typer.Option(None, "--plan", hidden=True, parser=a_path("--plan"), metavar="PATH",
                                                 help="Carry out a launch plan saved by a detached launch.")):
    """Run every configuration of a manifest, one worker process per run, then print the fair table."""
    if plan_file is not None:  # a detached launch: planned and checked once, by whoever started it
        try:
            p = Plan.load(plan_file)
        except LaunchError as e:
            fail(str(e))
        req = p.request
        writable_store(Path(req.store))
        return _run_here(p, Store(req.store), Path(req.manifest), Path(req.store), req.gpus, req.rerun)

    if backend not in ("local", "slurm"):
        fail(f"--backend must be 'local' or 'slurm', not {backend!r}")
    if backend == "slurm":  # the login node's own GPUs say nothing about the cluster's: no local plan
        overrides = {"partition": partition, "time": time_limit, "gpus_per_run": gpus_per_run,
                     "cpus_per_run": cpus_per_run, "mem": mem, "array_parallelism": array_parallelism,
                     "per_gpu": per_gpu, "sbatch_args": [a for x in sbatch_arg or [] for a in shlex.split(x)]}
        req = LaunchRequest(str(manifest), str(store), tuple(experiment or ()), only, rerun=rerun,
                            data_dir=str(data_dir) if data_dir else None, backend="slurm", slurm=overrides)
        return _run_slurm(req, bool(follow), dry_run, yes)
    follow = True if follow is None else follow
    req = LaunchRequest(str(manifest), str(store), tuple(experiment or ()), only, gpus,
                        1 if per_gpu is None else per_gpu, max_parallel, rerun, str(data_dir) if data_dir else None)
    try:
        p = plan(req)
    except LaunchError as e:
        fail(str(e))
    runs = p.runs
    readable_store(store)
    st = Store(store)
    if dry_run:
        _check_own_code(p.manifest, runs)
        _dry_run(p, st, manifest)
        return
    if p.missing_data:
        fail(next(iter(p.missing_data.values())))
    if len(runs) > BIG_GRID and not yes:
        fail(f"{manifest} expands to {len(runs)} runs (more than {BIG_GRID}); check the grid with --dry-run, "
             "then add --yes to launch them all")
    writable_store(store)  # after every check of the input: a bad manifest or dataset writes nothing
    if not follow:
        try:
            info = launch(p)
        except LaunchError as e:
            fail(str(e))
        console.print(f"started in the background (pid {info['pid']}); log: {info['log']}\n"
                      f"watch with `gaussreg tui --store {store}`, `gaussreg ls --store {store}` or "
                      f"`gaussreg table --store {store}`; stop it with `kill {info['pid']}` (its workers keep "
                      "their last.pt, and the same command resumes them)", highlight=False, markup=False)
        return
    _run_here(p, st, manifest, store, gpus, rerun)


def _run_here(p, st, manifest: Path, store: Path, gpus: str, rerun: bool):
    """`gaussreg run` in the foreground: record the experiments, schedule the runs on this
    box under a live view, print the outcome and exit with the summary's code."""
    runs, slots = p.runs, p.slots
    try:
        write_experiments(p)
    except OSError as e:  # a full disk, a file where a folder should be: nothing launched
        fail(f"cannot write the experiments of {manifest} in {store} "
             f"({e.strerror}{': ' + str(e.filename) if e.filename else ''})")
    survive_closed_output(console.print)(launch_line(len(runs), manifest, st.root, slots, gpus), markup=False,
                                         highlight=False)
    view = LiveView(len(runs), console)
    survive_closed_output(view.__enter__)()
    try:
        # the scheduler creates the run directories: each at its launch, the rest while the first runs train
        summary = Scheduler(st, [r.id for r in runs], slots, rerun=rerun, specs={r.id: r.spec for r in runs},
                            on_change=survive_closed_output(view.on_change),
                            say=survive_closed_output(lambda m: err_console.print(m, markup=False,
                                                                                  highlight=False))).run()
    finally:
        survive_closed_output(view.__exit__)(None, None, None)
    survive_closed_output(_print_outcome)(summary, st, runs)
    raise typer.Exit(summary.exit_code())


def launch_line(n: int, manifest: Path, root: Path, slots, gpus: str) -> str:
    """The first line of a launch, as `key: value` facts a reader (or a script) can take apart:
    "3 runs from m.toml into runs/; slots: cpu; threads per run: 2; GPUs visible: none (...)"."""
    facts = [f"{plural(n, 'run')} from {manifest} into {root}/",
             f"slots: {', '.join('gpu ' + s.gpu if s.gpu else 'cpu' for s in slots)}",
             f"threads per run: {slots[0].threads}"]
    if gpus.strip() == "auto" and not any(s.gpu for s in slots):
        facts.append("GPUs visible: none (so --gpus auto trains on the CPU, and --backend slurm on a cluster's "
                     "GPUs)")
    return "; ".join(facts)


def _print_outcome(summary, st, runs):
    for o in summary.outcomes.values():
        if o.state in ("failed", "diverged") and o.log_tail:
            console.print(f"[red]{o.state}[/] {escape(o.run_id)}: {escape(o.error or '')}\n[dim]{escape(o.log_tail)}[/]",
                          highlight=False)
    if summary.interrupted:
        console.print("[yellow]interrupted:[/] running workers were cancelled (their last.pt is kept); "
                      "run the same command again to resume them.")
    exps = sorted({r.spec["experiment"] for r in runs})
    for e in exps:
        print_whole(report.render_rich(report.fair_table(st, e)))


def _check_own_code(m, runs) -> None:
    """--dry-run: import the own model factories and data loaders of the runs chosen (those a
    launch would train) in a subprocess and try them (gaussreg.runs.check); every problem as
    a manifest error, then exit 2."""
    if not mf.uses_own_code(m, runs):
        return
    errors = mf.check_code(m, runs=runs)
    for e in errors[:-1]:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    if errors:
        fail(str(errors[-1]))


def _dry_run(p, st, manifest) -> None:
    """What a launch would do, per experiment: runs new/done, and whether its data is there."""
    runs, slots = p.runs, p.slots
    title = f"{plural(len(runs), 'run')} from {manifest} on {plural(len(slots), 'slot')}"
    header = ("run id", "dataset", "model", "method", "params", "state")
    big = len(runs) > BIG_GRID
    lines = []  # a big grid's rows, printed as plain lines after the loop
    t = Table(title=escape(title), title_justify="left")
    for h in header:
        t.add_column(h, overflow="fold")
    per_exp = {}
    for r in runs:
        rd = RunDir(st.root / r.id)
        try:
            state = rd.state() if rd.spec_file.exists() else "new"
        except RunFileError as e:
            state = f"corrupt: {e}"
        cells = (r.id, _with_args(r.spec["dataset"], r.spec.get("dataset_args")),
                 _with_args(r.spec["model"], r.spec.get("model_args")), r.spec["method"], describe_params(r.spec),
                 state)
        if big:
            lines.append(cells)
        else:
            t.add_row(*map(escape, cells))
        counts = per_exp.setdefault(r.spec["experiment"], {"new": 0, "done": 0, "other": 0, "datasets": set()})
        counts["new" if state == "new" else "done" if state in FINISHED else "other"] += 1
        counts["datasets"].add(r.spec["dataset"])
    if big:
        print_plain(f"{title} (more than {BIG_GRID:,}: one line each, tab-separated)", list(header), lines)
    else:
        print_whole(t)
    for name, c in per_exp.items():
        gone = sorted(c["datasets"] & set(p.missing_data))
        console.print(f"{name}: {c['new']} new, {c['done']} done, {c['other']} to resume or retry; data "
                      + (f"MISSING: {', '.join(gone)}" if gone else "present"), markup=False, highlight=False)
    for message in p.missing_data.values():
        console.print(message, markup=False, highlight=False)
    if big:
        console.print(f"{plural(len(runs), 'run')} is more than {BIG_GRID:,}: launching them needs --yes "
                      "(check the grid first: a typo in a list multiplies it)", markup=False, highlight=False,
                      soft_wrap=True)


def _with_args(name: str, args: Optional[dict]) -> str:
    """A dataset or model with its factory's arguments: "lenet width=8"."""
    return " ".join([name] + [f"{k}={v}" for k, v in (args or {}).items()])


def _run_slurm(req, follow, dry_run, yes):
    """`gaussreg run --backend slurm`: one sbatch array job for the runs that need training
    (launch.submit_slurm, as the TUI's launch dialog)."""
    manifest, st = req.manifest, Store(req.store)
    try:
        p = plan(req, commands=not dry_run)
    except LaunchError as e:
        fail(str(e))
    runs, cfg = p.runs, p.slurm
    if dry_run:
        _check_own_code(p.manifest, runs)
        console.print(" ".join(slurm.sbatch_command(cfg, -(-len(runs) // cfg.per_gpu), Path("JOB.sh"),
                                                    st.root / "_slurm" / "LAUNCH")), highlight=False, markup=False)
        return
    if p.missing_data:
        fail(next(iter(p.missing_data.values())))
    if len(runs) > BIG_GRID and not yes:
        fail(f"{manifest} expands to {len(runs)} runs (more than {BIG_GRID}); check the grid with --dry-run, "
             "then add --yes to submit them all")
    writable_store(st.root)
    try:
        sub = submit_slurm(p)
    except LaunchError as e:
        fail(str(e))
    for rid, why in sorted(sub.skipped.items()):
        console.print(f"[dim]skipped[/] {escape(rid)}: {escape(why)}", highlight=False)
    if sub.job_id:
        console.print(f"submitted {len(sub.submitted)} run(s) as Slurm array job {sub.job_id} "
                      f"({-(-len(sub.submitted) // cfg.per_gpu)} task(s)); script {escape(str(sub.script))}",
                      highlight=False)
    else:
        console.print("nothing to submit", highlight=False)
    if not follow:
        console.print(f"watch with `gaussreg tui --store {st.root}`, `gaussreg ls --store {st.root}` or "
                      f"`gaussreg run {manifest} --store {st.root} --backend slurm --follow`", highlight=False,
                      markup=False)
        return
    try:
        code = slurm_view.follow(st, [r.id for r in runs], console)
    except slurm.SlurmError as e:  # squeue failed or hung: the jobs are Slurm's, only watching them stopped
        fail(f"{e}; the runs stay submitted (watch them with `gaussreg ls --store {st.root}`)")
    if code:
        raise typer.Exit(code)
    for e in sorted({r.spec["experiment"] for r in runs}):
        print_whole(report.render_rich(report.fair_table(st, e)))
    states = [row["state"] for row in reader.list_runs(st) if row["id"] in {r.id for r in runs}]
    raise typer.Exit(0 if all(s == "completed" for s in states) else 1)


# ---------------------------------------------------------------- reading the store

BUDGET_HELP = ("Only configurations whose training time is at most X times the baseline's compete (CPU seconds; "
               "GPU seconds for runs on CUDA).")


@app.command()
def table(store: Path = StoreOpt,
          experiment: Optional[str] = typer.Option(None, help="Only this experiment."),
          tolerance: Optional[float] = typer.Option(None, help="Override the manifest's tolerance (a fraction)."),
          format: TableFormat = typer.Option(TableFormat.table, "--format", help="table, markdown, csv or json."),
          select: Selection = typer.Option(Selection.validation, "--select",
                                           help="Decide eligibility and the best on validation (default) or test "
                                                "numbers (the paper's procedure)."),
          show_all: bool = typer.Option(False, "--all", help="Also list every configuration with its eligibility "
                                                             "and the reason, by robustness."),
          budget: Optional[float] = typer.Option(None, metavar="X", help=BUDGET_HELP),
          from_export: Optional[Path] = typer.Option(None, "--from", metavar="<runs.jsonl>",
                                                     parser=a_path("--from"),
                                                     help="Recompute the table from a `gaussreg export --what runs "
                                                          "--format jsonl` file instead of a store.")):
    """The fair comparison: among configurations within `tolerance` of the baseline's accuracy, the most robust
    per method; test numbers, mean ± std over seeds."""
    _check_tolerance(tolerance)
    _check_budget(budget)
    if from_export is not None:
        try:
            records = read_runs(from_export)
        except ValueError as e:
            fail(str(e))
        t = report.table_of_export([r for r in records if not experiment or r["spec"].get("experiment") == experiment],
                                   tolerance, select.value, budget)
        if experiment and not t["experiments"]:
            fail(f"no runs of experiment {experiment!r} in {from_export}")
        return _print_table(t, format, show_all)
    readable_store(store)
    if not store.is_dir():
        fail(f"the store {store} does not exist")
    t = report.fair_table(Store(store), experiment, tolerance, select.value, budget, warn)
    if tolerance is None:
        for rec in t["experiments"]:
            why = Store(store).experiment(rec["experiment"]).get("error")
            if why:
                warn(f"{why}; using tolerance {rec['tolerance']:g}")
    if experiment and not t["experiments"]:
        fail(f"no runs of experiment {experiment!r} in {store}")
    _print_table(t, format, show_all)


def _check_tolerance(tolerance: Optional[float]) -> None:
    if tolerance is not None and not 0 <= tolerance <= 1:
        fail(f"--tolerance must be a fraction in [0, 1], not {tolerance}")


def _check_budget(budget: Optional[float]) -> None:
    if budget is not None and report.budget_problem(budget):
        fail(report.budget_problem(budget))


def _print_table(t: dict, format: "TableFormat", show_all: bool) -> None:
    if format == TableFormat.json:
        print(json.dumps(t, indent=2))  # JSON escapes control characters itself
    elif format == TableFormat.markdown:
        print(strip_control(report.render_markdown(t, show_all)))
    elif format == TableFormat.csv:
        print(strip_control(report.render_csv(t, show_all)), end="")
    else:
        print_whole(report.render_rich(t, show_all))


class PlotFormat(str, Enum):
    png = "png"
    svg = "svg"
    pdf = "pdf"


@app.command()
def plot(store: Path = StoreOpt,
         experiment: Optional[str] = typer.Option(None, help="Only this experiment."),
         out: Path = typer.Option(Path("figures"), "--out", parser=a_path("--out"), metavar="PATH",
                                      help="Folder for the figures."),
         format: PlotFormat = typer.Option(PlotFormat.png, "--format", help="png, svg or pdf."),
         select: Selection = typer.Option(Selection.validation, "--select", help="validation or test selection."),
         tolerance: Optional[float] = typer.Option(None, help="Override the manifest's tolerance (a fraction), "
                                                              "as `gaussreg table --tolerance` does."),
         budget: Optional[float] = typer.Option(None, metavar="X", help=BUDGET_HELP + " As `gaussreg table --budget`.")):
    """Figures of the fair comparison: accuracy vs R per run, best per training sigma, robustness curves."""
    _check_tolerance(tolerance)
    _check_budget(budget)
    if not store.is_dir():
        fail(f"the store {store} does not exist")
    try:
        paths = plots.plot(Store(store), out, experiment, format.value, select.value, tolerance, budget, warn)
    except plots.PlotsUnavailable as e:
        fail(str(e))  # fail() escapes
    except OSError as e:
        fail(f"cannot write figures into {out}: {e.strerror or e}")
    if not paths:
        fail(f"no runs{' of experiment ' + repr(experiment) if experiment else ''} in {store}")
    for p in paths:
        console.print(str(p), highlight=False, markup=False)


class ExportFormat(str, Enum):
    csv = "csv"
    jsonl = "jsonl"
    tensorboard = "tensorboard"


class ExportWhat(str, Enum):
    runs = "runs"
    epochs = "epochs"
    sigmas = "sigmas"


@app.command()
def export(store: Path = StoreOpt,
           what: ExportWhat = typer.Option(ExportWhat.runs, "--what",
                                           help="One row per run, per epoch, or per (run, split, sigma)."),
           format: ExportFormat = typer.Option(ExportFormat.csv, "--format", help="csv or jsonl."),
           experiment: Optional[str] = typer.Option(None, help="Only this experiment."),
           from_export: Optional[Path] = typer.Option(None, "--from", metavar="<runs.jsonl>", parser=a_path("--from"),
                                                      help="Export from a `gaussreg export --what runs --format "
                                                           "jsonl` file instead of a store (runs and sigmas: it "
                                                           "carries no epochs)."),
           out: Optional[Path] = typer.Option(None, "--out", parser=a_path("--out"), metavar="DIR",
                                              help="--format tensorboard: the folder of event files (one "
                                                   "folder per run; --what does not apply).")):
    """The store in long format on stdout, for pandas (pd.read_csv / pd.read_json(lines=True)),
    or as TensorBoard event files (--format tensorboard --out DIR)."""
    if (format == ExportFormat.tensorboard) != (out is not None):
        fail("--format tensorboard writes into a folder: give it --out DIR" if out is None else
             "--out is for --format tensorboard; csv and jsonl go to stdout")
    if from_export is not None:
        if what == ExportWhat.epochs or out is not None:
            fail(f"{'--format tensorboard' if out is not None else '--what epochs'} needs a store: {from_export}, "
                 "an export of runs, carries no epochs")
        try:
            source = read_runs(from_export)
        except ValueError as e:
            fail(str(e))
        if experiment and not any(r["spec"].get("experiment") == experiment for r in source):
            fail(f"no runs of experiment {experiment!r} in {from_export}")
    else:
        existing_store(store)
        if experiment and not reader.has_runs(Store(store), experiment):
            fail(f"no runs of experiment {experiment!r} in {store}")
        source = Store(store)
    if out is not None:
        export_tensorboard(store, out, experiment)
        return
    try:
        for text in ex.export_lines(source, what.value, format.value, experiment, warn):
            sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `gaussreg export | head` is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def export_tensorboard(store: Path, out: Path, experiment: Optional[str]) -> None:
    try:  # here: an optional extra, and half a second of imports no other command should pay
        from gaussreg.views.tensorboard_export import SigmaStepError, write_tensorboard
    except ImportError as e:
        if not (e.name or "").startswith(("tensorboard", "google.protobuf")):
            raise
        fail("--format tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' in the clone")
    try:
        dirs = write_tensorboard(Store(store), out, experiment)
    except SigmaStepError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write the event files into {out}: {e.strerror or e}")
    if not dirs:
        fail(f"no runs{' of experiment ' + repr(experiment) if experiment else ''} in {store}")
    console.print(f"{len(dirs)} runs written to {escape(str(out))}; view them with "
                  f"`tensorboard --logdir {escape(shlex.quote(str(out)))}`", highlight=False, soft_wrap=True)


@app.command("ls")
def ls(store: Path = StoreOpt,
       state: Optional[str] = typer.Option(None, help="Only runs in this state."),
       format: ListFormat = typer.Option(ListFormat.table, "--format", help="table or json.")):
    """List the runs of a store."""
    existing_store(store)
    if state and state not in STATES + ("corrupt",):
        fail(f"--state must be one of {', '.join(STATES + ('corrupt',))}, not {state!r}")
    rows = [r for r in reader.list_runs(Store(store)) if not state or r["state"] == state]
    if format == ListFormat.json:
        print(json.dumps([{"id": r["id"], "state": r["state"], "not_launched": r["row"].not_launched,
                           "spec": r["spec"], "result": r["result"], "error": r["error"]} for r in rows], indent=2))
        return
    if len(rows) > BIG_GRID:
        print_plain(f"{plural(len(rows), 'run')} in {store} (more than {BIG_GRID:,}: one line each, tab-separated)",
                    ["run id", "data/model", "params", "state", "acc %", "R %", "time", "slurm job"],
                    ((r["id"], f"{r['row'].dataset or '?'}/{r['row'].model or '?'}", r["row"].params, r["state"],
                      _pct_cell(r["row"].test_acc), _pct_cell(r["row"].robustness), reader.duration(r["row"].duration),
                      r["row"].slurm_job or "-")
                     for r in rows))
        return
    t = Table(title=escape(f"{plural(len(rows), 'run')} in {store}"), title_justify="left", box=None,
              header_style="bold")
    t.add_column("run id", no_wrap=True)
    t.add_column("data/model", overflow="fold")
    t.add_column("params", overflow="fold")
    for h in ("state", "acc %", "R %", "time"):  # time: trained in all, resumes included
        t.add_column(h, no_wrap=True, justify="left" if h == "state" else "right")
    jobs = any(r.get("slurm_job") for r in rows)
    if jobs:
        t.add_column("slurm job", no_wrap=True)
    for r in rows:
        row = r["row"]  # the same row the TUI shows (report.RunReader)
        params = " ".join(p for p in (row.params, f"seed={row.seed}" if row.seed else "") if p)
        t.add_row(escape(row.id), escape(f"{row.dataset or '?'}/{row.model or '?'}" if r["spec"] else "?/?"),
                  escape(params if r["spec"] else row.error or ""),
                  f"[{STATE_STYLE.get(row.state, 'red')}]{row.state}[/]"
                  + (" [yellow](not launched)[/]" if row.not_launched else ""),
                  f"{row.test_acc * 100:.2f}" if row.test_acc is not None else "-",
                  f"{row.robustness * 100:.2f}" if row.robustness is not None else "-",
                  reader.duration(row.duration), *([row.slurm_job or "-"] if jobs else []))
    print_whole(t)
    stranded = sum(r["row"].not_launched for r in rows)
    if stranded:
        them = "it" if stranded == 1 else "them"
        console.print(f"{plural(stranded, 'queued run')} not launched: the launch that queued {them} has ended "
                      f"(Ctrl-C?), so nothing will start {them}; `gaussreg run` with the manifest starts {them}, "
                      f"`gaussreg rm --state queued --store {store}` removes {them}", markup=False, highlight=False)


def _pct_cell(v) -> str:
    return f"{v * 100:.2f}" if v is not None else "-"


def _get_run(store: Path, run_id: str):
    existing_store(store)
    try:
        return Store(store).get(run_id)
    except RunFileError as e:
        fail(str(e))


@app.command()
def show(run_id: str = typer.Argument(..., help="A run id (or a unique prefix)."), store: Path = StoreOpt):
    """A run's spec, status, last epoch, result and log tail."""
    run = _get_run(store, run_id)
    try:
        spec, status, result = run.spec(), run.status(), run.result()
        state = run.state(status)
    except RunFileError as e:
        fail(str(e))
    e = run.last_epoch()  # read from the end: events.jsonl may be large
    console.rule(escape(f"{run.id}  [{state}]"))
    console.print_json(json.dumps({"spec": spec, "status": {**status, "state": state}}))
    note = run.heartbeat_note(status)
    if note:
        console.print(f"{state}: {note}", markup=False, highlight=False)
    if e:
        console.print(f"epoch {e['epoch']}: train loss {e['train_loss']:.4f}, val loss {e['val_loss']:.4f}, "
                      f"val acc {e['val_accuracy'] * 100:.2f}%, lr {e['lr']:.3g}, {e['images_per_s']:.0f} img/s")
    if result:
        wall = reader.training_time(status, state)  # in all: a resumed run's earlier epochs included
        console.print(f"test accuracy {result['test_accuracy'] * 100:.2f}%, robustness {result['robustness'] * 100:.2f}%"
                      f", best epoch {result.get('best_epoch', '?')} of {result.get('epochs_run', '?')}, "
                      + (f"{wall:.1f}s in all " if wall is not None else "")
                      + f"on {_device(result)} in {result.get('precision', 'fp32')}"
                      + (", compiled" if result.get("compile") else ""), highlight=False, markup=False)
    tail = run.log_tail(15)
    if tail:
        console.rule(run.log_file.name)
        console.print(tail, highlight=False, markup=False)


def _device(result: dict) -> str:
    """`cpu (Intel(R) Xeon(R) ...)` or the GPU's name; results of older workers named only the
    CPU's architecture ("x86_64")."""
    name, dev = str(result.get("device_name", "?")), str(result.get("device", ""))
    return f"cpu ({name})" if dev == "cpu" and not name.startswith("cpu") else name


@app.command()
def cancel(run_id: str = typer.Argument(..., help="A run id (or a unique prefix)."), store: Path = StoreOpt,
           grace: float = typer.Option(GRACE_S, "--grace", min=0, max=86400,
                                       help="Seconds a worker gets to stop before it is killed (SIGKILL).")):
    """Ask a running run's worker to stop (SIGTERM; scancel for Slurm runs): it saves last.pt and becomes cancelled;
    a worker that has not stopped after --grace seconds (stuck in its own code) is killed, last.pt kept."""
    run = _get_run(store, run_id)
    try:
        if slurm.is_slurm(run.status()):  # on a cluster: scancel, not a local signal
            console.print(f"{run.id}: {slurm.cancel(run)}", highlight=False)
            return
        done = cancel_run(run, grace)
    except (ControlError, RunFileError) as e:
        fail(str(e))
    except OSError as e:  # a Slurm run's cancel request or status on a full or read-only store
        fail(f"cannot write the cancel of {run.id} into {run.path}: {e.strerror or e}")
    console.print(done, markup=False, highlight=False)


@app.command()
def rm(run_ids: Optional[List[str]] = typer.Argument(None, metavar="RUN",
                                                   help="Run ids (or unique prefixes)."),
       store: Path = StoreOpt,
       experiment: Optional[str] = typer.Option(None, help="Every run of this experiment."),
       state: Optional[str] = typer.Option(None, help="Every run in this state (with --experiment: of it)."),
       yes: bool = typer.Option(False, "--yes", help="Remove without asking.")):
    """Remove runs from the store, with their checkpoints, certificates, events and log (asks first);
    running runs, and queued ones a launch will start, are refused."""
    existing_store(store)
    if run_ids and (experiment or state):
        fail("name runs, or choose them with --experiment and --state, not both")
    if not run_ids and not (experiment or state):
        fail("name the runs to remove: run ids, --experiment NAME or --state STATE")
    if state and state not in STATES + ("corrupt",):
        fail(f"--state must be one of {', '.join(STATES + ('corrupt',))}, not {state!r}")
    st = Store(store)
    if run_ids:
        runs = list({r.id: r for r in (_get_run(store, i) for i in run_ids)}.values())
    else:
        if experiment and not reader.has_runs(st, experiment):
            fail(f"no runs of experiment {experiment!r} in {store}")
        runs = [RunDir(st.root / r["id"]) for r in reader.list_runs(st, experiment)
                if not state or r["state"] == state]
        if not runs:
            console.print("no run matches: nothing removed", highlight=False, markup=False)
            return
    refused = {r.id: st.removal_refused(r) for r in runs}
    for why in filter(None, refused.values()):
        err_console.print(f"[yellow]not removed:[/] {escape(why)}", highlight=False, soft_wrap=True)
    runs = [r for r in runs if not refused[r.id]]
    if not runs:
        raise typer.Exit(1)
    if not yes:
        shown = 20
        for r in runs[:shown]:
            console.print(r.id, highlight=False, markup=False)
        if len(runs) > shown:
            console.print(f"... and {len(runs) - shown} more", highlight=False, markup=False)
        try:
            sure = typer.confirm(f"Remove {plural(len(runs), 'run')} with their checkpoints and certificates?")
        except typer.Abort:  # no answer (end of input)
            sure = False
        if not sure:
            fail("nothing removed (add --yes to remove without asking)", 1)
    gone, failed = 0, 0
    for r in runs:
        try:
            st.remove(r)
            gone += 1
        except RunFileError as e:
            failed += 1
            err_console.print(f"[yellow]not removed:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        except OSError as e:
            failed += 1
            err_console.print(f"[bold red]error:[/] cannot remove {escape(r.id)}: {escape(e.strerror or str(e))}",
                              highlight=False, soft_wrap=True)
    console.print(f"removed {plural(gone, 'run')} from {store}", highlight=False, markup=False)
    if failed or any(refused.values()):
        raise typer.Exit(1)


def _parse_sigmas(text: Optional[str]) -> Optional[List[float]]:
    if text is None:
        return None
    try:
        if ":" in text:
            lo, hi, n = text.split(":")
            lo, hi, n = float(lo), float(hi), int(n)
            if n < 1 or n > 10_000:
                fail(f"--sigmas {text!r}: the COUNT of START:STOP:COUNT must be from 1 to 10000, not {n}")
            import torch  # here: the CLI starts without torch
            vals = torch.linspace(lo, hi, n, dtype=torch.float64).tolist()
        else:
            vals = [float(v) for v in text.split(",")]
    except ValueError:
        fail(f"--sigmas must be a list like '0,0.1,0.2' or a range START:STOP:COUNT, not {text!r}")
    if not all(math.isfinite(v) and v >= 0 for v in vals):
        fail(f"--sigmas must be finite numbers >= 0, not {text!r}")
    return vals


def _model_from_checkpoint(ckpt: Path, spec: dict, device: str, data_dir: Optional[Path]):
    """gaussreg.runs.trained.from_checkpoint, or exit 2 with its sentence."""
    from gaussreg.runs import trained  # here: it imports torch, which the other commands never need
    try:
        t = trained.from_checkpoint(ckpt, spec, device, data_dir)
    except trained.TrainedRunError as e:
        fail(str(e))
    return t.model, t.splits, t.precision


@app.command("eval")
def eval_(target: str = typer.Argument(..., help="A run id, or a checkpoint file (its run's spec is inside it)."),
          store: Path = StoreOpt,
          sigmas: Optional[str] = typer.Option(None, help="'0,0.1,0.2' or START:STOP:COUNT (default: the run's "
                                                          "own robustness sigmas)."),
          samples: Optional[int] = typer.Option(None, callback=COUNT,
                                                help="Noise draws per image and sigma; all must agree "
                                                "(default: the run's own)."),
          seed: int = typer.Option(0, callback=SEED),
          clip: Optional[bool] = typer.Option(None, "--clip/--no-clip",
                                              help="Clip noisy images to [0,1] (default: as the run did)."),
          device: str = typer.Option("auto"),
          data_dir: Optional[Path] = DataDirOpt,
          format: ListFormat = typer.Option(ListFormat.table, "--format")):
    """Re-evaluate robustness of a trained run (best.pt) or checkpoint on its test set, at the run's own sigmas."""
    p = Path(target)
    inner = None  # the spec a checkpoint carries, for one copied away from its run directory
    if p.is_file():
        run, ckpt = RunDir(p.parent), p
        if not os.path.lexists(run.spec_file):
            from gaussreg.runs import trained  # here: it imports torch, which the other commands never need
            try:
                inner = trained.spec_in_checkpoint(p)
            except trained.TrainedRunError as e:
                fail(str(e))
    else:
        if not p.exists() and ("/" in target or p.suffix == ".pt"):  # meant as a file: say that, not "no run"
            fail(f"{target} does not exist (and is no run id of store {store})")
        run = _get_run(store, target)
        ckpt = run.best_checkpoint
    if samples is not None and not 1 <= samples <= MAX_SAMPLES:
        fail(f"--samples must be from 1 to {MAX_SAMPLES}, not {samples}")
    if not valid_device(device):
        fail(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    sig = _parse_sigmas(sigmas)
    try:
        spec = resolve(inner if inner is not None else run.spec())
    except (SpecError, RunFileError) as e:
        fail(str(e))
    own = spec["robustness"]
    sig = own["sigmas"] if sig is None else sig
    samples = own["samples"] if samples is None else samples
    clip = own["clip"] if clip is None else clip
    if not ckpt.is_file():
        fail(f"{ckpt} does not exist (has the run finished an epoch?)")
    model, splits, precision = _model_from_checkpoint(ckpt, spec, device, data_dir)
    which = "given by --sigmas" if sigmas else "the run's own"
    name = run.id if inner is None else f"{spec.get('experiment', '?')} (spec from the checkpoint)"
    used = (f"{name}: checkpoint {ckpt}, {len(sig)} sigmas {min(sig):g} to {max(sig):g} ({which}), "
            f"{samples} sample(s){', clipped' if clip else ''}, {precision}")
    # said first: the evaluation takes a while; on stderr when stdout is JSON
    (err_console if format == ListFormat.json else console).print(escape(used), highlight=False, soft_wrap=True)
    with Progress(TextColumn(f"evaluating at {len(sig)} sigmas"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("test images x samples"), TimeRemainingColumn(), console=err_console,
                  transient=True) as bar:
        task = bar.add_task("eval", total=len(splits.test_x) * samples)
        with autocast(splits.test_x.device, precision):
            r = robustness(model, splits.test_x, splits.test_y, sigmas=sig, samples=samples, seed=seed, clip=clip,
                           progress=lambda done, total: bar.update(task, completed=done))
    if format == ListFormat.json:
        print(json.dumps({"run_id": run.id if inner is None else None, "checkpoint": str(ckpt),
                          "sigmas_from": "option" if sigmas else "run",
                          **r.to_dict(), "clip": clip}, indent=2))
        return
    t = Table()
    for h in ("sigma", "consistency %", "accuracy %"):
        t.add_column(h, justify="right")
    for s, c, a in zip(r.sigmas, r.per_sigma, r.accuracy_per_sigma):
        t.add_row(f"{s:.4f}", f"{c * 100:.2f}", f"{a * 100:.2f}")
    console.print(t)
    # a line of its own: as the table's title it would wrap at the table's width
    console.print(escape(f"{name}: clean acc {r.clean_accuracy * 100:.2f}%, robustness R {r.score * 100:.2f}%"),
                  highlight=False, soft_wrap=True)


@app.command()
def certify(run_id: str = typer.Argument(..., help="A run id (or a unique prefix)."),
            store: Path = StoreOpt,
            sigma: Optional[float] = typer.Option(None, help="Noise level of the smoothed classifier, in [0,1] "
                                                  "pixel units (default: the run's training sigma for augment "
                                                  "and regularizer runs, else 0.25)."),
            n: int = typer.Option(10_000, "--n", callback=COUNT, help="Noise draws per image that estimate pA."),
            n0: int = typer.Option(100, "--n0", callback=COUNT, help="Noise draws per image that pick the class."),
            alpha: float = typer.Option(0.001, help="Failure probability of each certificate."),
            images: int = typer.Option(500, callback=COUNT, help="Test images, spread evenly over the test set."),
            batch: Optional[int] = typer.Option(None, callback=COUNT, help="Noisy copies per forward pass "
                                                "(default 1000 on a CPU, 5000 on a GPU)."),
            seed: Optional[int] = typer.Option(None, callback=SEED, help="Noise seed (default: the run's seed)."),
            device: str = typer.Option("auto"),
            data_dir: Optional[Path] = DataDirOpt):
    """Certified robustness of a trained run by randomized smoothing (Cohen et al. 2019): writes certify-<sigma>.json."""
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):  # inf would write an unreadable certificate
        fail(f"--sigma must be > 0 and finite, not {sigma}")
    if n < 1 or n0 < 1 or images < 1 or (batch is not None and batch < 1):
        fail("--n, --n0, --images and --batch must be >= 1")
    if n0 > n:
        fail(f"--n0 ({n0}) must not exceed --n ({n})")
    if not 0 < alpha < 1:
        fail(f"--alpha must be in (0, 1), not {alpha}")
    run = _get_run(store, run_id)
    try:
        spec = resolve(run.spec())
    except (SpecError, RunFileError) as e:
        fail(f"bad spec {run.spec_file}: {e}")
    ckpt = run.best_checkpoint
    if not ckpt.is_file():
        fail(f"{ckpt} does not exist: run {run.id} has not finished an epoch, so there is no model to certify")
    sigma = default_certify_sigma(spec) if sigma is None else sigma
    target = run.file(run.certification_name(sigma))
    if not os.access(run.path, os.W_OK | os.X_OK):  # said before the minutes of certifying, not after
        fail(f"cannot write {target}: the run directory is not writable (a read-only store?)")
    from gaussreg.runs.certificate import certify_run  # here: it imports torch, which the other commands never need
    model, splits, precision = _model_from_checkpoint(ckpt, spec, device, data_dir)
    batch = batch or certify_batch(splits.test_x.device.type)
    with Progress(TextColumn(f"certifying at sigma {sigma:g}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task("certify", total=min(images, len(splits.test_x)))
        try:
            with autocast(splits.test_x.device, precision):  # the classifier the run trained and evaluated
                cert = certify_run(run, model, splits.test_x, splits.test_y, sigma, n0, n, alpha, images, batch,
                                   spec["seed"] if seed is None else seed,
                                   progress=lambda done, total: bar.update(task, completed=done))
        except (OSError, RunFileError) as e:  # a full or read-only store; the atomic write left nothing
            fail(f"cannot write {target}: {getattr(e, 'strerror', None) or e}")
    acc = cert["certified_accuracy"]
    console.print(f"{escape(run.id)}: {cert['images']} images at sigma {sigma:g}, n {n}, alpha {alpha:g}: "
                  f"certified accuracy {acc['0'] * 100:.1f}% at radius 0, {acc['0.25'] * 100:.1f}% at 0.25, "
                  f"{acc['0.5'] * 100:.1f}% at 0.5; abstained on {cert['abstain_rate'] * 100:.1f}%; "
                  f"{cert['time_s']:.1f}s ({cert['forward_passes_per_s']:.0f} forward passes/s)\n"
                  f"wrote {escape(str(target))}", highlight=False)


@app.command()
def train(run_dir: Path = typer.Argument(..., parser=a_path("RUN_DIR"), metavar="RUN_DIR",
                                             help="A run directory holding spec.json."),
          resume: bool = typer.Option(False, "--resume", help="Continue from last.pt."),
          force: bool = typer.Option(False, "--force", "--rerun",
                                     help="Train a completed run again (its result.json and best.pt are replaced).")):
    """Train one run directory in this process (what `gaussreg run` starts per run)."""
    run = RunDir(run_dir)
    try:
        run.check_is_run()  # before anything is written there (a lock, a GPU place, the log)
    except RunFileError as e:
        fail(str(e))
    if not os.access(run_dir, os.W_OK | os.X_OK):
        fail(f"the run directory {run_dir} is not writable by this user")
    try:
        state = run.state()  # the worker checks the spec itself
    except RunFileError as e:
        fail(str(e))
    if state in FINISHED and not force:
        fail(f"run {run.id} is {state}; training it again replaces its result.json and best.pt "
             "(add --force to do that)")
    place = None
    if wants_gpu(run):
        # on a GPU box, one of the store's GPU places (the ones `--per-gpu` counts) and that GPU,
        # held until this process exits, so launches of the store count this run
        try:
            place = take_gpu_place(Store(run.path.parent))
        except GpuPlaceError as e:
            fail(str(e), 1)
    if place is not None:
        gpu = place[0]
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["GAUSSREG_GPU"] = gpu  # as a scheduler's worker gets
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        err_console.print(f"training {escape(run.id)} on GPU {escape(gpu)} (a place of store "
                      f"{escape(str(run.path.parent))})", highlight=False)
    if not resume and run.last_checkpoint.exists() and state not in FINISHED:
        err_console.print(f"starting {escape(run.id)} over from epoch 1 (--resume continues from its last.pt)",
                          highlight=False)
    try:
        from gaussreg.runs.worker import main as worker_main  # here: the worker imports torch
        code = worker_main([str(run_dir)] + (["--resume"] if resume else []))
    except OSError as e:  # its status on a full or read-only disk (training itself records its own end)
        fail(f"cannot write into the run directory {run_dir}: {e.strerror or e}")
    finally:
        if place is not None:
            os.close(place[1])
    raise typer.Exit(code)


WEB_PORT = 8000  # textual-serve's own default


@app.command()
def tui(store: Path = StoreOpt,
        manifest: Path = typer.Option(Path("experiments.toml"), parser=a_path("--manifest"), metavar="PATH",
                                      help="The manifest the launch dialog opens."),
        web: bool = typer.Option(False, "--web", help="Serve the dashboard to a browser (textual-serve) instead."),
        port: Optional[int] = typer.Option(None, "--port", metavar="N", callback=int_flag(65535, 1),
                                           help=f"--web: the port (default {WEB_PORT})."),
        host: Optional[str] = typer.Option(None, "--host", metavar="H",
                                           help="--web: the address to listen on (default localhost; any other "
                                                "lets whoever reaches it launch and cancel runs).")):
    """The Textual dashboard: watch, launch, cancel, compare and browse runs."""
    readable_store(store)  # a store that does not exist yet is fine: the launch dialog makes it
    if not web and (port is not None or host is not None):
        fail("--port and --host are for --web")
    if web:
        serve_web(store, manifest, host or "localhost", WEB_PORT if port is None else port)
        return
    try:
        from tui.app import run_app  # the only place gaussreg touches textual
    except ImportError as e:
        fail(f"the TUI needs textual and textual-plotext ({e}); pip install -e .")
    run_app(str(store), str(manifest))


def serve_web(store: Path, manifest: Path, host: str, port: int) -> None:
    if host == "":
        fail("--host is empty; name an address (localhost, or 0.0.0.0 for every interface)")
    try:  # here: an optional extra that only --web needs
        from gaussreg.views import web_dashboard
    except ImportError as e:
        if not (e.name or "").startswith(("textual_serve", "aiohttp", "jinja2")):
            raise
        fail("--web needs textual-serve: pip install -e '.[web]' in the clone")
    if not web_dashboard.is_local(host):
        warn(f"listening on {host}: anyone who can reach port {port} there can launch and cancel runs "
             "(textual-serve has no login); use an SSH tunnel to localhost instead where you can")
    console.print(f"serving `gaussreg tui --store {escape(str(store))}` on http://{escape(host)}:{port} "
                  "(Ctrl+C stops it)", highlight=False, soft_wrap=True)
    try:
        web_dashboard.serve(store, manifest, host, port)
    except OSError as e:
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}")


# ---------------------------------------------------------------- data

@data_app.command("list")
def data_list(data_dir: Optional[Path] = DataDirOpt):
    """Each dataset, where it was found, and its sizes."""
    # the root on a line of its own, and the table at the width it needs: as the table's
    # title, or a folded cell, a path was split across lines in a pipe or log
    console.print(f"datasets (data root: {datasets.data_root(data_dir)})", markup=False, highlight=False)
    t = Table()
    for h in ("name", "shape", "classes", "found in", "train", "test"):
        t.add_column(h, overflow="fold")
    missing = []
    for name in datasets.DATASETS:
        d = data.describe(name, data_dir)
        t.add_row(name, d["shape"], str(d["classes"]), escape(str(d["where"])) if d["found"] else "[red]missing[/]",
                  str(d["train"] or "-"), str(d["test"] or "-"))
        if not d["found"]:
            missing.append(d["note"])
    print_whole(t)
    for note in missing:
        console.print(f"- {note}", highlight=False, markup=False)


@data_app.command("download")
def data_download(name: str = typer.Argument(..., help="mnist, fashion-mnist, cifar10 or cifar100."),
                  data_dir: Optional[Path] = DataDirOpt):
    """Make a dataset available (Debian package, torchvision, or the official files)."""
    if name not in datasets.DATASETS:
        fail(f"unknown dataset {name!r}; known: {', '.join(datasets.DATASETS)}")
    had = data.find(name, data_dir) is not None  # said once, below: "already" when it was there
    try:
        where = download.download(name, data_dir, log=lambda m: console.print(m, highlight=False, markup=False))
    except datasets.DataError as e:
        fail(str(e), 1)
    console.print(f"{name} is {'already ' if had else ''}available in {where}", markup=False, highlight=False)


class _GuardedOutput:
    """sys.stdout, whose write errors become OutputError: main() turns them into one
    sentence, and no reader of the store mistakes them for its own. A closed pipe stays a
    BrokenPipeError (survive_closed_output and click handle it: `gaussreg ls | head`)."""

    def __init__(self, stream):
        self._stream = stream

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(e.errno, e.strerror) from None

    def write(self, text):
        return self._guard(self._stream.write, text)

    def flush(self):
        return self._guard(self._stream.flush)

    def __getattr__(self, name):  # isatty, fileno, encoding, buffer...: the stream's own
        return getattr(self._stream, name)


def main():
    sys.stdout = _GuardedOutput(sys.stdout)
    try:
        try:
            app()
        finally:
            sys.stdout.flush()  # what is still buffered fails here, not at exit in a traceback
    except OutputError as e:
        stdout_gone()  # the interpreter's last flush must not fail again
        err_console.print(f"[bold red]error:[/] cannot write the output: {escape(e.strerror or str(e))}",
                          highlight=False, soft_wrap=True)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
