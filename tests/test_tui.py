"""The dashboard, driven with App.run_test and Pilot on fixture stores."""

import asyncio
import inspect
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import cli, python_env, wait_for
from factories import SIGMAS, T0, T1, dashboard_epoch, dashboard_run, jsonl, queued_run, written_run
from textual.css.query import NoMatches

from gaussreg.launch.control import launches, start_worker
from gaussreg.launch.request import Plan
from gaussreg.runs import reader
from gaussreg.runs.store import Store, atomic_write_json, try_lock
from tui.app import GaussregApp
from tui.messages import RunsChanged
from tui.screens import (CompareScreen, ConfirmScreen, LaunchScreen, OverlayScreen, RunDetailScreen, RunsScreen,
                         SortScreen)
from tui.widgets import COLUMNS, RunsTable, SeriesPlot, SummaryBar


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the app shows the store path: keep it the same in every run
    st = Store("runs")
    st.write_experiment("fx", {"tolerance": 0.01})
    dashboard_run(st, "baseline", 0.90, 0.50)
    dashboard_run(st, "augment", 0.905, 0.70, sigma=0.25, folds=2)
    dashboard_run(st, "regularizer", 0.92, 0.78, sigma=0.5, alpha=1.0)
    dashboard_run(st, "regularizer", 0.85, 0.95, sigma=2.0, alpha=1.0)
    dashboard_run(st, "regularizer", state="failed", sigma=5.0, alpha=1.0)
    return st


def hold_lock(run):
    """Take the run's lock as its worker would (the TUI believes 'running' only while some
    process holds it); released by os.close or when the test process ends."""
    fd = try_lock(run)
    assert fd is not None
    return fd


def _holds(cond) -> bool:
    try:
        return bool(cond())
    except NoMatches:  # the screen it looks at is not composed yet: not yet
        return False


def _source(cond) -> str:
    try:
        return inspect.getsource(cond).strip()
    except (OSError, TypeError):  # made where no source file is
        return repr(cond)


async def until(pilot, cond, timeout=30.0):
    """Let the app run until cond() holds; past `timeout` s the test fails naming the condition."""
    deadline = time.monotonic() + timeout
    while not _holds(cond):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for: {_source(cond)}")
        await pilot.pause(0.05)


async def widget(pilot, screen_type, selector):
    """A widget of a screen that was just pushed, once it is composed."""
    app = pilot.app
    await until(pilot, lambda: isinstance(app.screen, screen_type) and bool(app.screen.query(selector)))
    return app.screen.query_one(selector)


def table(app) -> RunsTable:
    return app.screen.query_one(RunsTable)


async def _open_compare(pilot, rows: int = 3):
    """The compare screen's table of best configurations, opened from the runs table of the
    store fixture's five runs, once it shows `rows` rows."""
    await until(pilot, lambda: table(pilot.app).row_count == 5)
    await pilot.press("c")
    best = await widget(pilot, CompareScreen, "#best")
    await until(pilot, lambda: best.row_count == rows)
    return best


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


async def test_store_messages_reach_only_mounted_runs_screens(store):
    """The store reader's messages can arrive while a runs screen is composed or after it
    was removed (the cause of a 1-in-7 NoMatches): ignored there, and a screen mounted
    later still shows every row read before it existed."""
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: app.loaded and table(app).row_count == 5)
        late = RunsScreen()
        late.show_rows(app.rows(), app.rows())  # not mounted: nothing to show, no error
        app.post_message(RunsChanged(app.rows()))
        await app.push_screen(late)
        await until(pilot, lambda: app.screen is late and table(app).row_count == 5)
        await app.pop_screen()
        await until(pilot, lambda: app.screen is not late)
        late.show_rows(app.rows(), app.rows())  # removed: ignored
        app.post_message(RunsChanged(app.rows()))
        await pilot.pause()
        assert table(app).row_count == 5


async def test_filter_and_sort(store):
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 5)
        await pilot.press("slash")
        await pilot.press(*"regularizer")
        await until(pilot, lambda: table(app).row_count == 3)
        await pilot.press(*" sigma=2")
        await until(pilot, lambda: table(app).row_count == 1)
        # escape leaves the filter box for the table, keeping the filter: keys are commands again
        await pilot.press("escape")
        await until(pilot, lambda: app.focused is table(app))
        assert app.screen.query_one("#filter").value == "regularizer sigma=2" and table(app).row_count == 1
        app.screen.query_one("#filter").value = ""
        app.screen.query_one("#state").value = "failed"
        await until(pilot, lambda: table(app).row_count == 1)
        app.screen.query_one("#state").clear()
        await until(pilot, lambda: table(app).row_count == 5)
        t = table(app)
        t.focus()
        t.sort_by("test_acc")
        await pilot.pause()
        assert column(t, "test_acc") == ["85.00", "90.00", "90.50", "92.00", "-"]
        # any column from the keyboard: `s` opens the column menu; the selected run stays selected
        t.move_cursor(row=1)
        chosen = t.selected_id
        await pilot.press("s")
        menu = await widget(pilot, SortScreen, "#sort-columns")
        menu.highlighted = [k for k, _ in COLUMNS].index("robustness")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and t.sorted_by == "robustness")
        assert column(t, "robustness") == ["50.00", "70.00", "78.00", "95.00", "-"]
        assert t.selected_id == chosen
        await pilot.press("s")
        await widget(pilot, SortScreen, "#sort-columns")
        await pilot.press("enter")  # the current column again: reversed
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and t.reverse)
        assert column(t, "robustness") == ["-", "95.00", "78.00", "70.00", "50.00"]
        assert t.selected_id == chosen
        # a new run appears: still the same run selected
        dashboard_run(store, "randsign", 0.8, 0.6, eps=0.1, p=0.5, where="input")
        await until(pilot, lambda: t.row_count == 6)
        assert t.selected_id == chosen


