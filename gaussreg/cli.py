"""The `gaussreg` command line."""

from __future__ import annotations

import errno
import json
import math
import os
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Train networks robust to Gaussian input noise and compare them fairly.")
data_app = typer.Typer(no_args_is_help=True, help="List and fetch datasets.")
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)

EXIT_BAD_INPUT = 2
BIG_GRID = 1000  # a grid larger than this is more likely a typo than a plan: ask for --yes
StoreOpt = typer.Option(Path("runs"), "--store", help="The run store folder.")
DataDirOpt = typer.Option(None, "--data-dir", help="Data root (default: $GAUSSREG_DATA, else ./data).")


def fail(message: str, code: int = EXIT_BAD_INPUT):
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def writable_store(store: Path) -> None:
    """The store folder exists (made if needed) and this user may write it; else one sentence, exit 2."""
    if store.exists() and not store.is_dir():
        fail(f"--store {store} is a file, not a folder")
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the store folder {store} ({e.strerror})")
    if not os.access(store, os.W_OK | os.X_OK):
        fail(f"the store folder {store} is not writable by this user")


def readable_store(store: Path) -> None:
    if store.exists() and not store.is_dir():
        fail(f"--store {store} is a file, not a folder")


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


def survive_closed_output(fn):
    def call(*args, **kw):
        try:
            return fn(*args, **kw)
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


class ListFormat(str, Enum):
    table = "table"
    json = "json"


# ---------------------------------------------------------------- run

