"""The dashboard, driven with App.run_test and Pilot on fixture stores."""

import asyncio
import json
import os
import socket
import subprocess
import time

import pytest

from conftest import cli, python_env
from gaussreg.scheduler import start_worker
from gaussreg.spec import resolve, run_id
from gaussreg.store import Store, atomic_write_json
from tui.app import GaussregApp
from tui.screens import CompareScreen, LaunchScreen, RunDetailScreen, RunsScreen
from tui.widgets import RunsTable, SeriesPlot

T0 = "2026-01-01T10:00:00.000+00:00"
T1 = "2026-01-01T10:02:05.000+00:00"
SIGMAS = [0.0, 0.25, 0.5]


def _epoch(e, loss, val, acc):
    return {"type": "epoch", "time": T0, "epoch": e, "train_loss": loss, "train_terms": {"ce": loss},
            "val_loss": val, "val_ce": val, "val_accuracy": acc, "lr": 1e-3, "epoch_time": 1.0,
            "images_per_s": 1000.0, "best": True}


def add_run(st, method, acc=None, rob=None, state="completed", seed=0, epochs=3, **params):
    spec = resolve({"dataset": "synthetic", "model": "mlp", "method": method, "params": params, "seed": seed,
                    "experiment": "fx", "max_epochs": epochs, "robustness": {"sigmas": SIGMAS}})
    run = st.create(spec, run_id(spec))
    status = {"state": state, "pid": 1, "host": "elsewhere", "device": "cpu", "started_at": T0, "updated_at": T1,
              "finished_at": T1, "epoch": epochs, "max_epochs": epochs, "error": None}
    events = [_epoch(e, 2.0 / e, 2.5 / e, 0.5 + 0.1 * e) for e in range(1, epochs + 1)]
    if state == "completed":
        res = {"test_accuracy": acc, "robustness": rob, "sigmas": SIGMAS, "per_sigma": [1.0, rob, rob - 0.2],
               "accuracy_per_sigma": [acc, acc - 0.1, acc - 0.3], "best_epoch": epochs, "epochs_run": epochs,
               "best_val_accuracy": events[-1]["val_accuracy"], "val_robustness": rob, "test_loss": 0.5}
        atomic_write_json(run.file("result.json"), res)
        events.append({"type": "test", "time": T1, "test_accuracy": acc, "robustness": rob, "sigmas": SIGMAS,
                       "per_sigma": res["per_sigma"], "accuracy_per_sigma": res["accuracy_per_sigma"]})
    if state == "failed":
        status["error"] = "boom: simulated failure"
        events = events[:1]
    run.write_status(status)
    run.file("events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    run.file("worker.log").write_text(f"{T0} start {run.id}\n{T1} {state}\n")
    return run


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the app shows the store path: keep it the same in every run
    st = Store("runs")
    st.write_experiment("fx", {"tolerance": 0.01})
    add_run(st, "baseline", 0.90, 0.50)
    add_run(st, "augment", 0.905, 0.70, sigma=0.25, folds=2)
    add_run(st, "regularizer", 0.92, 0.78, sigma=0.5, alpha=1.0)
    add_run(st, "regularizer", 0.85, 0.95, sigma=2.0, alpha=1.0)
    add_run(st, "regularizer", state="failed", sigma=5.0, alpha=1.0)
    return st


async def until(pilot, cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.05)


async def widget(pilot, screen_type, selector):
    """A widget of a screen that was just pushed, once it is composed."""
    app = pilot.app
    await until(pilot, lambda: isinstance(app.screen, screen_type) and bool(app.screen.query(selector)))
    return app.screen.query_one(selector)


def table(app) -> RunsTable:
    return app.screen.query_one(RunsTable)


async def test_table_contents(store):
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: app.loaded and table(app).row_count == 5)
        t = table(app)
        rid = next(r.id for r in store.runs() if "regularizer" in r.id and r.spec()["params"]["sigma"] == 0.5)
        assert t.get_cell(rid, "test_acc") == "92.00" and t.get_cell(rid, "robustness") == "78.00"
        assert t.get_cell(rid, "params") == "alpha=1 sigma=0.5" and t.get_cell(rid, "state").plain == "completed"
        assert t.get_cell(rid, "epoch") == "3/3" and t.get_cell(rid, "duration") == "2m05s"
        assert t.get_cell(rid, "best_val_acc") == "80.00"
        failed = next(r.id for r in store.runs() if r.status()["state"] == "failed")
        assert t.get_cell(failed, "state").plain == "failed" and t.get_cell(failed, "test_acc") == "-"
        assert "completed 4" in str(app.screen.query_one("#summary").render())