def _screen(app) -> list:
    """Every row of the screen as the terminal shows it (scrollbars included), plain text."""
    return ["".join(seg.text for seg in strip) for strip in app.screen._compositor.render_full_update().strips]


async def test_the_sorted_column_has_an_arrow_and_no_scrollbar_glyph_under_the_rows(store):
    """80x24: the sorted column's header says ▲ (▼ reversed); under the last row the screen is
    blank (the table's horizontal scrollbar drew a stray glyph there), and → still scrolls."""
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: table(app).row_count == 5)
        t = table(app)
        t.focus()
        await until(pilot, lambda: sum(m in row for row in _screen(app) for m in ("baseline", "augment", "regularizer")) == 5)
        rows = _screen(app)
        header = next(i for i, row in enumerate(rows) if row.startswith(" id "))
        assert rows[header + 6].strip() == "", rows[header + 5:header + 7]  # the line under the fifth row
        for arrow in ("▲", "▼"):
            await pilot.press("s")
            menu = await widget(pilot, SortScreen, "#sort-columns")
            menu.highlighted = [k for k, _ in COLUMNS].index("robustness")
            await pilot.press("enter")
            await until(pilot, lambda: f" R {arrow} " in _screen(app)[header])
            assert _screen(app)[header].count("▲") + _screen(app)[header].count("▼") == 1
        assert t.max_scroll_x > 0  # wider than 80 columns: → shows the rest
        await pilot.press("right")
        await until(pilot, lambda: t.scroll_x > 0)


async def test_launch_dialog_fits_80x24_and_the_launch_is_said_at_once(tmp_path, monkeypatch):
    """At 80x24 the launch dialog shows every button whole without scrolling (the Load button
    was cut), and Launch is said the moment the dialog closes, before the scheduler process
    that will make the rows even exists."""
    from textual.widgets import Button

    import tui.app
    from gaussreg.launch.control import cancel_launch
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    (tmp_path / "tiny.toml").write_text(MANIFEST)
    started = []  # when the app called gaussreg's launch (which starts the scheduler process)
    real = tui.app.launch
    monkeypatch.setattr(tui.app, "launch", lambda plan: started.append(time.time()) or real(plan))
    app = GaussregApp("runs", manifest="tiny.toml", poll_s=0.1)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("l")
        sel = await widget(pilot, LaunchScreen, "SelectionList")
        await until(pilot, lambda: sel.option_count == 1)
        dialog = app.screen.query_one("#dialog")
        buttons = list(app.screen.query(Button))
        await until(pilot, lambda: all(b.region.height == 3 for b in buttons))
        assert dialog.max_scroll_y == 0 and {b.id for b in buttons} == {"load", "launch", "cancel"}
        assert all(dialog.content_region.contains_region(b.region) for b in buttons), [b.region for b in buttons]
        assert any(" Load " in row for row in _screen(app))
        app.screen.query_one("#gpus").value = "none"
        await pilot.click("#launch")
        await until(pilot, lambda: any(n.message.startswith("launching") for n in app._notifications))
        said = next(n for n in app._notifications if n.message.startswith("launching"))
        assert isinstance(app.screen, RunsScreen)
        assert said.message == "launching 1 run of tiny; the rows appear as its scheduler creates them"
        await until(pilot, lambda: launches(Store("runs")), timeout=60)
        record = launches(Store("runs"))[0]
        assert len(started) == 1 and said.raised_at <= started[0]  # said before its process was started
        cancel_launch(Store("runs"), record["pid"])
        await until(pilot, lambda: not launches(Store("runs")), timeout=60)


def column(t, key):
    return [str(t.get_cell(t.coordinate_to_cell_key((i, 0)).row_key, key)) for i in range(t.row_count)]


async def test_cells_that_grow_are_shown_whole(store):
    run = dashboard_run(store, "randsign", state="queued", eps=0.1, p=0.5, where="input")
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 6)
        t = table(app)
        narrow = {k: t.columns[k].content_width for k in ("state", "robustness")}
        assert narrow["robustness"] < len("100.00")  # every R shown so far is narrower
        res = {"test_accuracy": 0.9, "robustness": 1.0, "sigmas": SIGMAS, "per_sigma": [1, 1, 1],
               "best_epoch": 3, "epochs_run": 3, "best_val_accuracy": 0.9}
        atomic_write_json(run.file("result.json"), res)
        st = run.status()
        st.update(state="interrupted")  # wider than any state the table had
        run.write_status(st)
        await until(pilot, lambda: t.get_cell(run.id, "state").plain == "interrupted")
        # widths are recomputed when the table next settles: wait for that, not for a time
        await until(pilot, lambda: t.columns["state"].content_width >= len("interrupted"), timeout=10)
        st.update(state="completed")
        run.write_status(st)
        await until(pilot, lambda: t.get_cell(run.id, "robustness") == "100.00")
        await until(pilot, lambda: t.columns["robustness"].content_width >= len("100.00"), timeout=10)


async def test_cancel_and_rerun_refuse_first_with_the_reason(store):
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 5)
        t = table(app)
        done = next(r.id for r in store.runs() if "augment" in r.id)
        t.move_cursor(row=t.get_row_index(done))
        for key, words in (("x", "cancel refused"), ("r", "rerun refused")):
            await pilot.press(key)
            await until(pilot, lambda: any(words in n.message for n in app._notifications))
            assert isinstance(app.screen, RunsScreen)  # nothing was asked
            note = next(n.message for n in app._notifications if words in n.message)
            assert f"run {done} is completed" in note
        failed = next(r.id for r in store.runs() if r.status()["state"] == "failed")
        t.move_cursor(row=t.get_row_index(failed))
        await pilot.press("r")  # a failed run can be trained again: this one asks
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")