@app.command()
def run(manifest: Path = typer.Argument(Path("experiments.toml"), help="The experiment manifest (TOML)."),
        store: Path = StoreOpt,
        only: Optional[str] = typer.Option(None, help="Only experiments, run ids or methods matching this glob."),
        gpus: str = typer.Option("all", help="'all' (every visible GPU; none on a CPU box), 'none', or '0,1'."),
        per_gpu: int = typer.Option(1, "--per-gpu", help="Runs sharing one GPU."),
        max_parallel: Optional[int] = typer.Option(None, "--max-parallel",
                                                   help="At most this many runs at once (CPU default: 1)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="List the expanded runs and their ids; launch nothing."),
        rerun: bool = typer.Option(False, "--rerun", help="Train finished runs again."),
        follow: bool = typer.Option(True, "--follow/--detach",
                                    help="Watch until done (default), or start in the background and return."),
        data_dir: Optional[Path] = DataDirOpt,
        yes: bool = typer.Option(False, "--yes", help=f"Launch a grid of more than {BIG_GRID} runs.")):
    """Run every configuration of a manifest, one worker process per run, then print the fair table."""
    from . import data, manifest as mf, report
    from .scheduler import Scheduler, make_slots, parse_gpus
    from .store import Store

    try:
        m = mf.load(manifest, data_dir=str(data_dir) if data_dir else None)
    except mf.ManifestError as e:
        fail(str(e))
    runs = m.select(only)
    if not runs:
        fail(f"--only {only!r} matches no experiment, run id or method in {manifest}")
    try:
        slots = make_slots(parse_gpus(gpus), per_gpu, max_parallel)
    except ValueError as e:
        fail(str(e))
    readable_store(store)
    st = Store(store)
    if dry_run:
        t = Table(title=escape(f"{len(runs)} runs from {manifest} on {len(slots)} slot(s)"), title_justify="left")
        for h in ("run id", "dataset", "model", "method", "params", "state"):
            t.add_column(h, overflow="fold")
        from .spec import describe_params
        from .store import RunDir, RunFileError
        for r in runs:
            rd = RunDir(st.root / r.id)
            try:
                state = rd.state() if rd.file("spec.json").exists() else "new"
            except RunFileError as e:
                state = f"corrupt: {e}"
            t.add_row(escape(r.id), r.spec["dataset"], r.spec["model"], r.spec["method"],
                      escape(describe_params(r.spec)), state)
        console.print(t)
        return
    for name in sorted({r.spec["dataset"] for r in runs} - {"synthetic"}):
        if data.find(name, data_dir) is None:
            fail(data.missing_message(name, data_dir))
    if len(runs) > BIG_GRID and not yes:
        fail(f"{manifest} expands to {len(runs)} runs (more than {BIG_GRID}); check the grid with --dry-run, "
             "then add --yes to launch them all")
    writable_store(store)  # after every check of the input: a bad manifest or dataset writes nothing
    if not follow:
        _detach(manifest, store, only, gpus, per_gpu, max_parallel, rerun, data_dir)
        return
    try:
        for e in m.experiments:
            if any(r.spec["experiment"] == e.name for r in runs):
                st.write_experiment(e.name, {"name": e.name, "tolerance": e.tolerance,
                                             "manifest": str(Path(manifest).resolve())})
        for r in runs:
            st.create(r.spec, r.id)
    except OSError as e:  # a full disk, a file where a run folder should be: nothing launched
        fail(f"cannot write the run directories in {store} ({e.strerror}{': ' + str(e.filename) if e.filename else ''})")
    from .live import LiveView
    survive_closed_output(console.print)(f"{len(runs)} runs from {manifest} into {st.root}/ on "
                  f"{', '.join('gpu ' + s.gpu if s.gpu else 'cpu' for s in slots)}"
                  f" ({slots[0].threads} thread(s) each)", markup=False)
    view = LiveView(len(runs), console)
    survive_closed_output(view.__enter__)()
    try:
        summary = Scheduler(st, [r.id for r in runs], slots, rerun=rerun,
                            on_change=survive_closed_output(view.on_change)).run()
    finally:
        survive_closed_output(view.__exit__)(None, None, None)
    survive_closed_output(_print_outcome)(summary, st, runs)
    raise typer.Exit(summary.exit_code())


def _print_outcome(summary, st, runs):
    from . import report
    for o in summary.outcomes.values():
        if o.state in ("failed", "diverged") and o.log_tail:
            console.print(f"[red]{o.state}[/] {escape(o.run_id)}: {escape(o.error or '')}\n[dim]{escape(o.log_tail)}[/]",
                          highlight=False)
    if summary.interrupted:
        console.print("[yellow]interrupted:[/] running workers were cancelled (their last.pt is kept); "
                      "run the same command again to resume them.")
    exps = sorted({r.spec["experiment"] for r in runs})
    for e in exps:
        console.print(report.render_rich(report.fair_table(st, e)))


def _detach(manifest, store, only, gpus, per_gpu, max_parallel, rerun, data_dir):
    from .scheduler import detach_run
    from .store import Store
    argv = [str(manifest), "--store", str(store), "--gpus", gpus, "--per-gpu", str(per_gpu)]
    argv += ["--only", only] if only else []
    argv += ["--max-parallel", str(max_parallel)] if max_parallel else []
    argv += ["--rerun"] if rerun else []
    argv += ["--yes"]  # the size was accepted here
    argv += ["--data-dir", str(data_dir)] if data_dir else []
    info = detach_run(argv, Store(store), only or str(manifest))
    console.print(f"started in the background (pid {info['pid']}); log: {info['log']}\n"
                  f"watch with `gaussreg ls --store {store}` or `gaussreg table --store {store}`", markup=False)


# ---------------------------------------------------------------- reading the store

@app.command()
def table(store: Path = StoreOpt,
          experiment: Optional[str] = typer.Option(None, help="Only this experiment."),
          tolerance: Optional[float] = typer.Option(None, help="Override the manifest's tolerance (a fraction)."),
          format: TableFormat = typer.Option(TableFormat.table, "--format", help="table, markdown, csv or json.")):
    """The fair comparison: among runs within `tolerance` of the baseline's accuracy, the most robust per method."""
    from . import report
    from .store import Store
    if tolerance is not None and not 0 <= tolerance <= 1:
        fail(f"--tolerance must be a fraction in [0, 1], not {tolerance}")
    readable_store(store)
    if not store.is_dir():
        fail(f"the store {store} does not exist")
    t = report.fair_table(Store(store), experiment, tolerance)
    if tolerance is None:
        for rec in t["experiments"]:
            why = Store(store).experiment(rec["experiment"]).get("error")
            if why:
                err_console.print(f"[yellow]warning:[/] {escape(why)}; using tolerance {rec['tolerance']:g}",
                                  highlight=False, soft_wrap=True)
    if experiment and not t["experiments"]:
        fail(f"no runs of experiment {experiment!r} in {store}")
    if format == TableFormat.json:
        print(json.dumps(t, indent=2))
    elif format == TableFormat.markdown:
        print(report.render_markdown(t))
    elif format == TableFormat.csv:
        print(report.render_csv(t), end="")
    else:
        console.print(report.render_rich(t))


@app.command("ls")
def ls(store: Path = StoreOpt,
       state: Optional[str] = typer.Option(None, help="Only runs in this state."),
       format: ListFormat = typer.Option(ListFormat.table, "--format", help="table or json.")):
    """List the runs of a store."""
    from . import report
    from .spec import describe_params
    from .store import STATES, Store
    readable_store(store)
    if state and state not in STATES + ("corrupt",):
        fail(f"--state must be one of {', '.join(STATES)}, not {state!r}")
    rows = [r for r in report.collect(Store(store)) if not state or r["state"] == state]
    if format == ListFormat.json:
        print(json.dumps([{"id": r["id"], "state": r["state"], "spec": r["spec"], "result": r["result"],
                           "error": r["error"]} for r in rows], indent=2))
        return
    t = Table(title=escape(f"{len(rows)} runs in {store}"), title_justify="left", box=None, header_style="bold")
    t.add_column("run id", no_wrap=True)
    t.add_column("data/model", overflow="fold")
    t.add_column("params", overflow="fold")
    for h in ("state", "acc %", "R %"):
        t.add_column(h, no_wrap=True, justify="right" if "%" in h else "left")
    from .live import STATE_STYLE
    for r in rows:
        s, res = r["spec"] or {}, r["result"] or {}
        t.add_row(escape(r["id"]), escape(f"{s.get('dataset', '?')}/{s.get('model', '?')}"),
                  escape(describe_params(s) if s else r.get("error") or ""),
                  f"[{STATE_STYLE.get(r['state'], 'red')}]{r['state']}[/]",
                  f"{res['test_accuracy'] * 100:.2f}" if res else "-", f"{res['robustness'] * 100:.2f}" if res else "-")
    console.print(t)


def _get_run(store: Path, run_id: str):
    from .store import RunFileError, Store
    readable_store(store)
    try:
        return Store(store).get(run_id)
    except RunFileError as e:
        fail(str(e))


@app.command()
def show(run_id: str = typer.Argument(..., help="A run id (or a unique prefix)."), store: Path = StoreOpt):
    """A run's spec, status, last epoch, result and log tail."""
    from .store import RunFileError
    run = _get_run(store, run_id)
    try:
        spec, status, result = run.spec(), run.status(), run.result()
        state = run.state(status)
    except RunFileError as e:
        fail(str(e))
    epochs = run.epochs()
    console.rule(escape(f"{run.id}  [{state}]"))
    console.print_json(json.dumps({"spec": spec, "status": {**status, "state": state}}))
    if epochs:
        e = epochs[-1]
        console.print(f"epoch {e['epoch']}: train loss {e['train_loss']:.4f}, val loss {e['val_loss']:.4f}, "
                      f"val acc {e['val_accuracy'] * 100:.2f}%, lr {e['lr']:.3g}, {e['images_per_s']:.0f} img/s")
    if result:
        wall = result.get("wall_time_s")
        console.print(f"test accuracy {result['test_accuracy'] * 100:.2f}%, robustness {result['robustness'] * 100:.2f}%"
                      f", best epoch {result.get('best_epoch', '?')} of {result.get('epochs_run', '?')}, "
                      + (f"{wall:.1f}s " if wall is not None else "")
                      + f"on {result.get('device_name', '?')}", highlight=False, markup=False)
    tail = run.log_tail(15)
    if tail:
        console.rule("worker.log")
        console.print(tail, highlight=False, markup=False)


@app.command()
def cancel(run_id: str = typer.Argument(..., help="A run id (or a unique prefix)."), store: Path = StoreOpt):
    """Ask a running run's worker to stop (SIGTERM): it saves last.pt and becomes cancelled."""
    from .scheduler import ControlError, cancel_run
    run = _get_run(store, run_id)
    try:
        pid = cancel_run(run)
    except ControlError as e:
        fail(str(e))
    console.print(f"sent SIGTERM to the worker of {run.id} (pid {pid})", markup=False)


def _parse_sigmas(text: Optional[str]) -> Optional[List[float]]:
    if not text:
        return None
    try:
        if ":" in text:
            lo, hi, n = text.split(":")
            lo, hi, n = float(lo), float(hi), int(n)
            if n < 1 or n > 10_000:
                fail(f"--sigmas {text!r}: the COUNT of START:STOP:COUNT must be from 1 to 10000, not {n}")
            import torch
            vals = torch.linspace(lo, hi, n, dtype=torch.float64).tolist()
        else:
            vals = [float(v) for v in text.split(",")]
    except ValueError:
        fail(f"--sigmas must be a list like '0,0.1,0.2' or a range START:STOP:COUNT, not {text!r}")
    if not all(math.isfinite(v) and v >= 0 for v in vals):
        fail(f"--sigmas must be finite numbers >= 0, not {text!r}")
    return vals


@app.command("eval")
def eval_(target: str = typer.Argument(..., help="A run id, or a checkpoint file inside a run directory."),
          store: Path = StoreOpt,
          sigmas: Optional[str] = typer.Option(None, help="'0,0.1,0.2' or START:STOP:COUNT (default 0:0.5:30)."),
          samples: int = typer.Option(1, help="Noise draws per image and sigma; all must agree."),
          seed: int = typer.Option(0),
          clip: bool = typer.Option(False, help="Clip noisy images to [0,1]."),
          device: str = typer.Option("auto"),
          data_dir: Optional[Path] = DataDirOpt,
          format: ListFormat = typer.Option(ListFormat.table, "--format")):
    """Re-evaluate robustness of a trained run (best.pt) or checkpoint on its test set."""
    import torch
    from . import data
    from .models import build_model
    from .robustness import robustness
    from .spec import SpecError, resolve
    from .store import RunDir, RunFileError
    from .worker import pick_device
    p = Path(target)
    if p.is_file():
        run, ckpt = RunDir(p.parent), p
    else:
        run = _get_run(store, target)
        ckpt = run.file("best.pt")
    from .spec import MAX_SAMPLES, valid_device
    if not 1 <= samples <= MAX_SAMPLES:
        fail(f"--samples must be from 1 to {MAX_SAMPLES}, not {samples}")
    if not valid_device(device):
        fail(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    sig = _parse_sigmas(sigmas)
    try:
        spec = resolve(run.spec())
        dev = pick_device(device)
    except (SpecError, RunFileError) as e:
        fail(str(e))
    if not ckpt.is_file():
        fail(f"{ckpt} does not exist (has the run finished an epoch?)")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    except Exception as e:
        fail(f"{ckpt} is not a gaussreg checkpoint ({type(e).__name__}: {e})")
    try:
        splits = data.load(spec["dataset"], data_dir or spec["data_dir"], split_seed=spec["split_seed"],
                           test_subset=spec["test_subset"], device=dev)
    except data.DataError as e:
        fail(str(e))
    model = build_model(spec["model"], splits.info).to(dev)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"{ckpt} does not fit the run's model {spec['model']} on {spec['dataset']} ({first})")
    r = robustness(model, splits.test_x, splits.test_y, sigmas=sig, samples=samples, seed=seed, clip=clip)
    if format == ListFormat.json:
        print(json.dumps({"run_id": run.id, "checkpoint": str(ckpt), **r.to_dict()}, indent=2))
        return
    t = Table(title=escape(f"{run.id}: clean acc {r.clean_accuracy * 100:.2f}%, robustness R {r.score * 100:.2f}%"),
              title_justify="left")
    for h in ("sigma", "consistency %", "accuracy %"):
        t.add_column(h, justify="right")
    for s, c, a in zip(r.sigmas, r.per_sigma, r.accuracy_per_sigma):
        t.add_row(f"{s:.4f}", f"{c * 100:.2f}", f"{a * 100:.2f}")
    console.print(t)


@app.command()
def train(run_dir: Path = typer.Argument(..., help="A run directory holding spec.json."),
          resume: bool = typer.Option(False, "--resume", help="Continue from last.pt."),
          force: bool = typer.Option(False, "--force", "--rerun",
                                     help="Train a completed run again (its result.json and best.pt are replaced).")):
    """Train one run directory in this process (what `gaussreg run` starts per run)."""
    from .store import RunDir, RunFileError
    from .worker import main as worker_main
    if not run_dir.is_dir():
        fail(f"{run_dir} is not a run directory")
    if not os.access(run_dir, os.W_OK | os.X_OK):
        fail(f"the run directory {run_dir} is not writable by this user")
    run = RunDir(run_dir)
    try:
        state = run.state()  # the worker checks the spec itself
    except RunFileError as e:
        fail(str(e))
    if state in ("completed", "diverged") and not force:
        fail(f"run {run.id} is {state}; training it again replaces its result.json and best.pt "
             "(add --force to do that)")
    raise typer.Exit(worker_main([str(run_dir)] + (["--resume"] if resume else [])))


@app.command()
def tui(store: Path = StoreOpt,
        manifest: Path = typer.Option(Path("experiments.toml"), help="The manifest the launch dialog opens.")):
    """The Textual dashboard: watch, launch, cancel, compare and browse runs."""
    try:
        from tui.app import run_app  # the only place gaussreg touches textual
    except ImportError as e:
        fail(f"the TUI needs textual and textual-plotext ({e}); pip install -e .")
    run_app(str(store), str(manifest))


# ---------------------------------------------------------------- data

@data_app.command("list")
def data_list(data_dir: Optional[Path] = DataDirOpt):
    """Each dataset, where it was found, and its sizes."""
    from . import data
    t = Table(title=f"datasets (data root: {data.data_root(data_dir)})", title_justify="left")
    for h in ("name", "shape", "classes", "found in", "train", "test"):
        t.add_column(h, overflow="fold")
    missing = []
    for name in data.DATASETS:
        d = data.describe(name, data_dir)
        t.add_row(name, d["shape"], str(d["classes"]), escape(str(d["where"])) if d["found"] else "[red]missing[/]",
                  str(d["train"] or "-"), str(d["test"] or "-"))
        if not d["found"]:
            missing.append(d["note"])
    console.print(t)
    for note in missing:
        console.print(f"- {note}", highlight=False, markup=False)


@data_app.command("download")
def data_download(name: str = typer.Argument(..., help="mnist, fashion-mnist, cifar10 or cifar100."),
                  data_dir: Optional[Path] = DataDirOpt):
    """Make a dataset available (Debian package, torchvision, or the official files)."""
    from . import data
    if name not in data.DATASETS:
        fail(f"unknown dataset {name!r}; known: {', '.join(data.DATASETS)}")
    try:
        where = data.download(name, data_dir, log=lambda m: console.print(m, highlight=False, markup=False))
    except data.DataError as e:
        fail(str(e), 1)
    console.print(f"{name} is available in {where}", markup=False)


def main():
    app()


if __name__ == "__main__":
    main()
