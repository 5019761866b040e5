"""The dashboard with the Slurm backend, against the fake sbatch/squeue/scancel of
test_slurm.py: the launch dialog submits through gaussreg.launch.request (as `gaussreg run
--backend slurm`), the runs table shows job ids and pending reasons, `r` resubmits."""

import os
from pathlib import Path

import pytest
from test_slurm import fake_slurm  # noqa: F401 - the fixture
from test_tui import table, until, widget

from gaussreg.runs.store import Store
from tui.app import GaussregApp
from tui.screens import LaunchScreen, RunsScreen


@pytest.fixture
def on_path(fake_slurm, monkeypatch):
    monkeypatch.chdir(fake_slurm["dir"])
    monkeypatch.setenv("PATH", f"{fake_slurm['bin']}:{os.environ['PATH']}")  # the fakes first
    return fake_slurm


async def _open_dialog_on_slurm(pilot):
    app = pilot.app
    await pilot.press("l")
    sel = await widget(pilot, LaunchScreen, "SelectionList")
    await until(pilot, lambda: sel.option_count == 1)
    assert not app.screen.query_one("#slurm-row").display and app.screen.query_one("#local-row").display
    app.screen.query_one("#backend").value = "slurm"
    await until(pilot, lambda: app.screen.query_one("#slurm-row").display)
    assert not app.screen.query_one("#local-row").display
    # the manifest's [slurm] values are what an empty field means
    assert app.screen.query_one("#partition").placeholder == "gpu"
    assert app.screen.query_one("#time").placeholder == "01:00:00"