async def test_d_removes_a_run_after_asking_and_refuses_a_running_one(store):
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 5)
        t = table(app)
        failed = next(r for r in store.runs() if r.status()["state"] == "failed")
        failed.file("last.pt").write_text("x")
        t.move_cursor(row=t.get_row_index(failed.id))
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")  # no: nothing happens
        await until(pilot, lambda: isinstance(app.screen, RunsScreen))
        assert failed.path.is_dir() and t.row_count == 5
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: table(app).row_count == 4)
        assert not failed.path.exists() and failed.id not in [r.id for r in store.runs()]
        assert any(f"removed {failed.id}" in n.message for n in app._notifications)
        live = next(r for r in store.runs() if "augment" in r.id)
        # the lock first, as a worker takes it: a "running" status read while no one holds the
        # lock reads as interrupted, and taking the lock changes no file the TUI would re-read
        fd = hold_lock(live)
        live.write_status({**live.status(), "state": "running", "host": socket.gethostname()})
        try:
            await until(pilot, lambda: t.get_cell(live.id, "state").plain == "running")
            t.move_cursor(row=t.get_row_index(live.id))
            await pilot.press("d")
            await until(pilot, lambda: any("remove refused" in n.message for n in app._notifications))
            assert isinstance(app.screen, RunsScreen) and live.path.is_dir()
            note = next(n.message for n in app._notifications if "remove refused" in n.message)
            assert f"run {live.id} is running: cancel it first" in note
        finally:
            os.close(fd)


async def test_a_rerun_while_a_launch_holds_the_cpu_waits_for_a_place_and_says_so(store):
    """`r` is a launch of its own (gaussreg's launch of request.rerun_plan): while the store's
    only CPU place is held by another launch's worker it does not train beside it; the TUI
    says at once that it waits, and its scheduler waits (its log says so) until X stops it."""
    from gaussreg.launch.control import cancel_launch
    from gaussreg.launch.gpus import CPU_PLACE
    place = store.lock_gpu_share(CPU_PLACE, 1)  # a launch with one CPU run is training
    assert place is not None
    failed = next(r for r in store.runs() if r.status()["state"] == "failed")
    app = GaussregApp("runs", poll_s=0.05)
    try:
        async with app.run_test(size=(160, 40)) as pilot:
            await until(pilot, lambda: table(app).row_count == 5)
            t = table(app)
            t.move_cursor(row=t.get_row_index(failed.id))
            await pilot.press("r")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("y")
            await until(pilot, lambda: any("training" in n.message for n in app._notifications), timeout=60)
            note = next(n.message for n in app._notifications if "training" in n.message)
            found = launches(store)
            assert len(found) == 1 and found[0]["label"] == failed.id
            assert note == (f"training {failed.id} again (launch pid {found[0]['pid']}, X stops it): every place on "
                            f"the CPU (1, as its launches made them) is taken by runs of store runs: it waits for one")
            log = Path(found[0]["log"])
            wait_for(lambda: log.exists() and "waiting: every place on the CPU" in log.read_text(), 120,
                     "the rerun's scheduler to say that it waits")
            free = try_lock(failed)  # nobody trains it
            assert failed.status()["state"] == "failed" and free is not None
            os.close(free)
            cancel_launch(store, found[0]["pid"])
            wait_for(lambda: not launches(store), 60, "the rerun's launch to stop")
    finally:
        os.close(place)


async def test_compare_screen_follows_the_store(store):
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(160, 48)) as pilot:
        best = await _open_compare(pilot)
        assert "randsign" not in [str(best.get_row_at(i)[0]) for i in range(best.row_count)]
        dashboard_run(store, "randsign", 0.91, 0.66, eps=0.1, p=0.5, where="input")
        await until(pilot, lambda: best.row_count == 4)
        row = best.get_row("randsign")
        assert row[3] == "91.00" and row[5] == "66.00"


async def test_compare_screen_picks_among_the_settings_of_an_experiment(store):
    """Runs of one experiment at two values of max_epochs are two comparisons, each with its own
    baseline: a selector shows one at a time (hidden while there is only one)."""
    from textual.widgets import Select
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(160, 48)) as pilot:
        best = await _open_compare(pilot)
        chooser = app.screen.query_one("#setting", Select)
        assert not chooser.display
        dashboard_run(store, "baseline", 0.60, 0.40, epochs=5)
        dashboard_run(store, "regularizer", 0.61, 0.55, epochs=5, sigma=0.5, alpha=1.0)
        await until(pilot, lambda: chooser.display and chooser.value == "max_epochs=3")
        assert "max_epochs=5" in [str(label) for label, _ in chooser._options if _ is not Select.NULL]
        assert best.row_count == 3 and best.get_row("baseline")[3] == "90.00"
        chooser.value = "max_epochs=5"
        await until(pilot, lambda: best.row_count == 2 and best.get_row("baseline")[3] == "60.00")
        assert best.get_row("regularizer")[5] == "55.00"
        scatter = app.screen.query_one("#scatter", SeriesPlot)
        assert {m: list(zip(*xy)) for m, xy in scatter.series.items()} == {
            "baseline": [pytest.approx((60, 40))], "regularizer": [pytest.approx((61, 55))]}
        # the store moves on: the chosen setting stays chosen
        dashboard_run(store, "augment", 0.62, 0.50, epochs=5, sigma=0.25, folds=1)
        await until(pilot, lambda: best.row_count == 3)
        assert chooser.value == "max_epochs=5" and best.get_row("augment")[3] == "62.00"


