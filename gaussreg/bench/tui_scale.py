"""TUI at scale: a store of 2,000 runs, 16 of them writing an epoch every second.

    python -m gaussreg.bench.tui_scale [--runs 2000] [--live 16] [--minutes 10] [--out bench/results/tui-scale.json]

Measures, headless (App.run_test): the time from start until the runs table holds every
run; input latency (a key press until the app has handled it and is idle again) while
the live runs stream; and the process's resident memory over the whole duration."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from gaussreg.runs.spec import resolve, run_id
from gaussreg.runs.store import Store, atomic_write_json, now_iso


def make_store(root: Path, runs: int, live: int) -> list:
    st = Store(root)
    st.write_experiment("scale", {"tolerance": 0.01})
    live_runs = []
    methods = [("baseline", {}), ("augment", {"sigma": 0.25, "folds": 2}), ("regularizer", {"sigma": 0.5, "alpha": 1})]
    for i in range(runs):
        name, params = methods[i % 3]
        spec = resolve({"dataset": "synthetic", "model": "mlp", "method": name, "params": params, "seed": i,
                        "experiment": "scale", "max_epochs": 100})
        run = st.create(spec, run_id(spec))
        events = [{"type": "epoch", "epoch": e, "train_loss": 1.0 / e, "train_terms": {}, "val_loss": 1.2 / e,
                   "val_ce": 1.2 / e, "val_accuracy": 0.8, "lr": 1e-3, "epoch_time": 1.0, "images_per_s": 1e4,
                   "best": True} for e in range(1, 21)]
        run.events_file.write_text("".join(json.dumps(e) + "\n" for e in events))
        if i < live:
            run.write_status({"state": "running", "pid": os.getpid(), "host": socket.gethostname(),
                              "started_at": now_iso(), "updated_at": now_iso(), "epoch": 20, "max_epochs": 100})
            live_runs.append(run)
        else:
            run.write_status({"state": "completed", "pid": 1, "host": "x", "started_at": now_iso(),
                              "finished_at": now_iso(), "updated_at": now_iso(), "epoch": 20, "max_epochs": 100})
            atomic_write_json(run.result_file, {"test_accuracy": 0.8 + (i % 100) / 1000, "robustness": 0.6,
                                                        "epochs_run": 20, "best_val_accuracy": 0.8})
    return live_runs


def writer(live_runs, stop: threading.Event) -> None:
    """Each live run appends one epoch event and refreshes its heartbeat every second."""
    epoch = 20
    while not stop.wait(1.0):
        epoch += 1
        for run in live_runs:
            with open(run.events_file, "a") as f:
                f.write(json.dumps({"type": "epoch", "epoch": epoch, "train_loss": 1.0 / epoch, "train_terms": {},
                                    "val_loss": 1.2 / epoch, "val_ce": 1.2 / epoch, "val_accuracy": 0.9,
                                    "lr": 1e-3, "epoch_time": 1.0, "images_per_s": 1e4, "best": True}) + "\n")
            st = run.status()
            st.update(epoch=epoch, updated_at=now_iso())
            run.write_status(st)


async def measure(store: Path, runs: int, seconds: float) -> dict:
    from tui.app import GaussregApp  # here: the core imports the TUI only to benchmark it
    from tui.widgets import RunsTable  # here: the core imports the TUI only to benchmark it
    proc = psutil.Process()
    t0 = time.perf_counter()
    app = GaussregApp(str(store), poll_s=1.0)
    out = {}
    async with app.run_test(size=(160, 48)) as pilot:
        while not (app.loaded and app.screen.query(RunsTable) and app.screen.query_one(RunsTable).row_count == runs):
            await asyncio.sleep(0.01)
        out["open_s"] = time.perf_counter() - t0
        latencies, rss = [], []
        start = time.perf_counter()
        keys = ["down"] * 20 + ["up"] * 20
        while time.perf_counter() - start < seconds:
            for key in keys[:4]:
                t = time.perf_counter()
                await pilot.press(key)
                latencies.append(time.perf_counter() - t)
            keys = keys[4:] + keys[:4]
            rss.append((round(time.perf_counter() - start, 1), proc.memory_info().rss / 2**20))
            await asyncio.sleep(0.25)
        live = [r for r in app.rows() if r.state == "running"]
        live_epochs = sorted({r.epoch for r in live})
    lat = sorted(latencies)
    out.update(key_presses=len(lat), latency_ms_median=1000 * statistics.median(lat),
               latency_ms_p95=1000 * lat[int(0.95 * len(lat))], latency_ms_max=1000 * lat[-1],
               rss_mib_first=rss[0][1], rss_mib_last=rss[-1][1], rss_mib_max=max(r for _, r in rss),
               rss_samples=rss[:: max(1, len(rss) // 20)], live_rows=len(live),
               live_epochs_seen_at_end=live_epochs, seconds_streamed=seconds)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--live", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        t = time.perf_counter()
        live = make_store(root, a.runs, a.live)
        made = time.perf_counter() - t
        stop = threading.Event()
        th = threading.Thread(target=writer, args=(live, stop), daemon=True)
        th.start()
        try:
            res = asyncio.run(measure(root, a.runs, a.minutes * 60))
        finally:
            stop.set()
            th.join()
    res = {"runs": a.runs, "live": a.live, "minutes": a.minutes, "store_build_s": made, **res,
           "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