async def test_filter_and_sort(store):
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 5)
        await pilot.press("slash")
        await pilot.press(*"regularizer")
        await until(pilot, lambda: table(app).row_count == 3)
        await pilot.press(*" sigma=2")
        await until(pilot, lambda: table(app).row_count == 1)
        app.screen.query_one("#filter").value = ""
        app.screen.query_one("#state").value = "failed"
        await until(pilot, lambda: table(app).row_count == 1)
        app.screen.query_one("#state").clear()
        await until(pilot, lambda: table(app).row_count == 5)
        t = table(app)
        t.focus()
        t.sort_by("test_acc")
        await pilot.pause()
        accs = [t.get_cell_at((i, 5)) for i in range(5)]
        assert accs == ["85.00", "90.00", "90.50", "92.00", "-"]
        await pilot.press("s")  # the cursor is on the first column: method
        methods = [t.get_cell_at((i, 0)) for i in range(5)]
        assert methods == sorted(methods)


async def test_detail_plots_come_from_events_and_follow_new_ones(store):
    run = add_run(store, "regularizer", state="running", epochs=5, sigma=0.1, alpha=1.0)
    run.file("events.jsonl").write_text("".join(json.dumps(_epoch(e, 2.0 / e, 2.5 / e, 0.5 + 0.1 * e)) + "\n"
                                                for e in (1, 2)))
    status = run.status()
    status.update(pid=os.getpid(), host=socket.gethostname(), finished_at=None, updated_at=T1, epoch=2,
                  max_epochs=5)
    run.write_status(status)
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 6)
        t = table(app)
        assert t.get_cell(run.id, "state").plain == "running" and t.get_cell(run.id, "epoch") == "2/5"
        t.move_cursor(row=t.get_row_index(run.id))
        await pilot.press("enter")
        loss = await widget(pilot, RunDetailScreen, "#loss")
        await until(pilot, lambda: loss.series.get("train", ([], []))[0] == [1, 2])
        events = [e for e in run.events()[0] if e["type"] == "epoch"]
        assert loss.series["train"] == ([1, 2], [e["train_loss"] for e in events])
        assert loss.series["validation"][1] == [e["val_loss"] for e in events]
        assert app.screen.query_one("#acc", SeriesPlot).series["validation"][1] == [0.6, 0.7]
        # the run trains on: a new epoch shows up in the plot and, back on the list, in its row
        with open(run.file("events.jsonl"), "a") as f:
            f.write(json.dumps(_epoch(3, 0.4, 0.5, 0.91)) + "\n")
        status.update(epoch=3)
        run.write_status(status)
        await until(pilot, lambda: loss.series["train"][0] == [1, 2, 3])
        assert loss.series["train"][1][-1] == 0.4
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, RunsScreen))
        await until(pilot, lambda: table(app).get_cell(run.id, "epoch") == "3/5")
        assert table(app).get_cell(run.id, "best_val_acc") == "91.00"


async def test_robustness_curve_once_evaluated(store):
    app = GaussregApp("runs", poll_s=0.05)
    rid = next(r.id for r in store.runs() if "augment" in r.id)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 5)
        app.push_screen(RunDetailScreen(rid))
        robust = await widget(pilot, RunDetailScreen, "#robust")
        await until(pilot, lambda: "consistency" in robust.series)
        assert robust.series["consistency"] == (SIGMAS, [1.0, 0.7, 0.7 - 0.2])
        assert robust.series["accuracy"][1] == pytest.approx([0.905, 0.805, 0.605])


async def test_compare_screen_matches_table_json(store):
    app = GaussregApp("runs", poll_s=0.05)
    out = subprocess.run(cli("table", "--store", "runs", "--format", "json"), capture_output=True, text=True,
                         env=python_env())
    rec = json.loads(out.stdout)["experiments"][0]
    async with app.run_test(size=(160, 48)) as pilot:
        await until(pilot, lambda: table(app).row_count == 5)
        await pilot.press("c")
        best = await widget(pilot, CompareScreen, "#best")
        await until(pilot, lambda: best.row_count == len(rec["best"]))
        for e in rec["best"]:
            row = best.get_row(e["method"])
            assert row[2] == f"{e['accuracy'] * 100:.2f}" and row[4] == f"{e['robustness'] * 100:.2f}"
            assert row[3] == f"{e['d_accuracy'] * 100:+.2f}" and row[5] == f"{e['d_robustness'] * 100:+.2f}"
        footer = str(app.screen.query_one("#compare-footer").render())
        assert f"equivalent augmentation (the paper's Ñ = folds + 1): {rec['equivalent_folds']['text']}" in footer
        scatter = app.screen.query_one("#scatter", SeriesPlot)
        assert scatter.series["regularizer"] == ([0.92, 0.85], [0.78, 0.95]) or \
            scatter.series["regularizer"] == ([0.85, 0.92], [0.95, 0.78])
        assert scatter.vlines[0][0] == pytest.approx(0.90 - 0.01)  # the tolerance band's edge