async def test_overlay_of_marked_runs(store):
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 5)
        t = table(app)
        t.focus()
        picked = []
        for method in ("augment", "baseline"):
            rid = next(r.id for r in store.runs() if f"-{method}-" in r.id)
            t.move_cursor(row=t.get_row_index(rid))
            await pilot.press("space")
            picked.append(rid)
        assert [str(t.get_cell(r, "id")).startswith("● ") for r in picked] == [True, True]
        await pilot.press("o")
        noisy = await widget(pilot, OverlayScreen, "#overlay-noisy")
        short = [r.rsplit("-", 1)[1][:6] for r in picked]
        await until(pilot, lambda: list(noisy.series) == short)
        assert noisy.series[short[0]][1] == pytest.approx([90.5, 80.5, 60.5])  # augment: acc 0.905
        assert noisy.series[short[1]][1] == pytest.approx([90, 80, 60])
        consistency = app.screen.query_one("#overlay-consistency", SeriesPlot).series
        assert consistency[short[0]][1] == pytest.approx([100, 70, 50])
        assert app.screen.query_one("#overlay-loss", SeriesPlot).series[short[1]][0] == [1, 2, 3]
        assert noisy.series_colors[short[0]] != noisy.series_colors[short[1]]
        # one legend names each colour's run by its method and parameters, not by a hash alone
        legend = app.screen.query_one("#overlay-legend")
        await until(pilot, lambda: "baseline" in " ".join(_shown(legend)))
        entries = [f"● {short[0]} augment folds=2 sigma=0.25", f"● {short[1]} baseline"]
        for size in ((160, 40), (60, 24)):  # narrow: one run a line, none broken
            await pilot.resize_terminal(*size)
            await until(pilot, lambda: legend.size.width == size[0] - 2)
            assert all(any(e in row for row in _shown(legend)) for e in entries), _shown(legend)
        assert not any(p.border_subtitle or "●" in str(p.border_title) for p in app.screen.query(SeriesPlot))


async def test_default_order_tells_runs_apart(store):
    for seed in (2, 1):
        dashboard_run(store, "baseline", 0.9, 0.5, seed=seed)
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 7)
        t = table(app)
        assert column(t, "method")[:3] == ["augment", "baseline", "baseline"]
        assert column(t, "seed")[1:4] == ["0", "1", "2"]
        ids = column(t, "id")
        assert len(set(ids)) == 7 and all(len(i) == 6 for i in ids)
        for i, rid in enumerate(ids):
            assert t.coordinate_to_cell_key((i, 0)).row_key.value.rsplit("-", 1)[1].startswith(rid)


async def test_detail_plots_come_from_events_and_follow_new_ones(store):
    run = dashboard_run(store, "regularizer", state="running", epochs=5, sigma=0.1, alpha=1.0)
    run.file("events.jsonl").write_text(jsonl(dashboard_epoch(e, 2.0 / e, 2.5 / e, 0.5 + 0.1 * e) for e in (1, 2)))
    status = run.status()
    status.update(pid=os.getpid(), host=socket.gethostname(), finished_at=None, updated_at=T1, epoch=2,
                  max_epochs=5)
    run.write_status(status)
    lock = hold_lock(run)
    app = GaussregApp("runs", poll_s=0.05)
    try:
        await _follow_a_running_run(app, run, status)
    finally:
        os.close(lock)


async def _follow_a_running_run(app, run, status):
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
        assert app.screen.query_one("#acc", SeriesPlot).series["validation"][1] == pytest.approx([60, 70])
        # the run trains on: a new epoch shows up in the plot and, back on the list, in its row
        with open(run.file("events.jsonl"), "a") as f:
            f.write(json.dumps(dashboard_epoch(3, 0.4, 0.5, 0.91)) + "\n")
        status.update(epoch=3)
        run.write_status(status)
        await until(pilot, lambda: loss.series["train"][0] == [1, 2, 3])
        assert loss.series["train"][1][-1] == 0.4
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, RunsScreen))
        await until(pilot, lambda: table(app).get_cell(run.id, "epoch") == "3/5")
        assert table(app).get_cell(run.id, "best_val_acc") == "91.00"


async def test_a_rerun_replaces_what_detail_and_row_showed(store):
    """A rerun starts events.jsonl anew (and may outgrow the old file before the next read):
    the detail screen and the row forget the old epochs and the old result."""
    run = next(r for r in store.runs() if "augment" in r.id)
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 5 and table(app).get_cell(run.id, "test_acc") == "90.50")
        app.push_screen(RunDetailScreen(run.id))
        loss = await widget(pilot, RunDetailScreen, "#loss")
        await until(pilot, lambda: loss.series.get("train", ([], []))[0] == [1, 2, 3])
        # what `r` does: outputs deleted, a running status, a new events file longer than the old one
        for name in ("result.json", "events.jsonl"):
            run.file(name).unlink()
        status = run.status()
        status.update(state="running", pid=os.getpid(), host=socket.gethostname(), finished_at=None, epoch=1)
        lock = hold_lock(run)
        run.write_status(status)
        run.file("events.jsonl").write_text(jsonl([{"type": "start", "time": T1, "padding": "x" * 2000},
                                                   dashboard_epoch(1, 9.0, 9.5, 0.11)]))
        await until(pilot, lambda: loss.series["train"] == ([1], [9.0]))
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, RunsScreen))
        await until(pilot, lambda: table(app).get_cell(run.id, "best_val_acc") == "11.00")
        assert table(app).get_cell(run.id, "test_acc") == "-"
        assert table(app).get_cell(run.id, "state").plain == "running"
        os.close(lock)  # the worker is gone (its pid, ours, lives on): the run is not running
        await until(pilot, lambda: table(app).get_cell(run.id, "state").plain == "interrupted")


def _y_labels(plot):
    """The y tick labels a plot shows, with the canvas row of each, top to bottom, and the
    number of canvas rows."""
    lines = plot.render().plain.splitlines()
    canvas = [i for i, line in enumerate(lines) if "┤" in line or ("│" in line and not set("┌└") & set(line))]
    return [(i - canvas[0], lines[i].split("┤")[0].strip()) for i in canvas if "┤" in lines[i]], len(canvas)


