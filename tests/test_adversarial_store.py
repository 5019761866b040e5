"""Every reader of the store against every corruption of tests/adversarial/store_corruptions.toml:
a bad file makes its run 'corrupt' with a reason (or is skipped, for event lines), and
every other run, every command and the TUI keep working.

The corruptions of one run's files (spec.json, status.json, result.json, events.jsonl, lock)
share ONE store: a healthy completed baseline, a queued baseline (for the scheduler) and one
completed regularizer run per case (seed 100 + the case's index), each hit by its own
corruption, so every reader also shows that many corrupt runs side by side never stop the
others being read. A corruption of a store-wide file (`_experiments/fx.json`) would hit every
run of the store, so each of those cases gets a store of its own (same three runs, one target).

Each test reads such a store once and checks, for every case: the library (list_runs,
fair_table), `gaussreg ls`, `table` (4 formats), `show`, the TUI's watchers, a Scheduler
with its LiveView over every run, and a TUI session (table, each target's detail screen,
the compare screen). Failures name the case."""

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import pytest
from rich.console import Console
from conftest import gaussreg
from factories import dashboard_run, queued_run
from fake_worker import ARGV as FAKE
from test_tui import table, until, widget

from gaussreg.launch.scheduler import Scheduler, make_slots
from gaussreg.runs import reader
from gaussreg.runs.manifest import tomllib
from gaussreg.runs.store import RunDir, Store
from gaussreg.views import report
from gaussreg.views.live_view import LiveView
from tui.app import GaussregApp
from tui.screens import CompareScreen, RunDetailScreen, RunsScreen
from tui.watcher import RunDetailWatcher, StoreWatcher

HERE = Path(__file__).parent
CASES = tomllib.loads((HERE / "adversarial" / "store_corruptions.toml").read_text())["case"]
SEED0 = 100  # the target of CASES[i] has seed SEED0 + i (clear of the fake worker's named seeds)


def store_wide(case) -> bool:
    return case["file"].startswith("_")


# one store for every per-run case, one store each for the store-wide ones
GROUPS = [("per-run-files", [c for c in CASES if not store_wide(c)])] + \
         [(c["name"], [c]) for c in CASES if store_wide(c)]


def outside(st: Store, case) -> Path:
    """Where a symlink case's link points: a file outside the store, one per case."""
    name = f"nowhere-{case['name']}" if case.get("dangling") else f"outside-{case['name']}.txt"
    return (st.root.parent / name).resolve()


def corrupt(st: Store, target, case) -> Path:
    """Apply one corruption; returns the file it hit."""
    path = st.root / case["file"] if store_wide(case) else target.file(case["file"])
    kind = case.get("kind")
    if kind == "symlink":
        dest = outside(st, case)
        if not case.get("dangling"):
            dest.write_text("precious\n")
        path.unlink(missing_ok=True)
        path.symlink_to(dest)
        return path
    if kind == "directory":
        path.unlink(missing_ok=True)
        path.mkdir()
        return path
    if kind == "fifo":
        path.unlink(missing_ok=True)
        os.mkfifo(path)
        return path
    if kind == "huge":  # 3 GB that take no disk: a hole after a valid start
        with open(path, "r+b" if path.exists() else "wb") as f:
            f.truncate(3 << 30)
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


@dataclass
class BadStore:
    st: Store
    healthy: RunDir  # a completed baseline of experiment fx, test accuracy 0.90
    queued: RunDir  # a queued baseline (another setting) for the scheduler
    targets: List[Tuple[dict, RunDir]]  # (case, its completed regularizer run, hit by the case)


def build(root: Path, cases) -> BadStore:
    st = Store(root)
    st.write_experiment("fx", {"tolerance": 0.01})
    healthy = dashboard_run(st, "baseline", 0.90, 0.50)
    queued = queued_run(st, seed=1, experiment="fx")
    targets = [(c, dashboard_run(st, "regularizer", 0.92, 0.78, seed=SEED0 + CASES.index(c), sigma=0.5, alpha=1.0))
               for c in cases]
    assert len({t.id for _, t in targets} | {healthy.id, queued.id}) == len(targets) + 2
    for c, t in targets:
        corrupt(st, t, c)
    return BadStore(st, healthy, queued, targets)


