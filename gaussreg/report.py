"""The fair comparison (paper Sec. 4.3): only models whose clean test accuracy is within
a tolerance of the baseline are compared, by robustness.

Runs that differ only by seed form one configuration whose accuracy and robustness
are the means over its completed seeds."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from typing import List, Optional

from .spec import PARAMS, describe_params
from .store import RunFileError, Store

EPS = 1e-12  # accuracies are ratios of integers; keep "equal to a0 - tol" eligible


def _config_key(spec: dict) -> str:
    return json.dumps({"method": spec["method"], "params": spec.get("params", {})}, sort_keys=True)


def collect(store: Store, experiment: Optional[str] = None) -> List[dict]:
    """One row per run: spec, state and result (None unless completed); unreadable runs
    are reported with state 'corrupt'."""
    rows = []
    for run in store.runs():
        try:
            spec = run.spec()
        except RunFileError as e:
            rows.append({"id": run.id, "spec": None, "state": "corrupt", "result": None, "error": str(e)})
            continue
        if experiment and spec.get("experiment") != experiment:
            continue
        try:
            status = run.status()
            state = run.state(status)
            result = run.result() if state == "completed" else None
            error = status.get("error")
        except RunFileError as e:
            state, result, error = "corrupt", None, str(e)
        rows.append({"id": run.id, "spec": spec, "state": state, "result": result, "error": error})
    return rows


def _configs(rows: List[dict]) -> List[dict]:
    groups = defaultdict(list)
    for r in rows:
        groups[_config_key(r["spec"])].append(r)
    out = []
    for runs in groups.values():
        done = [r for r in runs if r["result"]]
        spec = runs[0]["spec"]
        cfg = {"method": spec["method"], "params": spec.get("params", {}),
               "run_ids": sorted(r["id"] for r in done), "seeds": sorted(r["spec"].get("seed", 0) for r in done),
               "accuracy": None, "robustness": None}
        if done:
            cfg["accuracy"] = sum(r["result"]["test_accuracy"] for r in done) / len(done)
            cfg["robustness"] = sum(r["result"]["robustness"] for r in done) / len(done)
        out.append(cfg)
    return out


def _best(cfgs: List[dict]) -> Optional[dict]:
    # ties: more accurate first, then the smaller id for a stable answer
    return min(cfgs, key=lambda c: (-c["robustness"], -c["accuracy"], c["run_ids"][0]), default=None)


def compare(rows: List[dict], experiment: str, dataset: str, model: str, tolerance: float) -> dict:
    """The fair-comparison record of one (experiment, dataset, model)."""
    cfgs = _configs(rows)
    base_runs = [r for r in rows if r["spec"]["method"] == "baseline" and r["result"]]
    rec = {"experiment": experiment, "dataset": dataset, "model": model, "tolerance": tolerance,
           "baseline": None, "best": [], "best_per_sigma": [], "equivalent_folds": None, "counts": {}}
    present = {r["spec"]["method"] for r in rows}
    methods = [m for m in PARAMS if m in present]
    eligible = []
    if base_runs:
        a0 = sum(r["result"]["test_accuracy"] for r in base_runs) / len(base_runs)
        r0 = sum(r["result"]["robustness"] for r in base_runs) / len(base_runs)
        rec["baseline"] = {"accuracy": a0, "robustness": r0, "runs": len(base_runs),
                           "run_ids": sorted(r["id"] for r in base_runs)}
        eligible = [c for c in cfgs if c["accuracy"] is not None and c["accuracy"] >= a0 - tolerance - EPS]

        def entry(c, **extra):
            return {"method": c["method"], "params": c["params"], **extra, "accuracy": c["accuracy"],
                    "robustness": c["robustness"], "d_accuracy": c["accuracy"] - a0,
                    "d_robustness": c["robustness"] - r0, "seeds": len(c["run_ids"]), "run_ids": c["run_ids"]}

        for m in methods:
            best = _best([c for c in eligible if c["method"] == m])
            if best:
                rec["best"].append(entry(best))
            sigmas = sorted({c["params"]["sigma"] for c in eligible if c["method"] == m and "sigma" in c["params"]})
            for s in sigmas:
                b = _best([c for c in eligible if c["method"] == m and c["params"].get("sigma") == s])
                rec["best_per_sigma"].append(entry(b, sigma=s))
        rec["equivalent_folds"] = _equivalent_folds(cfgs, eligible)
    eligible_ids = {i for c in eligible for i in c["run_ids"]}
    for m in methods:
        mine = [r for r in rows if r["spec"]["method"] == m]
        rec["counts"][m] = {"total": len(mine), "completed": sum(1 for r in mine if r["state"] == "completed"),
                            "eligible": sum(1 for r in mine if r["id"] in eligible_ids)}
    return rec


def _equivalent_folds(cfgs, eligible) -> Optional[dict]:
    """The smallest `folds` whose best eligible augment run is at least as robust as the
    best eligible regularizer run: how much augmentation the regularizer replaces."""
    reg = _best([c for c in eligible if c["method"] == "regularizer"])
    tried = sorted({c["params"]["folds"] for c in cfgs if c["method"] == "augment"})
    if reg is None:
        return {"folds": None, "text": "no eligible regularizer run"}
    if not tried:
        return {"folds": None, "text": "no augment runs"}
    for f in tried:
        b = _best([c for c in eligible if c["method"] == "augment" and c["params"]["folds"] == f])
        if b and b["robustness"] >= reg["robustness"]:
            return {"folds": f, "text": str(f), "regularizer_robustness": reg["robustness"],
                    "augment_robustness": b["robustness"]}
    return {"folds": None, "text": f"> {tried[-1]}", "max_folds_tried": tried[-1],
            "regularizer_robustness": reg["robustness"]}


def fair_table(store: Store, experiment: Optional[str] = None, tolerance: Optional[float] = None) -> dict:
    """The JSON form of `gaussreg table`: one record per (experiment, dataset, model)."""
    rows = [r for r in collect(store, experiment) if r["spec"] is not None]
    groups = defaultdict(list)
    for r in rows:
        s = r["spec"]
        groups[(s.get("experiment", ""), s["dataset"], s["model"])].append(r)
    out = []
    for (exp, ds, model), rs in sorted(groups.items()):
        tol = tolerance if tolerance is not None else float(store.experiment(exp).get("tolerance", 0.0))
        out.append(compare(rs, exp, ds, model, tol))
    return {"experiments": out}


# ---------------------------------------------------------------- rendering

def _pct(v, signed=False) -> str:
    if v is None:
        return "-"
    return f"{v * 100:+.2f}" if signed else f"{v * 100:.2f}"


def _rows(rec: dict) -> List[List[str]]:
    rows = []
    for e in rec["best"]:
        rows.append([e["method"], describe_params(e), _pct(e["accuracy"]), _pct(e["d_accuracy"], True),
                     _pct(e["robustness"]), _pct(e["d_robustness"], True), str(e["seeds"])])
    return rows


HEADER = ["method", "params", "acc %", "Δacc", "R %", "ΔR", "seeds"]


def _title(rec) -> str:
    b = rec["baseline"]
    base = (f"baseline acc {_pct(b['accuracy'])}%, R {_pct(b['robustness'])}% ({b['runs']} run(s))"
            if b else "no completed baseline run yet")
    return f"{rec['experiment']} · {rec['dataset']} · {rec['model']} · tolerance {rec['tolerance'] * 100:.2f}% · {base}"


def _footer(rec) -> List[str]:
    lines = []
    ef = rec["equivalent_folds"]
    if ef:
        lines.append(f"equivalent folds of augmentation: {ef['text']}")
    counts = ", ".join(f"{m} {c['eligible']}/{c['completed']}/{c['total']}" for m, c in rec["counts"].items())
    lines.append(f"runs eligible/completed/total: {counts}")
    return lines


def render_rich(table: dict):
    """Rich renderables, one table per experiment."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text
    parts = []
    if not table["experiments"]:
        return Text("no runs in the store")
    for rec in table["experiments"]:
        t = Table(title=escape(_title(rec)), title_justify="left", caption=escape("\n".join(_footer(rec))),
                  caption_justify="left")
        for h in HEADER:
            t.add_column(h, justify="right" if h not in ("method", "params") else "left")
        for r in _rows(rec):
            t.add_row(*map(escape, r))
        parts.append(t)
        if rec["best_per_sigma"]:
            s = Table(title="best eligible per training sigma", title_justify="left")
            for h in ["method", "sigma", "params", "acc %", "R %"]:
                s.add_column(h)
            for e in rec["best_per_sigma"]:
                s.add_row(e["method"], f"{e['sigma']:g}", escape(describe_params(e)), _pct(e["accuracy"]),
                          _pct(e["robustness"]))
            parts.append(s)
    return Group(*parts)


def render_markdown(table: dict) -> str:
    out = []
    for rec in table["experiments"]:
        out.append(f"### {_title(rec)}\n")
        out.append("| " + " | ".join(HEADER) + " |")
        out.append("|" + "---|" * len(HEADER))
        out.extend("| " + " | ".join(r) + " |" for r in _rows(rec))
        out.append("")
        out.extend(f"- {line}" for line in _footer(rec))
        out.append("")
    return "\n".join(out)


def render_csv(table: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["experiment", "dataset", "model", "tolerance", "method", "params", "accuracy",
                "d_accuracy", "robustness", "d_robustness", "seeds", "run_ids"])
    for rec in table["experiments"]:
        for e in rec["best"]:
            w.writerow([rec["experiment"], rec["dataset"], rec["model"], rec["tolerance"], e["method"],
                        json.dumps(e["params"], sort_keys=True), e["accuracy"], e["d_accuracy"], e["robustness"],
                        e["d_robustness"], e["seeds"], " ".join(e["run_ids"])])
    return buf.getvalue()
