"""Every reader of the store against every corruption of tests/adversarial/store_corruptions.toml:
a bad file makes its run 'corrupt' with a reason (or is skipped, for event lines), and
every other run, every command and the TUI keep working."""

import io
import json
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from gaussreg import report
from gaussreg.cli import app as cli_app
from gaussreg.live_view import LiveView
from gaussreg.manifest import tomllib
from gaussreg.scheduler import Scheduler, make_slots
from gaussreg.spec import resolve, run_id
from gaussreg.store import Store
from test_tui import add_run, table, until
from tui.app import GaussregApp
from tui.screens import CompareScreen, RunDetailScreen, RunsScreen
from tui.watcher import RunDetailWatcher, StoreWatcher

HERE = Path(__file__).parent
CASES = tomllib.loads((HERE / "adversarial" / "store_corruptions.toml").read_text())["case"]
FAKE = [sys.executable, str(HERE / "fake_worker.py")]


def corrupt(st: Store, target, case) -> Path:
    """Apply one corruption; returns the file it hit."""
    path = st.root / case["file"] if case["file"].startswith("_") else target.file(case["file"])
    kind = case.get("kind")
    if kind == "symlink":
        outside = (st.root.parent / "outside.txt").resolve()
        outside.write_text("precious\n")
        path.unlink(missing_ok=True)
        path.symlink_to(outside if not case.get("dangling") else outside.with_name("nowhere"))
        return path
    if kind == "directory":
        path.unlink(missing_ok=True)
        path.mkdir()
        return path
    if "hex" in case:
        payload = bytes.fromhex(case["hex"])
    elif case["text"] == "deep":
        payload = b"[" * 100_000 + b"]" * 100_000
    else:
        payload = case["text"].encode() + (b"\n" if case.get("append") else b"")
    with open(path, "ab" if case.get("append") else "wb") as f:
        f.write(payload)
    return path


@pytest.fixture(params=CASES, ids=[c["name"] for c in CASES])
def bad_store(request, tmp_path, monkeypatch):
    """A store of experiment fx with a completed baseline (the healthy run), a queued
    baseline (for the scheduler) and a completed regularizer run hit by the corruption."""
    monkeypatch.chdir(tmp_path)
    st = Store("runs")
    st.write_experiment("fx", {"tolerance": 0.01})
    healthy = add_run(st, "baseline", 0.90, 0.50)
    target = add_run(st, "regularizer", 0.92, 0.78, sigma=0.5, alpha=1.0)
    spec = resolve({"dataset": "synthetic", "model": "mlp", "method": "baseline", "seed": 1, "experiment": "fx"})
    queued = st.create(spec, run_id(spec))
    corrupt(st, target, request.param)
    return st, healthy, target, queued, request.param


def cli(*args):
    r = CliRunner().invoke(cli_app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"gaussreg {' '.join(map(str, args))} raised {r.exception!r}") from r.exception
    return r


def _expect_row(row, case):
    if case["corrupt"]:
        assert row["state"] == "corrupt", row
        assert case["reason"] in row["error"], row["error"]
    else:
        assert row["state"] != "corrupt", row


def test_collect_and_fair_table(bad_store):
    st, healthy, target, queued, case = bad_store
    rows = {r["id"]: r for r in report.list_runs(st)}
    assert rows[healthy.id]["state"] == "completed" and rows[healthy.id]["result"]["test_accuracy"] == 0.90
    _expect_row(rows[target.id], case)
    recs = report.fair_table(st, select="test")["experiments"]  # the fixtures have no validation R
    # the queued baseline has another setting (epochs, sigmas): its own comparison
    fx = next(r for r in recs if r["experiment"] == "fx" and r["baseline"] and healthy.id in r["baseline"]["run_ids"])
    assert fx["baseline"]["accuracy"] == 0.90
    regs = [e for e in fx["best"] if e["method"] == "regularizer"]
    t = rows[target.id]
    assert bool(regs) == (t["state"] == "completed" and t["spec"]["method"] == "regularizer"
                          and t["spec"]["experiment"] == "fx")


