"""Figures of the fair comparison (`gaussreg plot`), with matplotlib's headless Agg
backend: the paper's Figure 3 (clean accuracy against R per run, by method, with the
tolerance band), Figure 4/5 (best eligible configuration per training sigma against
the baseline) and the robustness and accuracy-under-noise curves of the chosen
configurations. matplotlib is the optional extra `plots`."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import List, Optional

from gaussreg.runs import reader
from gaussreg.runs.spec import describe_params
from gaussreg.runs.store import Store, atomic_write_bytes
from gaussreg.science.methods import METHOD_CLASSES
from gaussreg.views import report

FORMATS = ("png", "svg", "pdf")
# the TUI's hues (tui/screens/compare.py METHOD_COLORS); the TUI's white baseline is black on paper
COLORS = {"baseline": "black", "augment": "orange", "regularizer": "#00a6b8", "randsign": "magenta",
          "fgsm": "red"}
MARKERS = {"baseline": "s", "augment": "^", "regularizer": "o", "randsign": "D", "fgsm": "v"}


class PlotsUnavailable(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib  # here: matplotlib is the optional extra `plots`
    except ImportError:
        raise PlotsUnavailable('gaussreg plot needs matplotlib: pip install "gaussreg[plots]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # here: matplotlib is the optional extra `plots`
    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")


def _mean_curve(results: List[dict], key: str) -> Optional[tuple]:
    curves = [(r.get("sigmas"), r.get(key)) for r in results if r.get("sigmas") and r.get(key)]
    if not curves or any(c[0] != curves[0][0] or len(c[1]) != len(c[0]) for c in curves):
        return None
    sig = curves[0][0]
    return sig, [sum(c[1][i] for c in curves) / len(curves) for i in range(len(sig))]


def plot(store: Store, out_dir, experiment: Optional[str] = None, fmt: str = "png",
         select: str = "validation", tolerance: Optional[float] = None, budget: Optional[float] = None,
         warn=None) -> List[Path]:
    """Write three figures per comparison into out_dir; returns their paths. `tolerance`
    overrides the experiments' own and `budget` limits the training time, as in
    report.fair_table, so figures can match a table."""
    plt = _pyplot()
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    table = report.fair_table(store, experiment, tolerance, select, budget, warn)
    if not table["experiments"]:
        return []  # nothing to draw: no empty folder left behind
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {r["id"]: r for r in reader.list_runs(store, experiment) if r["result"]}
    written = []
    for rec in table["experiments"]:
        setting = report._setting_text(rec)
        stem = _slug(rec["experiment"] + ("-" + setting if setting else ""))
        budget_text = [f"budget {budget:g}× the baseline's time"] if rec["budget"] else []
        title = " · ".join([rec["experiment"], rec["dataset"], rec["model"]] + ([setting] if setting else [])
                           + budget_text)
        ids = {i for c in rec["configurations"] for i in c["run_ids"]}
        runs = [results[i] for i in sorted(ids) if i in results]
        for name, draw in (("accuracy-vs-robustness", _fig_scatter), ("per-sigma", _fig_per_sigma),
                           ("curves", _fig_curves)):
            fig = draw(plt, rec, runs, results, title)
            path = out_dir / f"{stem}-{name}.{fmt}"
            buf = io.BytesIO()
            try:
                fig.savefig(buf, format=fmt, dpi=150, bbox_inches="tight")
            finally:
                plt.close(fig)
            # atomic, and its temp file removed when the write fails (a full disk)
            atomic_write_bytes(path, buf.getvalue())
            written.append(path)
    return written


def _legend(ax):
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, frameon=False)


def _fig_scatter(plt, rec, runs, results, title):
    """Figure 3: clean test accuracy against R, one point per run, with the tolerance band."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method = {}
    for r in runs:
        by_method.setdefault(r["spec"]["method"], []).append(r["result"])
    for m, rs in sorted(by_method.items(), key=lambda kv: list(METHOD_CLASSES).index(kv[0]) if kv[0] in METHOD_CLASSES else 99):
        ax.scatter([x["test_accuracy"] * 100 for x in rs], [x["robustness"] * 100 for x in rs], s=28,
                   color=COLORS.get(m, "grey"), marker=MARKERS.get(m, "o"), label=f"{m} ({len(rs)})",
                   alpha=0.85, edgecolors="none")
    chosen = [results[i]["result"] for e in rec["best"] for i in e["run_ids"] if i in results]
    if chosen:
        ax.scatter([x["test_accuracy"] * 100 for x in chosen], [x["robustness"] * 100 for x in chosen], s=110,
                   facecolors="none", edgecolors="black", linewidths=0.9,
                   label=f"chosen (best eligible, on {rec['selection']})")
    b = rec["baseline"]
    if b:
        a0 = b["accuracy"] * 100
        ax.axvline(a0, color="black", lw=0.8, ls="--", label="baseline accuracy $a_0$")
        # the limits are fixed once every point and line is drawn: the band then reaches the
        # right edge (drawn to the limits of its moment, a later autoscale left a gap)
        lo, hi = ax.get_xlim()
        edge = a0 - rec["tolerance"] * 100
        lo = min(lo, edge - 0.05 * (hi - lo))  # its left edge stays in view
        ax.axvspan(edge, hi, color="0.85", alpha=0.5, zorder=0,
                   label=f"test accuracy ≥ $a_0$ − {rec['tolerance'] * 100:.2f}%")
        ax.set_xlim(lo, hi)
    ax.set_xlabel("clean test accuracy (%)")
    ax.set_ylabel("robustness R (%)")
    ax.set_title(f"{title}\naccuracy vs robustness, every completed run (test numbers)", fontsize=9)
    ax.grid(alpha=0.3)
    _legend(ax)
    return fig