async def test_plot_y_ticks_are_even_at_every_size(store):
    """The loss plot's y labels are a round step apart, none skipped (plotext's own showed 1.84,
    1.66, 1.49, 1.14 at 120x40), on the canvas's top and bottom rows and evenly spaced
    between them, at every size of the detail screen."""
    from tui.widgets import even_ticks
    rid = next(r.id for r in store.runs() if "regularizer" in r.id and r.spec()["params"]["sigma"] == 0.5)
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 5)
        t = table(app)
        t.move_cursor(row=t.get_row_index(rid))
        await pilot.press("enter")
        loss = await widget(pilot, RunDetailScreen, "#loss")
        for size in ((120, 40), (80, 24), (100, 34), (160, 50), (120, 36), (90, 28)):
            await pilot.resize_terminal(*size)
            await until(pilot, lambda: loss.size.height > 0 and loss.series.get("train") and loss.yticks
                        and _y_labels(loss)[0] and len(_y_labels(loss)[0]) == len(loss.yticks))
            shown, rows = _y_labels(loss)
            values = [float(label) for _, label in shown]
            steps = {round(a - b, 9) for a, b in zip(values, values[1:])}
            assert len(values) >= (3 if rows >= 5 else 2) and len(steps) == 1, (size, shown)  # one step, none skipped
            assert [label for _, label in shown] == loss.yticks[::-1]
            gaps = [b - a for (a, _), (b, _) in zip(shown, shown[1:])]
            assert shown[-1][0] == rows - 1 and len(set(gaps)) == 1, (size, shown)  # the same number of rows apart
            assert values[-1] <= 2 / 3 and values[0] >= 2.5  # the curves (2/e and 2.5/e, e = 1..3) lie within
    for rows in range(2, 60):  # and for any data: one round step, each tick exactly on a row
        for lo, hi in ((0.58, 2.59), (99.81, 100.0), (-0.3, 0.7), (1e-4, 3e-4), (12.0, 97.0), (58.0, 82.0)):
            bounds = (0, 100) if lo > 10 else None
            low, high, ticks, labels = even_ticks(lo, hi, rows, bounds)
            at = [(t - low) / (high - low) * (rows - 1) for t in ticks]
            assert low <= lo and high >= hi and ticks[0] == low and len(ticks) >= (3 if rows >= 3 else 2), (rows, lo)
            assert all(abs(r - round(r)) < 1e-6 and round(r) <= rows - 1 for r in at), (rows, lo, ticks)
            assert len({round(b - a, 12) for a, b in zip(ticks, ticks[1:])}) == 1 and len(set(labels)) == len(labels)
            assert bounds is None or bounds[0] <= ticks[0] and ticks[-1] <= bounds[1]


def _shown(w) -> list:
    """The rows a widget shows, as plain text."""
    from textual.geometry import Region
    return ["".join(seg.text for seg in strip) for strip in w.render_lines(Region(0, 0, w.size.width, w.size.height))]


async def test_detail_wraps_the_log_tail_and_breaks_no_word_of_the_spec(store):
    """The log tail wraps within the side panel (it was cut at 78 columns: a line's accuracy
    and epoch time were lost), and at 80x24 a spec value too long beside its label goes below
    it instead of breaking a word ("fashion-mnis / t")."""
    from textual.widgets import RichLog
    line = "epoch 8/10 train loss 1.2345 val loss 1.3456 val acc 87.65% epoch time 12.3 s 1234 img/s"
    run = written_run(store, status={"state": "failed", "epoch": 8, "max_epochs": 10, "error": "boom"},
                      events=[dashboard_epoch(e, 2.0 / e, 2.5 / e, 0.5) for e in range(1, 9)],
                      log=f"{T0} start\n{T1} {line}\n", dataset="fashion-mnist", model="lenet", method="regularizer",
                      params={"sigma": 0.5, "alpha": 1.0}, experiment="fm", max_epochs=10)
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 6)
        t = table(app)
        t.move_cursor(row=t.get_row_index(run.id))
        await pilot.press("enter")
        spec = await widget(pilot, RunDetailScreen, "#spec")
        log = app.screen.query_one(RichLog)
        for size in ((120, 40), (80, 24)):
            await pilot.resize_terminal(*size)
            # the last line whole, over as many rows as it takes, none wider than the log
            await until(pilot, lambda: line in " ".join(r.text.strip() for r in log.lines)
                        and max(r.cell_length for r in log.lines) <= log.scrollable_content_region.width
                        and spec.size.width == spec.parent.scrollable_content_region.width)
            words = " ".join(_shown(spec)).split()
            assert "fashion-mnist" in words and "lenet" in words, (size, _shown(spec))  # each word whole
            assert not any(w.startswith("fashion-mnis") and w != "fashion-mnist" for w in words)
        assert "fashion-mnist" in words and _shown(spec)[[i for i, r in enumerate(_shown(spec)) if "fashion" in r][0]
                                                         - 1].strip() == "data"  # at 80x24: below its label


async def test_robustness_curve_once_evaluated(store):
    app = GaussregApp("runs", poll_s=0.05)
    rid = next(r.id for r in store.runs() if "augment" in r.id)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 5)
        app.push_screen(RunDetailScreen(rid))
        robust = await widget(pilot, RunDetailScreen, "#robust")
        await until(pilot, lambda: "consistency" in robust.series)
        assert robust.series["consistency"][0] == SIGMAS
        assert robust.series["consistency"][1] == pytest.approx([100, 70, 50])  # plots in % like the tables
        assert robust.series["accuracy"][1] == pytest.approx([90.5, 80.5, 60.5])


def _text(static) -> str:
    """What a Static shows, as plain text."""
    import io

    from rich.console import Console
    c = Console(width=200, file=io.StringIO(), record=True)
    c.print(static.content if hasattr(static, "content") else static.renderable)
    return c.export_text()