def test_cli_ls(bad_store):
    st, healthy, target, queued, case = bad_store
    r = cli("ls", "--store", st.root, "--format", "json")
    assert r.exit_code == 0
    rows = {x["id"]: x for x in json.loads(r.stdout)}
    assert rows[healthy.id]["state"] == "completed"
    _expect_row(rows[target.id], case)
    r = cli("ls", "--store", st.root)
    assert r.exit_code == 0 and healthy.id in r.stdout and target.id in r.stdout


@pytest.mark.parametrize("fmt", ["table", "json", "csv", "markdown"])
def test_cli_table(bad_store, fmt):
    st, healthy, target, queued, case = bad_store
    r = cli("table", "--store", st.root, "--format", fmt)
    assert r.exit_code == 0 and ("90.00" in r.stdout or "0.9" in r.stdout)
    if case["file"].startswith("_experiments") and fmt == "table":
        assert "warning:" in r.stderr and "fx.json" in r.stderr  # the default tolerance is used, and said


def test_cli_show(bad_store):
    st, healthy, target, queued, case = bad_store
    r = cli("show", healthy.id, "--store", st.root)
    assert r.exit_code == 0 and "test accuracy 90.00%" in r.stdout
    r = cli("show", target.id, "--store", st.root)
    if case["corrupt"]:
        assert r.exit_code == 2 and case["reason"] in " ".join(r.stderr.split())
        assert r.stderr.count("\n") <= 3  # one sentence (folded), no traceback
    else:
        assert r.exit_code == 0 and target.id in r.stdout


def test_watcher_and_detail_tail(bad_store):
    st, healthy, target, queued, case = bad_store
    rows = {r.id: r for r in StoreWatcher(st.root).scan()}
    assert rows[healthy.id].state == "completed" and rows[healthy.id].test_acc == 0.90
    assert (rows[target.id].state == "corrupt") == case["corrupt"]
    d = RunDetailWatcher(target).poll()
    assert (d.status["state"] == "corrupt") == case["corrupt"]
    assert all(isinstance(e["epoch"], int) and isinstance(e["train_loss"], float) for e in d.epochs)
    if not case["corrupt"] and "events" not in case["file"]:
        assert [e["epoch"] for e in d.epochs] == [1, 2, 3]


def test_scheduler_and_live_view_go_on(bad_store):
    st, healthy, target, queued, case = bad_store
    out = io.StringIO()
    with LiveView(3, Console(file=out, width=120)) as view:
        sched = Scheduler(st, [target.id, queued.id, healthy.id], make_slots([], max_parallel=1), worker_argv=FAKE,
                          on_change=view.on_change, poll_s=0.05)
        summary = sched.run()
    assert sched.view_error is None
    assert summary.outcomes[queued.id].state == "completed" and summary.outcomes[healthy.id].state == "completed"
    assert target.id in summary.outcomes
    if case["corrupt"] and case["file"] in ("spec.json", "status.json"):
        assert summary.outcomes[target.id].state == "failed"
    if case.get("kind") == "symlink":  # nothing written through the link
        assert (st.root.parent / "outside.txt").read_text() == "precious\n"


def _plain(renderable) -> str:
    """What a Rich renderable (the detail panel is a label/value grid) shows, as text."""
    import io
    from rich.console import Console
    c = Console(width=200, file=io.StringIO(), record=True)
    c.print(renderable)
    return c.export_text()


async def test_tui(bad_store):
    st, healthy, target, queued, case = bad_store
    app = GaussregApp(str(st.root), poll_s=0.05)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: app.loaded and table(app).row_count == 3)
        t = table(app)
        assert t.get_cell(healthy.id, "state").plain == "completed"
        assert (t.get_cell(target.id, "state").plain == "corrupt") == case["corrupt"]
        t.move_cursor(row=t.get_row_index(target.id))
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, RunDetailScreen))
        status = app.screen.query_one("#status")
        await until(pilot, lambda: "state" in _plain(status.content))
        assert ("corrupt" in _plain(status.content)) == case["corrupt"]
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, RunsScreen))
        table(app).move_cursor(row=table(app).get_row_index(healthy.id))
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, CompareScreen))
        title = app.screen.query_one("#compare-title")
        await until(pilot, lambda: "baseline acc 90.00%" in str(title.render()))
        await pilot.press("escape")
        assert app.return_code is None  # nothing crashed the app