def _fig_per_sigma(plt, rec, runs, results, title):
    """Figure 4/5: R of the best eligible configuration per training sigma, per method,
    against the baseline."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method = {}
    for e in rec["best_per_sigma"]:
        by_method.setdefault(e["method"], []).append(e)
    for m, es in by_method.items():
        es = sorted(es, key=lambda e: e["sigma"])
        ax.errorbar([e["sigma"] for e in es], [e["robustness"] * 100 for e in es],
                    yerr=[(e["robustness_std"] or 0) * 100 for e in es], color=COLORS.get(m, "grey"),
                    marker=MARKERS.get(m, "o"), capsize=3, label=f"best eligible {m}")
    b = rec["baseline"]
    if b:
        ax.axhline(b["robustness"] * 100, color=COLORS["baseline"], ls="--", lw=1, label="baseline")
    trained = sorted({e["sigma"] for es in by_method.values() for e in es})
    if trained and trained[-1] / max(trained[0], 1e-9) > 20:
        ax.set_xscale("log")
    if trained:
        ax.set_xticks(trained, [f"{v:g}" for v in trained])  # the sigmas trained at, not a grid between them
        ax.minorticks_off()
    xlabel = "training sigma (pixel units, [0, 1] images)"
    if len(trained) == 1:  # one point per method: an axis around it would invent a scale
        ax.set_xlim(0, 2 * trained[0] if trained[0] > 0 else 1)
        xlabel += f"\nonly one training sigma ({trained[0]:g}) is eligible: no trend across sigmas to show"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("robustness R (%)")
    ax.set_title(f"{title}\nbest eligible configuration per training sigma "
                 f"(selected on {rec['selection']}; test R, ± std over seeds)", fontsize=9)
    if not by_method:
        ax.text(0.5, 0.5, "no eligible configuration with a training sigma", ha="center", va="center",
                transform=ax.transAxes)
    ax.grid(alpha=0.3)
    _legend(ax)
    return fig


def _fig_curves(plt, rec, runs, results, title):
    """Consistency with the clean prediction and accuracy under noise against the test
    sigma, for the chosen configuration of each method (mean over its seeds)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for e in rec["best"]:
        rs = [results[i]["result"] for i in e["run_ids"] if i in results]
        m = e["method"]
        label = f"{m} {report_params(e)}".strip()
        for ax, key in ((a1, "per_sigma"), (a2, "accuracy_per_sigma")):
            c = _mean_curve(rs, key)
            if c:
                ax.plot(c[0], [v * 100 for v in c[1]], color=COLORS.get(m, "grey"), marker=MARKERS.get(m, "o"),
                        markersize=3, label=label)
    a1.set_ylabel("prediction unchanged (%)")
    a2.set_ylabel("accuracy under noise (%)")
    for ax in (a1, a2):
        ax.set_xlabel("test noise sigma (pixel units)")
        ax.grid(alpha=0.3)
    a1.set_title("consistency (R is its average)", fontsize=9)
    a2.set_title("accuracy against the labels", fontsize=9)
    fig.suptitle(f"{title}: chosen configurations (selected on {rec['selection']})", fontsize=9)
    _legend(a2)
    return fig


def report_params(e: dict) -> str:
    return describe_params(e)
