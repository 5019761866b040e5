"""The study's own tables (docs/study-fmnist.md), recomputed by tests/test_study.py:

- the protocol table ("Each augmentation protocol against the regularizer"): every
  augmentation configuration by protocol (noise mode, Ñ = folds + 1, sigma), with its
  eligibility in the fair table, against the regularizer the table chose: the difference in
  test R and two standard errors of it (where the augmentation has 1 seed, assuming the
  regularizer's seed spread);
- the cost table (--cost, "Cost"): what a run of each kind cost on the study's machine.

    python docs/study-fmnist/protocols.py [--tolerance T] [--select validation|test] [--cost]
"""

import argparse
import math
import sys
from pathlib import Path

from gaussreg.views import report
from gaussreg.views.export import read_runs

RUNS = Path(__file__).with_name("runs.jsonl")
MODES = report.NOISE_ORDER  # the reference's protocol first
mode = report.noise_mode


def _pm(mean: float, std: float, seeds: int) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if seeds > 1 else f"{100 * mean:.2f}"


def _x(v) -> str:
    return "—" if v is None else f"{v:.1f}"


def _verdict(d: float, se: float) -> str:
    return "yes, more robust" if d > 2 * se else "no, less robust" if d < -2 * se else "yes, within 2 SE"


def table(records, tolerance=None, select="validation") -> str:
    (rec,) = report.table_of_export(records, tolerance, select)["experiments"]
    (reg,) = [e for e in rec["best"] if e["method"] == "regularizer"]
    head = ("| protocol | Ñ | sigma | eligible | seeds | acc % | R % | ΔR, regularizer − it | 2 SE "
            "| regularizer as robust? | time × |")
    out = [f"Tolerance {100 * rec['tolerance']:.2f} %, selected on {rec['selection']}; the regularizer the table "
           f"chose: sigma {reg['params']['sigma']:g}, alpha {reg['params']['alpha']:g}, {reg['seeds']} seed(s), "
           f"acc {_pm(reg['accuracy'], reg['accuracy_std'], reg['seeds'])} %, "
           f"R {_pm(reg['robustness'], reg['robustness_std'], reg['seeds'])} %, time × {_x(reg['time_x'])}. "
           "★: the protocol's most robust eligible configuration (by selection R).", "",
           head, "|" + "---|" * (head.count("|") - 1)]
    augment = [e for e in rec["configurations"] if e["method"] == "augment"]
    for m in MODES:
        mine = [e for e in augment if mode(e["params"]) == m]
        ok = [e for e in mine if e["eligible"]]
        star = max(ok, key=lambda c: c["selection_robustness"]) if ok else None
        for e in sorted(mine, key=lambda c: (c["params"]["folds"], c["params"]["sigma"])):
            d = reg["robustness"] - e["robustness"]
            if e["seeds"] > 1 and reg["seeds"] > 1:
                se = math.sqrt(e["robustness_std"] ** 2 / e["seeds"] + reg["robustness_std"] ** 2 / reg["seeds"])
                two, verdict = f"{200 * se:.2f}", _verdict(d, se)
            elif reg["seeds"] > 1:  # one seed has no spread of its own: assume the regularizer's
                se = reg["robustness_std"] * math.sqrt(1 / e["seeds"] + 1 / reg["seeds"])
                two, verdict = f"≈ {200 * se:.2f}", _verdict(d, se)
            else:
                two, verdict = "—", "more robust (1 seed each)" if d > 0 else "less robust (1 seed each)"
            out.append(f"| {m} | {e['params']['folds'] + 1} | {e['params']['sigma']:g} "
                       f"| {('✓ ★' if e is star else '✓') if e['eligible'] else '✗'} | {e['seeds']} "
                       f"| {_pm(e['accuracy'], e['accuracy_std'], e['seeds'])} "
                       f"| {_pm(e['robustness'], e['robustness_std'], e['seeds'])} | {100 * d:+.2f} | {two} "
                       f"| {verdict} | {_x(e['time_x'])} |")
    return "\n".join(out)


def _kind(rec: dict) -> str:
    p = rec["spec"]["params"]
    if rec["method"] == "augment":
        return f"augment Ñ = {p['folds'] + 1}, {mode(p)} noise"
    if rec["method"] == "regularizer":
        return f"regularizer, depth {p.get('depth', 1)}"
    return rec["method"]


def cost_table(records) -> str:
    """Per kind of run: how many, epochs run (early stopping decides), training CPU seconds
    per run (the epochs with their validation) and against the baseline's, the R evaluation's
    seconds per run, and CPU-minutes of all its runs (wall time, so process start and data
    loading included)."""
    kinds: dict = {}
    for rec in records:
        kinds.setdefault(_kind(rec), []).append(rec)
    base = sum(r["result"]["train_cpu_s"] for r in kinds["baseline"]) / len(kinds["baseline"])
    head = "| kind | runs | epochs run | training CPU s per run (× baseline) | R evaluation s per run | CPU-minutes, all runs |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    rows = []
    for kind, rs in kinds.items():
        epochs = sorted(r["result"]["epochs_run"] for r in rs)
        train = sum(r["result"]["train_cpu_s"] for r in rs) / len(rs)
        rows.append((train, f"| {kind} | {len(rs)} | {epochs[0]}-{epochs[-1]} | {train:.0f} ({train / base:.1f}×) "
                            f"| {sum(r['result']['robustness_time_s'] for r in rs) / len(rs):.0f} "
                            f"| {sum(r['result']['wall_time_s'] for r in rs) / 60:.1f} |"))
    out += [row for _, row in sorted(rows, key=lambda r: r[0])]
    total = sum(r["result"]["wall_time_s"] for r in records) / 60
    out.append(f"| all | {len(records)} | | | | {total:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tolerance", type=float)
    p.add_argument("--select", default="validation", choices=report.SELECTIONS)
    p.add_argument("--cost", action="store_true", help="the cost table instead")
    a = p.parse_args(argv)
    print(cost_table(read_runs(RUNS)) if a.cost else table(read_runs(RUNS), a.tolerance, a.select))
    return 0


if __name__ == "__main__":
    sys.exit(main())