async def test_detail_shows_certified_accuracy_once_certified(store):
    app = GaussregApp("runs", poll_s=0.05)
    run = next(r for r in store.runs() if "augment" in r.id)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 5)
        app.push_screen(RunDetailScreen(run.id))
        status = await widget(pilot, RunDetailScreen, "#status")
        await until(pilot, lambda: "best epoch" in _text(status))
        assert "certified" not in _text(status)
        # 4 images: correct at radius 0.3, correct at 0.1, wrong, abstained
        per_image = [{"index": 0, "label": 1, "prediction": 1, "radius": 0.3, "correct": True},
                     {"index": 1, "label": 2, "prediction": 2, "radius": 0.1, "correct": True},
                     {"index": 2, "label": 3, "prediction": 4, "radius": 0.6, "correct": False},
                     {"index": 3, "label": 5, "prediction": -1, "radius": 0.0, "correct": False}]
        run.write_certification({"sigma": 0.25, "per_image": per_image})
        await until(pilot, lambda: "certified" in _text(status))
        assert "acc at sigma 0.25: r=0 50.00%  r=0.25 25.00%  r=0.5 0.00%" in _text(status)


async def test_detail_shows_batch_progress_and_the_quiet_phases(store):
    """Through epoch 1 there is no epoch event yet: the detail says how far the batches are; while
    the worker validates or evaluates R, the row and the detail say so."""
    run = dashboard_run(store, "regularizer", state="running", epochs=5, sigma=0.3, alpha=1.0)
    status = run.status()
    status.update(pid=os.getpid(), host=socket.gethostname(), finished_at=None, epoch=1, phase="training",
                  precision="bf16")
    run.write_status(status)
    run.file("events.jsonl").write_text(json.dumps({"type": "start", "time": T0, "epoch": 0}) + "\n")
    lock = hold_lock(run)  # running: its lock is held, as by its worker
    try:
        await _batches_and_phases(run, status)
    finally:
        os.close(lock)


async def _batches_and_phases(run, status):
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: table(app).row_count == 6)
        assert table(app).get_cell(run.id, "state").plain == "running"  # training: nothing more to say
        app.push_screen(RunDetailScreen(run.id))
        side = await widget(pilot, RunDetailScreen, "#status")
        await until(pilot, lambda: "0/5 done, epoch 1 running" in _text(side))
        assert "batch" not in _text(side)
        assert "cpu in bf16" in _text(side)  # the precision the worker resolved "auto" to
        with open(run.file("events.jsonl"), "a") as f:
            f.write(json.dumps({"type": "progress", "time": T0, "epoch": 1, "batch": 3, "batches": 10,
                                "loss": 1.23456}) + "\n")
        await until(pilot, lambda: "epoch 1 running: batch 3/10, loss 1.2346" in _text(side))
        status.update(phase="validating")
        run.write_status(status)
        await until(pilot, lambda: "running, validating" in _text(side))
        assert "batch 3/10" not in _text(side)
        with open(run.file("events.jsonl"), "a") as f:
            f.write(json.dumps(dashboard_epoch(1, 0.9, 1.0, 0.4)) + "\n")
        status.update(phase="evaluating")
        run.write_status(status)
        await until(pilot, lambda: "running, evaluating R" in _text(side) and "1/5 done" in _text(side))
        assert "epoch 2 running" not in _text(side)  # evaluating: no epoch is running
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, RunsScreen))
        await until(pilot, lambda: table(app).get_cell(run.id, "state").plain == "running eval R")


async def test_at_80x24_every_key_is_in_the_footer_and_dialogs_fit(store):
    from textual.widgets import Footer
    from textual.widgets._footer import FooterKey

    from tui.screens import HelpScreen
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: table(app).row_count == 5)
        footer_keys = lambda: list(app.screen.query_one(Footer).query(FooterKey))  # noqa: E731
        # await the footer's layout, not just its children: a key mounted but not yet placed has no region
        await until(pilot, lambda: footer_keys() and all(k.region.width > 0 for k in footer_keys()))
        keys = {k.key: k for k in footer_keys()}
        assert {"s", "o", "c", "l", "x", "r", "X", "question_mark", "q"} <= set(keys)
        assert all(k.region.right <= 80 for k in keys.values())  # none cut off
        rid = next(r.id for r in store.runs() if r.status()["state"] == "failed")
        app.confirm_rerun(rid)
        dialog = await widget(pilot, ConfirmScreen, "#dialog")
        await until(pilot, lambda: dialog.region.height > 0)
        assert dialog.region.height <= 10  # the question and the buttons, not the whole screen
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, RunsScreen))
        assert max(len(line) for line in HelpScreen.TEXT.splitlines()) <= 74 - 2  # no line wraps mid-sentence
        await pilot.press("question_mark")
        text = await widget(pilot, HelpScreen, "#help-text")
        await until(pilot, lambda: text.region.width > 0)
        assert text.region.width >= 72


def test_ls_report_and_tui_rows_come_from_one_builder(store):
    """reader.list_runs (ls, table, export) and the TUI's watcher build a run's row with the same
    RunReader: the same numbers, states and epochs, including a running run's."""
    from gaussreg.runs import reader
    from tui.watcher import StoreWatcher
    run = dashboard_run(store, "regularizer", state="running", epochs=5, sigma=0.3, alpha=1.0)
    status = run.status()
    status.update(pid=os.getpid(), host=socket.gethostname(), finished_at=None, updated_at=T1, epoch=3,
                  phase="validating")
    run.write_status(status)
    run.file("events.jsonl").write_text(jsonl(dashboard_epoch(e, 1.0, 1.0, 0.5 + 0.1 * e) for e in (1, 2)))
    from dataclasses import replace
    lock = hold_lock(run)  # running: its lock is held, as by its worker
    try:
        rows = {r["id"]: r["row"] for r in reader.list_runs(store)}
        watched = {r.id: r for r in StoreWatcher(store.root).scan()}
    finally:
        os.close(lock)
    assert set(rows) == set(watched) and len(rows) == 6
    for rid, row in rows.items():  # a running run's duration grows between the two reads
        assert replace(row, duration=None) == replace(watched[rid], duration=None)
        assert abs((row.duration or 0) - (watched[rid].duration or 0)) < 60
    live = rows[run.id]
    assert (live.state, live.epoch, live.best_val_acc, live.phase) == ("running", 2, 0.7, "validating")
    # a store that is not there yet, or a file where it should be: nothing to show, no crash
    (store.root.parent / "afile").write_text("")
    assert StoreWatcher(store.root.parent / "none").scan() == StoreWatcher(store.root.parent / "afile").scan() == []
    done = next(r for r in rows.values() if r.method == "augment")
    assert (done.test_acc, done.robustness, done.epoch, done.params) == (0.905, 0.70, 3, "folds=2 sigma=0.25")