async def test_launch_dialog_submits_to_slurm_with_its_fields_at_80x24(on_path):
    app = GaussregApp("runs", manifest="m.toml", poll_s=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        await _open_dialog_on_slurm(pilot)
        await pilot.click("#partition")  # reachable at 80x24: clicks land on the fields
        await pilot.press(*"short")
        await pilot.click("#time")
        await pilot.press(*"00:30:00")
        await pilot.click("#gpus-per-run")
        await pilot.press("0")  # over the manifest's 1: a CPU task
        await pilot.click("#launch")
        await until(pilot, lambda: isinstance(app.screen, RunsScreen))
        await until(pilot, lambda: table(app).row_count == 3 and all(
            table(app).get_cell(table(app).coordinate_to_cell_key((i, 0)).row_key.value, "state").plain
            .startswith("queued 4242_") for i in range(3)), timeout=30)
    (args,) = on_path["calls"]("sbatch")
    assert "--partition=short" in args and "--time=00:30:00" in args and not any(a.startswith("--gres") for a in args)
    assert "--mem=2G" in args  # not in the dialog: the manifest's
    statuses = [r.status() for r in Store("runs").runs()]
    assert sorted(s["slurm_job"] for s in statuses) == ["4242_0", "4242_1", "4242_2"]
    assert not (on_path["dir"] / "runs" / "_launches").exists()  # no local scheduler was started


@pytest.mark.parametrize("field,value,words", [
    ("#time", "an hour", "time: must be a Slurm time like 04:00:00"),
    ("#gpus-per-run", "two", "GPUs per run must be a whole number"),
    ("#gpus-per-run", "2", "gpus_per_run: must be 0 or 1, not 2: a run trains on one GPU"),
    (None, None, "`sbatch` is not on PATH"),
])
async def test_launch_dialog_shows_slurm_errors_and_submits_nothing(on_path, monkeypatch, field, value, words):
    if field is None:
        (on_path["bin"] / "sbatch").unlink()
        monkeypatch.setenv("PATH", str(on_path["bin"]))  # a real Slurm may be installed here
    app = GaussregApp("runs", manifest="m.toml", poll_s=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        await _open_dialog_on_slurm(pilot)
        if field:
            app.screen.query_one(field).value = value
        await pilot.click("#launch")
        error = app.screen.query_one("#plan-error")
        await until(pilot, lambda: words in str(error.render()))
        assert isinstance(app.screen, LaunchScreen)
    assert on_path["calls"]("sbatch") == [] and not (on_path["dir"] / "runs").exists()


def _cell(app, i):
    return table(app).get_cell(table(app).coordinate_to_cell_key((i, 0)).row_key.value, "state")


async def test_runs_table_shows_job_ids_and_pending_reasons_polling_squeue_at_most_every_10s(on_path):
    import time
    on_path["submit"]()
    jobs = {r.id: r.status()["slurm_job"] for r in Store("runs").runs()}
    (on_path["dir"] / "squeue.txt").write_text("4242_0|PENDING|Resources\n4242_1|PENDING|PartitionConfig\n"
                                               "4242_2|RUNNING|None\n")
    before = len(on_path["calls"]("squeue"))
    app = GaussregApp("runs", manifest="m.toml", poll_s=0.02)
    t0 = time.monotonic()
    async with app.run_test(size=(160, 30)) as pilot:
        await until(pilot, lambda: table(app).row_count == 3)
        want = {"4242_0": "queued 4242_0 (Resources)", "4242_1": "queued 4242_1 (PartitionConfig)",
                "4242_2": "queued 4242_2"}  # a task Slurm runs has no pending reason
        await until(pilot, lambda: sorted(_cell(app, i).plain for i in range(3)) == sorted(want.values()))
        fatal = next(i for i in range(3) if "PartitionConfig" in _cell(app, i).plain)
        assert any("red" in str(span.style) for span in _cell(app, fatal).spans)
        scans = app.watcher.scans
        await until(pilot, lambda: app.watcher.scans >= scans + 50)  # 50 more scans of the store
        elapsed = time.monotonic() - t0
    calls = len(on_path["calls"]("squeue")) - before
    assert 1 <= calls <= 1 + elapsed // 10 and calls == app.watcher.squeue_calls, (calls, elapsed)
    assert set(jobs.values()) == set(want)


def test_a_queued_slurm_run_that_squeue_no_longer_lists_says_so(on_path):
    from tui.watcher import StoreWatcher
    on_path["submit"]()
    (on_path["dir"] / "squeue.txt").write_text("4242_0|PENDING|Priority\n")  # 4242_1 and 4242_2 vanished
    w = StoreWatcher("runs")
    w.scan()  # the first scan finds the runs; squeue is asked once Slurm runs are known
    w.scan()
    reasons = sorted((r.slurm_job, r.slurm_reason) for r in w.rows())
    assert reasons == [("4242_0", "Priority"), ("4242_1", "not in squeue"), ("4242_2", "not in squeue")]
    assert w.squeue_calls == 1
    w.scan()
    assert w.squeue_calls == 1  # not again within 10 s


async def _rerun_from_the_table(app, pilot, run_id):
    await until(pilot, lambda: table(app).row_count == 3 and table(app).get_cell(run_id, "state").plain
                .startswith("cancelled"))
    table(app).move_cursor(row=table(app).get_row_index(run_id))
    await pilot.press("r")
    await until(pilot, lambda: app.screen.__class__.__name__ == "ConfirmScreen")
    await pilot.press("y")


async def test_r_on_a_slurm_run_resubmits_it_through_slurm_with_its_settings(on_path):
    on_path["submit"](partition="short", time="00:20:00")
    run = next(x for x in Store("runs").runs() if x.status()["slurm_job"] == "4242_1")
    run.write_status({**run.status(), "state": "cancelled", "error": "cancelled by SIGTERM"})
    app = GaussregApp("runs", manifest="m.toml", poll_s=0.05)
    async with app.run_test(size=(160, 30)) as pilot:
        await _rerun_from_the_table(app, pilot, run.id)
        await until(pilot, lambda: any("resubmitted" in n.message for n in app._notifications))
        await until(pilot, lambda: table(app).get_cell(run.id, "state").plain == "queued 4242_0")
    first, again = on_path["calls"]("sbatch")
    assert "--array=0-0" in again and again[-1] == "0" and Path(again[-2]).parent != Path(first[-2]).parent
    same = [a for a in first if a.split("=")[0] in ("--partition", "--time", "--gres", "--mem", "--signal")]
    assert same and all(a in again for a in same)  # the settings it was submitted with
    listed = (Path(again[-2]).parent / "runs.txt").read_text().split()
    assert [Path(x).name for x in listed] == [run.id]
    status = run.status()
    assert status["state"] == "queued" and status["slurm_launch"] == Path(again[-2]).parent.name
    assert not run.file("worker.log").exists()  # nothing trained on this (login) node


async def test_r_on_a_slurm_run_without_recorded_settings_is_refused_with_the_reason(on_path):
    on_path["submit"]()
    run = next(x for x in Store("runs").runs() if x.status()["slurm_job"] == "4242_2")
    old = {k: v for k, v in run.status().items() if k != "slurm_launch"}  # as an older gaussreg wrote it
    run.write_status({**old, "state": "failed", "error": "boom"})
    app = GaussregApp("runs", manifest="m.toml", poll_s=0.05)
    async with app.run_test(size=(160, 30)) as pilot:
        await until(pilot, lambda: table(app).row_count == 3)
        await until(pilot, lambda: table(app).get_cell(run.id, "state").plain.startswith("failed"))
        table(app).move_cursor(row=table(app).get_row_index(run.id))
        await pilot.press("r")
        await until(pilot, lambda: app.screen.__class__.__name__ == "ConfirmScreen")
        await pilot.press("y")
        await until(pilot, lambda: any("no record of its Slurm settings" in n.message for n in app._notifications))
    assert len(on_path["calls"]("sbatch")) == 1 and run.status()["state"] == "failed"
    assert not run.file("worker.log").exists()


def test_resubmit_leaves_a_run_slurm_requeues_and_restarts_a_diverged_one(on_path):
    from gaussreg.launch import slurm
    from gaussreg.launch.control import ControlError
    on_path["submit"]()
    runs = {x.status()["slurm_job"]: x for x in Store("runs").runs()}
    pre = runs["4242_0"]
    pre.write_status({**pre.status(), "state": "interrupted"})  # preempted: Slurm requeues its task
    (on_path["dir"] / "squeue.txt").write_text("4242_0|PENDING|BeginTime\n")
    with pytest.raises(ControlError, match="requeues it"):
        slurm.resubmit(pre)
    with pytest.raises(ControlError, match="is queued in Slurm job 4242_1; cancel it first"):
        slurm.resubmit(runs["4242_1"])
    div = runs["4242_2"]
    div.write_status({**div.status(), "state": "diverged"})
    div.file("last.pt").write_bytes(b"a checkpoint that diverges again")
    sub = slurm.resubmit(div)
    assert sub.submitted == [div.id] and not div.file("last.pt").exists()  # from scratch
    assert len(on_path["calls"]("sbatch")) == 2