def _files(root: Path) -> dict:
    """Everything under root: each link's target, each file's content."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p)] = ("link", os.readlink(p)) if p.is_symlink() else ("dir",) if p.is_dir() else \
            ("fifo",) if p.is_fifo() else ("huge", p.stat().st_size) if p.stat().st_size > 1 << 30 else \
            ("file", hashlib.sha1(p.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module", params=GROUPS, ids=[g for g, _ in GROUPS])
def bad_store(request, tmp_path_factory):
    """Built once per module and shared by the tests that only read it (the scheduler test,
    which writes, builds its own); that they wrote nothing is checked at the end."""
    b = build(tmp_path_factory.mktemp(request.param[0]) / "runs", request.param[1])
    before = _files(b.st.root.parent)
    yield b
    after = _files(b.st.root.parent)
    assert after == before, f"a reader changed the store: {sorted(set(after.items()) ^ set(before.items()))}"


class Problems:
    """Collects what went wrong for which case, so one test reports every failing case."""

    def __init__(self):
        self.items: List[str] = []

    def check(self, ok, case, what) -> None:
        if not ok:
            self.items.append(f"[{case['name']}] {what}")

    def done(self) -> None:
        assert not self.items, f"{len(self.items)} problem(s):\n" + "\n".join(self.items)


def _expect_row(p: Problems, row, case):
    if row is None:
        p.check(False, case, "its run is not listed")
    elif case["corrupt"]:
        p.check(row["state"] == "corrupt", case, f"state {row['state']!r}, not 'corrupt': {row}")
        p.check(case["reason"] in (row["error"] or ""), case, f"reason {case['reason']!r} not in {row['error']!r}")
    else:
        p.check(row["state"] != "corrupt", case, f"reads as corrupt: {row}")


def test_collect_and_fair_table(bad_store):
    b, p = bad_store, Problems()
    rows = {r["id"]: r for r in reader.list_runs(b.st)}
    assert rows[b.healthy.id]["state"] == "completed" and rows[b.healthy.id]["result"]["test_accuracy"] == 0.90
    for case, t in b.targets:
        _expect_row(p, rows.get(t.id), case)
    recs = report.fair_table(b.st, select="test")["experiments"]  # the fixtures have no validation R
    # the queued baseline has another setting (epochs, sigmas): its own comparison
    fx = next(r for r in recs if r["experiment"] == "fx" and r["baseline"] and b.healthy.id in r["baseline"]["run_ids"])
    assert fx["baseline"]["accuracy"] == 0.90
    # every target is the same configuration (seeds differ): its runs are the targets still
    # read as completed regularizer runs of fx, every other one left out
    def counts(row) -> bool:
        return (row is not None and row["state"] == "completed" and row["spec"]["method"] == "regularizer"
                and row["spec"]["experiment"] == "fx")
    expected = sorted(t.id for _, t in b.targets if counts(rows.get(t.id)))
    regs = [e for e in fx["best"] if e["method"] == "regularizer"]
    got = regs[0]["run_ids"] if regs else []
    for case, t in b.targets:
        p.check((t.id in got) == (t.id in expected), case,
                f"{'in' if t.id in got else 'not in'} the fair table, read as {rows.get(t.id, {}).get('state')!r}")
    p.done()
    assert len(regs) <= 1 and got == expected, (regs, expected)


def test_cli_ls(bad_store):
    b, p = bad_store, Problems()
    r = gaussreg("ls", "--store", b.st.root, "--format", "json")
    assert r.exit_code == 0, r.output
    rows = {x["id"]: x for x in json.loads(r.stdout)}
    assert rows[b.healthy.id]["state"] == "completed"
    for case, t in b.targets:
        _expect_row(p, rows.get(t.id), case)
    r = gaussreg("ls", "--store", b.st.root)
    assert r.exit_code == 0 and b.healthy.id in r.stdout, r.output
    for case, t in b.targets:
        p.check(t.id in r.stdout, case, "not in `ls`")
    p.done()


@pytest.mark.parametrize("fmt", ["table", "json", "csv", "markdown"])
def test_cli_table(bad_store, fmt):
    b = bad_store
    r = gaussreg("table", "--store", b.st.root, "--format", fmt)
    assert r.exit_code == 0 and ("90.00" in r.stdout or "0.9" in r.stdout), r.output
    for case, _ in b.targets:
        if case["file"].startswith("_experiments") and fmt == "table":
            # the default tolerance is used, and said
            assert "warning:" in r.stderr and "fx.json" in r.stderr, (case["name"], r.stderr)


def test_cli_show(bad_store):
    b, p = bad_store, Problems()
    r = gaussreg("show", b.healthy.id, "--store", b.st.root)
    assert r.exit_code == 0 and "test accuracy 90.00%" in r.stdout, r.output
    for case, t in b.targets:
        r = gaussreg("show", t.id, "--store", b.st.root)
        if case["corrupt"]:
            p.check(r.exit_code == 2 and case["reason"] in " ".join(r.stderr.split()), case,
                    f"exit {r.exit_code}, stderr {r.stderr!r}")
            p.check(r.stderr.count("\n") <= 3, case, f"not one sentence: {r.stderr!r}")  # folded, no traceback
        else:
            p.check(r.exit_code == 0 and t.id in r.stdout, case, f"exit {r.exit_code}: {r.output!r}")
    p.done()


def test_watcher_and_detail_tail(bad_store):
    b, p = bad_store, Problems()
    rows = {r.id: r for r in StoreWatcher(b.st.root).scan()}
    assert rows[b.healthy.id].state == "completed" and rows[b.healthy.id].test_acc == 0.90
    for case, t in b.targets:
        p.check(t.id in rows and (rows[t.id].state == "corrupt") == case["corrupt"], case,
                f"StoreWatcher row {rows.get(t.id)}")
        d = RunDetailWatcher(t).poll()
        p.check((d.status["state"] == "corrupt") == case["corrupt"], case, f"detail status {d.status}")
        p.check(all(isinstance(e["epoch"], int) and isinstance(e["train_loss"], float) for e in d.epochs), case,
                f"bad epochs {d.epochs}")
        if not case["corrupt"] and "events" not in case["file"]:
            p.check([e["epoch"] for e in d.epochs] == [1, 2, 3], case, f"epochs {d.epochs}")
    p.done()


@pytest.mark.process
@pytest.mark.parametrize("group", GROUPS, ids=[g for g, _ in GROUPS])
def test_scheduler_and_live_view_go_on(group, tmp_path):
    """A fresh store (the scheduler writes): every target, then the queued and the healthy run."""
    b, p = build(tmp_path / "runs", group[1]), Problems()
    ids = [t.id for _, t in b.targets] + [b.queued.id, b.healthy.id]
    out = io.StringIO()
    with LiveView(len(ids), Console(file=out, width=120)) as view:
        sched = Scheduler(b.st, ids, make_slots([], max_parallel=2), worker_argv=FAKE,
                          on_change=view.on_change, poll_s=0.05)
        summary = sched.run()
    assert sched.view_error is None
    assert summary.outcomes[b.queued.id].state == "completed" and summary.outcomes[b.healthy.id].state == "completed"
    for case, t in b.targets:
        p.check(t.id in summary.outcomes, case, "no outcome")
        if case["corrupt"] and case["file"] in ("spec.json", "status.json") and t.id in summary.outcomes:
            p.check(summary.outcomes[t.id].state == "failed", case, f"outcome {summary.outcomes[t.id]}")
        if case.get("kind") == "symlink":  # nothing written through the link
            dest = outside(b.st, case)
            if case.get("dangling"):
                p.check(not dest.exists(), case, f"{dest} was created through the link")
            else:
                p.check(dest.read_text() == "precious\n", case, f"{dest} was written through the link")
    p.done()


def _plain(renderable) -> str:
    """What a Rich renderable (the detail panel is a label/value grid) shows, as text."""
    c = Console(width=200, file=io.StringIO(), record=True)
    c.print(renderable)
    return c.export_text()


async def _until(pilot, cond, case, what):
    try:
        await until(pilot, cond)
    except AssertionError:
        raise AssertionError(f"[{case['name']}] {what}: not in time") from None


async def test_tui(bad_store):
    """One session: the runs table, each target's detail screen, then the compare screen."""
    b, p = bad_store, Problems()
    app = GaussregApp(str(b.st.root), poll_s=0.05)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: app.loaded and table(app).row_count == 2 + len(b.targets))
        t = table(app)
        assert t.get_cell(b.healthy.id, "state").plain == "completed"
        for case, run in b.targets:
            state = t.get_cell(run.id, "state").plain
            p.check((state == "corrupt") == case["corrupt"], case, f"table state {state!r}")
        for case, run in b.targets:
            table(app).move_cursor(row=table(app).get_row_index(run.id))
            await pilot.press("enter")
            await _until(pilot, lambda: isinstance(app.screen, RunDetailScreen), case, "detail screen")
            p.check(app.screen.run_id == run.id, case, f"detail of {app.screen.run_id}")
            status = await widget(pilot, RunDetailScreen, "#status")
            await _until(pilot, lambda: "state" in _plain(status.content), case, "status shown")
            text = _plain(status.content)
            p.check(("corrupt" in text) == case["corrupt"], case, f"detail status {text!r}")
            await pilot.press("escape")
            await _until(pilot, lambda: isinstance(app.screen, RunsScreen), case, "back to the runs")
        table(app).move_cursor(row=table(app).get_row_index(b.healthy.id))
        await pilot.press("c")
        title = await widget(pilot, CompareScreen, "#compare-title")
        await until(pilot, lambda: "baseline acc 90.00%" in str(title.render()))
        await pilot.press("escape")
        assert app.return_code is None  # nothing crashed the app
    p.done()