async def test_compare_screen_matches_table_json(store):
    """The compare screen shows what `gaussreg table` shows, word for word (report.comparison_text
    of the same JSON): means ± std over seeds, the two-standard-error check, the selection split."""
    from gaussreg.views import report
    dashboard_run(store, "baseline", 0.88, 0.54, seed=1)  # two seeds: a std and a standard error
    dashboard_run(store, "regularizer", 0.86, 0.93, seed=1, sigma=2.0, alpha=1.0)
    app = GaussregApp("runs", poll_s=0.05)
    out = subprocess.run(cli("table", "--store", "runs", "--format", "json"), capture_output=True, text=True,
                         env=python_env())
    rec = json.loads(out.stdout)["experiments"][0]
    title, header, rows, footer = report.comparison_text(rec)
    async with app.run_test(size=(160, 48)) as pilot:
        await until(pilot, lambda: table(app).row_count == 7)
        await pilot.press("c")
        best = await widget(pilot, CompareScreen, "#best")
        await until(pilot, lambda: best.row_count == len(rec["best"]))
        assert [str(c.label) for c in best.columns.values()] == header
        assert [[str(c) for c in best.get_row(e["method"])] for e in rec["best"]] == rows
        reg = best.get_row("regularizer")
        assert reg[3] == "85.50 ± 0.71" and reg[5] == "94.00 ± 1.41" and reg[7] in ("yes", "no")  # ± std, 2 SE
        assert str(app.screen.query_one("#compare-title").render()) == title
        assert "selected on validation" in title
        shown = str(app.screen.query_one("#compare-footer").render())
        assert shown == "\n".join(footer)
        assert "were decided on validation accuracy and R" in shown and "two standard errors (2 SE = " in shown
        assert f"equivalent augmentation (the paper's Ñ = folds + 1): {rec['equivalent_folds']['text']}" in shown
        scatter = app.screen.query_one("#scatter", SeriesPlot)
        points = sorted(zip(*scatter.series["regularizer"]))
        assert points == [pytest.approx((85, 95)), pytest.approx((86, 93)), pytest.approx((92, 78))]  # in %
        assert scatter.vlines[0][0] == pytest.approx(89 - 1)  # the tolerance band's edge (baseline mean 89 %)


async def test_compare_screen_at_80x24_shows_the_table_or_the_plot_with_its_whole_legend(store):
    """Below 34 rows the table and the plot take turns (p), so the plot is not squeezed to a few
    rows; a legend too long for the top border goes to the bottom one instead of being cut."""
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        await _open_compare(pilot)
        scatter = app.screen.query_one("#scatter", SeriesPlot)
        assert not scatter.display and app.screen.query_one("#compare-body").display
        await pilot.press("p")
        await until(pilot, lambda: scatter.display and scatter.region.height >= 15 and scatter.series)
        rows = _screen(app)
        top = next(r for r in rows if "every completed run" in r)
        bottom = next(r for r in rows if "● augment" in r)
        assert "every completed run: R % vs clean test accuracy %" in top and top.rstrip().endswith("╮")
        assert all(f"● {m}" in bottom for m in ("augment", "baseline", "regularizer")) and bottom.rstrip().endswith("╯")
        await pilot.press("p")
        await until(pilot, lambda: not scatter.display and app.screen.query_one("#best").region.height > 0)