MANIFEST = """
[[experiment]]
name = "tiny"
dataset = "synthetic"
model = "mlp"
max_epochs = 2
batch_size = 200
train_subset = 400
test_subset = 100
robustness = { sigmas = [0.0, 0.25] }
methods.baseline = {}
"""


async def test_launch_from_the_tui_runs_to_completion(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(MANIFEST)
    app = GaussregApp("runs", manifest="tiny.toml", poll_s=0.1)
    async with app.run_test(size=(160, 40)) as pilot:
        await pilot.press("l")
        sel = await widget(pilot, LaunchScreen, "SelectionList")
        await until(pilot, lambda: sel.option_count == 1)
        assert "1 pending" in str(sel.get_option_at_index(0).prompt) and sel.selected == ["tiny"]
        app.screen.query_one("#gpus").value = "none"
        await pilot.click("#launch")
        await until(pilot, lambda: isinstance(app.screen, RunsScreen))
        await until(pilot, lambda: table(app).row_count == 1, timeout=60)
        rid = table(app).coordinate_to_cell_key((0, 0)).row_key.value
        await until(pilot, lambda: table(app).get_cell(rid, "state").plain == "completed", timeout=180)
        assert table(app).get_cell(rid, "test_acc") != "-"


async def test_cancel_a_running_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    st = Store("runs")
    spec = resolve({"dataset": "synthetic", "model": "lenet", "method": "baseline", "max_epochs": 50,
                    "experiment": "c"})
    run = st.create(spec, run_id(spec))
    proc = start_worker(run, resume=False, threads=1)
    try:
        app = GaussregApp("runs", poll_s=0.1)
        async with app.run_test(size=(160, 40)) as pilot:
            await until(pilot, lambda: table(app).row_count == 1 and
                        table(app).get_cell(run.id, "state").plain == "running", timeout=60)
            await pilot.press("x")
            await until(pilot, lambda: app.screen.__class__.__name__ == "ConfirmScreen")
            await pilot.press("y")
            await until(pilot, lambda: table(app).get_cell(run.id, "state").plain == "cancelled", timeout=60)
    finally:
        proc.wait(timeout=30)
    assert run.status()["state"] == "cancelled" and run.file("last.pt").exists()


def test_quits_with_q(store):
    async def go():
        app = GaussregApp("runs", poll_s=0.05)
        async with app.run_test() as pilot:
            await until(pilot, lambda: app.loaded)
            await pilot.press("q")
            await pilot.pause()
        return app.return_code
    assert asyncio.run(go()) in (0, None)


# ---------------------------------------------------------------- snapshots

def _loaded(n):
    async def wait(pilot):
        await until(pilot, lambda: pilot.app.loaded and isinstance(pilot.app.screen, RunsScreen)
                    and table(pilot.app).row_count == n)
        await pilot.pause(0.2)
    return wait


def test_snapshot_runs_screen(store, snap_compare):
    assert snap_compare(GaussregApp("runs", poll_s=0.05), terminal_size=(120, 30), run_before=_loaded(5))


def test_snapshot_runs_screen_80x24(store, snap_compare):
    assert snap_compare(GaussregApp("runs", poll_s=0.05), terminal_size=(80, 24), run_before=_loaded(5))


def test_snapshot_detail_screen(store, snap_compare):
    rid = next(r.id for r in store.runs() if "augment" in r.id)

    async def before(pilot):
        await _loaded(5)(pilot)
        pilot.app.push_screen(RunDetailScreen(rid))
        robust = await widget(pilot, RunDetailScreen, "#robust")
        await until(pilot, lambda: "consistency" in robust.series)
        await pilot.pause(0.2)
    assert snap_compare(GaussregApp("runs", poll_s=0.05), terminal_size=(120, 40), run_before=before)


def test_snapshot_compare_screen(store, snap_compare):
    async def before(pilot):
        await _loaded(5)(pilot)
        await pilot.press("c")
        best = await widget(pilot, CompareScreen, "#best")
        await until(pilot, lambda: best.row_count == 3)
        await pilot.pause(0.2)
    assert snap_compare(GaussregApp("runs", poll_s=0.05), terminal_size=(120, 40), run_before=before)


def test_snapshot_help(store, snap_compare):
    async def before(pilot):
        await _loaded(5)(pilot)
        await pilot.press("question_mark")
        await pilot.pause(0.2)
    assert snap_compare(GaussregApp("runs", poll_s=0.05), terminal_size=(100, 30), run_before=before)