async def test_compare_screen_budget_as_table_budget(store):
    """The budget field: configurations trained in more than X times the baseline's time
    leave the table (augment, 3x here), as with `gaussreg table --budget`; a bad value is one
    sentence and changes nothing; an empty field is no budget."""
    from textual.widgets import Input
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(160, 48)) as pilot:
        best = await _open_compare(pilot)
        assert best.get_row("augment")[10] == "3.00" and best.get_row("regularizer")[10] == "1.20"
        app.screen.query_one("#budget", Input).focus()
        error = app.screen.query_one("#budget-error")
        for bad, said in (("0", "0.0"), ("abc", "abc"), ("inf", "inf")):
            await pilot.press(*bad, "enter")
            await until(pilot, lambda: str(error.render()) == "the budget must be a finite number > 0 (times the "
                                                              f"baseline's training time), not {said}")
            assert app.screen.budget is None and best.row_count == 3
            app.screen.query_one("#budget", Input).value = ""
        await pilot.press("2", "enter")
        await until(pilot, lambda: best.row_count == 2)
        assert str(error.render()) == "" and app.screen.budget == 2.0
        assert [str(best.get_row_at(i)[0]) for i in range(2)] == ["baseline", "regularizer"]
        assert "budget 2× the baseline's time" in str(app.screen.query_one("#compare-title").render())
        footer = str(app.screen.query_one("#compare-footer").render())
        assert "1 over it and 0 without a comparable time are left out" in footer
        out = subprocess.run(cli("table", "--store", "runs", "--format", "json", "--budget", "2"),
                             capture_output=True, text=True, env=python_env())
        assert [e["method"] for e in json.loads(out.stdout)["experiments"][0]["best"]] == ["baseline", "regularizer"]
        await pilot.press("backspace", "enter")
        await until(pilot, lambda: best.row_count == 3)
        assert app.screen.budget is None and isinstance(app.screen, CompareScreen)


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
    """Two experiments chosen in the dialog become ONE scheduler process (one owner of the
    cores and GPUs), and both train to completion."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a GPU box trains these on the CPU too
    (tmp_path / "tiny.toml").write_text(MANIFEST + MANIFEST.replace('"tiny"', '"tiny2"').replace("400", "300"))
    app = GaussregApp("runs", manifest="tiny.toml", poll_s=0.1)
    async with app.run_test(size=(80, 24)) as pilot:  # everything reachable at 80x24
        await pilot.press("l")
        sel = await widget(pilot, LaunchScreen, "SelectionList")
        await until(pilot, lambda: sel.option_count == 2)
        assert "1 pending" in str(sel.get_option_at_index(0).prompt) and sel.selected == ["tiny", "tiny2"]
        app.screen.query_one("#gpus").value = "none"
        app.screen.query_one("#max-parallel").value = "2"
        await pilot.click("#launch")
        await until(pilot, lambda: isinstance(app.screen, RunsScreen))
        await until(pilot, lambda: len(launches(Store("runs"))) == 1)
        found = launches(Store("runs"))
        # the dialog's checked plan is what the one scheduler carries out
        carried = Plan.load(found[0]["plan"])
        assert carried.request.experiments == ("tiny", "tiny2") and carried.request.max_parallel == 2
        assert [s.gpu for s in carried.slots] == [None, None] and len(carried.runs) == 2
        await until(pilot, lambda: table(app).row_count == 2, timeout=60)
        for i in range(2):
            rid = table(app).coordinate_to_cell_key((i, 0)).row_key.value
            await until(pilot, lambda: table(app).get_cell(rid, "state").plain == "completed", timeout=180)
            assert table(app).get_cell(rid, "test_acc") != "-"


@pytest.mark.parametrize("field,value,words", [
    ("#per-gpu", "0", "runs per GPU must be a whole number"),
    ("#max-parallel", "x", "CPU runs must be a whole number"),
    ("#max-parallel", "٣", "CPU runs must be a whole number"),  # a digit, but not an ASCII one
    ("#max-parallel", "9" * 5000, "CPU runs must be a whole number"),  # int() of it raises
    ("#max-parallel", "99999999", "is more runs at once than this machine can run"),
    ("#gpus", "3", "asks for GPUs, but this machine shows none"),
    ("#gpus", "zero", "--gpus must be"),
])
async def test_launch_dialog_refuses_bad_values_before_launching(tmp_path, monkeypatch, field, value, words):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible, on any machine
    (tmp_path / "tiny.toml").write_text(MANIFEST)
    app = GaussregApp("runs", manifest="tiny.toml", poll_s=0.1)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("l")
        sel = await widget(pilot, LaunchScreen, "SelectionList")
        await until(pilot, lambda: sel.option_count == 1)
        app.screen.query_one(field).value = value
        await pilot.click("#launch")
        error = app.screen.query_one("#plan-error")
        await until(pilot, lambda: words in str(error.render()))
        assert isinstance(app.screen, LaunchScreen) and not (tmp_path / "runs").exists()


async def test_cancel_a_running_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    st = Store("runs")
    run = queued_run(st, model="lenet", max_epochs=50, early_stop=1000,  # no plateau may end it before the cancel
                     experiment="c")
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


@pytest.mark.process  # runs the app itself, in its own event loop
def test_quits_with_q(store):
    async def go():
        app = GaussregApp("runs", poll_s=0.05)
        async with app.run_test() as pilot:
            await until(pilot, lambda: app.loaded)
            await pilot.press("q")
            await pilot.pause()
            return app.is_running, app.return_code
    # exit() was asked for with code 0: a q that did nothing leaves the app running
    assert asyncio.run(go()) == (False, 0)


# ---------------------------------------------------------------- snapshots

def _loaded(n):
    async def wait(pilot):
        await until(pilot, lambda: pilot.app.loaded and isinstance(pilot.app.screen, RunsScreen)
                    and table(pilot.app).row_count == n)
        await pilot.pause()
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
        await pilot.pause()
    assert snap_compare(GaussregApp("runs", poll_s=0.05), terminal_size=(120, 40), run_before=before)


def test_snapshot_compare_screen(store, snap_compare):
    async def before(pilot):
        await _loaded(5)(pilot)
        await _open_compare(pilot)
        await pilot.pause()
    assert snap_compare(GaussregApp("runs", poll_s=0.05), terminal_size=(120, 40), run_before=before)


def test_snapshot_help(store, snap_compare):
    async def before(pilot):
        await _loaded(5)(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
    assert snap_compare(GaussregApp("runs", poll_s=0.05), terminal_size=(100, 30), run_before=before)


@pytest.mark.process
async def test_the_runs_table_converges_to_what_ls_lists_when_runs_are_deleted_or_renamed(store):
    """A run deleted from the store leaves the table, a renamed one is listed once (under its
    new name), and a run whose spec breaks shows as corrupt: within a few scans, the table's
    ids are exactly those `gaussreg ls` lists, and the summary counts them."""
    ids = sorted(r.id for r in store.runs())
    shutil.rmtree(store.root / ids[0])
    (store.root / ids[1]).rename(store.root / "renamed-run-0123456789")
    (store.root / ids[2] / "spec.json").write_text("{not json")
    app = GaussregApp("runs", poll_s=0.05)
    async with app.run_test(size=(120, 30)) as pilot:
        await until(pilot, lambda: table(app).row_count == 4)
        listed = {r["id"]: r["state"] for r in reader.list_runs(store)}
        shutil.rmtree(store.root / ids[3])  # while the app watches
        del listed[ids[3]]
        await until(pilot, lambda: table(app).row_count == 3)
        shown = {table(app).coordinate_to_cell_key((i, 0)).row_key.value for i in range(table(app).row_count)}
        assert shown == set(listed) == {r["id"] for r in reader.list_runs(store)}
        assert listed[ids[2]] == "corrupt" and {r.id: r.state for r in app.rows()}[ids[2]] == "corrupt"
        summary = str(app.screen.query_one(SummaryBar).render())
        assert "3 runs" in summary and "corrupt 1" in summary
