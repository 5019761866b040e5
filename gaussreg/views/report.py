"""The fair comparison (paper Sec. 4.3): only models whose clean accuracy is within a
tolerance of the baseline are compared, by robustness.

A *configuration* is a resolved spec minus the seed (and minus where it ran: device,
data_dir); its runs are seeds, summarised as n, mean and standard deviation. A
*comparison* is one experiment at one value of every non-method axis (dataset, model,
max_epochs, train_subset, optimizer, ...): each has its own baseline and its own table.

Selection (eligibility and the winner) is made on validation numbers by default: the
best validation accuracy and the robustness R on a fixed validation subset that the
worker measures at the end of training. `select="test"` selects on test numbers, as
the paper did. The table always reports test numbers of the chosen configurations."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter, defaultdict
from typing import Callable, Dict, Iterable, List, Optional

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from gaussreg.runs.reader import list_runs
from gaussreg.runs.spec import describe_params
from gaussreg.runs.store import RunDir, RunFileError, Store
from gaussreg.science.methods import METHOD_CLASSES
from gaussreg.science.robustness import score_of

EPS = 1e-12  # accuracies are ratios of integers; keep "equal to a0 - tol" eligible
SELECTIONS = ("validation", "test")
# keys that say where or which repeat a run is, not what it computes
# certify: a certificate, not a training setting; python_path: where a user's code is (model_source says what)
NOT_CONFIG = {"seed", "device", "data_dir", "certify", "python_path"}
# keys that tell the configurations of one comparison apart (the rest is the comparison's setting)
CONFIG_ONLY = NOT_CONFIG | {"method", "params", "experiment", "version"}


def config_key(spec: dict) -> str:
    """The resolved spec minus the seed and the place it ran: runs with equal keys are seeds."""
    return json.dumps({k: v for k, v in spec.items() if k not in NOT_CONFIG}, sort_keys=True)


def _setting(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k not in CONFIG_ONLY}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def run_metrics(result: dict) -> dict:
    """The numbers of one completed run that the comparison uses. Noisy accuracy is the
    trapezoidal average over the sigma grid of the accuracy against the labels (the
    same average as R, which is against the clean predictions)."""
    def noisy(sig, acc):
        if isinstance(sig, list) and isinstance(acc, list) and sig and len(sig) == len(acc):
            return score_of(sig, acc)
        return None
    return {"test_accuracy": _num(result.get("test_accuracy")), "test_robustness": _num(result.get("robustness")),
            "test_noisy_accuracy": noisy(result.get("sigmas"), result.get("accuracy_per_sigma")),
            "val_accuracy": _num(result.get("best_val_accuracy")),
            "val_robustness": _num(result.get("val_robustness")),
            "val_noisy_accuracy": noisy(result.get("sigmas"), result.get("val_accuracy_per_sigma"))}


def spread(values: List[float]) -> dict:
    """n, mean and sample standard deviation (None for one value)."""
    n = len(values)
    if not n:
        return {"n": 0, "mean": None, "std": None}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std}


def _configs(rows: List[dict], select: str) -> List[dict]:
    groups = defaultdict(list)
    for r in rows:
        groups[config_key(r["spec"])].append(r)
    out = []
    for runs in groups.values():
        done = [r for r in runs if r["result"]]
        spec = runs[0]["spec"]
        metrics = [run_metrics(r["result"]) for r in done]
        stats = {k: spread([m[k] for m in metrics if m[k] is not None]) for k in (metrics[0] if metrics else {})}
        cfg = {"method": spec["method"], "params": spec.get("params", {}),
               "run_ids": sorted(r["id"] for r in done), "seeds": sorted(r["spec"].get("seed", 0) for r in done),
               "n": len(done), "states": dict(Counter(r["state"] for r in runs)), "stats": stats,
               "accuracy": None, "accuracy_std": None, "robustness": None, "robustness_std": None,
               "noisy_accuracy": None, "sel_accuracy": None, "sel_robustness": None}
        if done:
            cfg.update(accuracy=stats["test_accuracy"]["mean"], accuracy_std=stats["test_accuracy"]["std"],
                       robustness=stats["test_robustness"]["mean"], robustness_std=stats["test_robustness"]["std"],
                       noisy_accuracy=stats["test_noisy_accuracy"]["mean"])
            split = "val" if select == "validation" else "test"
            # selection numbers only when every seed has them
            a, r = stats[f"{split}_accuracy"], stats[f"{split}_robustness"]
            if a["n"] == len(done) and r["n"] == len(done):
                cfg.update(sel_accuracy=a["mean"], sel_robustness=r["mean"])
        out.append(cfg)
    return out


def _best(cfgs: List[dict]) -> Optional[dict]:
    # by robustness on the selection split; ties: more accurate first, then the smaller id
    return min(cfgs, key=lambda c: (-c["sel_robustness"], -c["sel_accuracy"], c["run_ids"][0]), default=None)


def _reason(c: dict, base: Optional[dict], threshold: Optional[float], select: str) -> Optional[str]:
    """Why a configuration is not eligible (None when it is)."""
    if c["n"] == 0:
        states = ", ".join(f"{s} {k}" for s, k in sorted(c["states"].items()))
        return f"not completed ({states})"
    if base is None:
        return "no completed baseline"
    if c["sel_accuracy"] is None:
        return (f"no {select} numbers (trained before they were recorded; use --select test)"
                if select == "validation" else "no test numbers")
    if threshold is None:
        return f"the baseline has no {select} numbers"
    if c["sel_accuracy"] < threshold - EPS:
        return (f"{select} accuracy {c['sel_accuracy'] * 100:.2f}% below a0 - tolerance = "
                f"{threshold * 100:.2f}%")
    return None


def compare(rows: List[dict], experiment: str, dataset: str, model: str, tolerance: float,
            select: str = "validation", setting: Optional[dict] = None) -> dict:
    """The fair-comparison record of one comparison (one experiment at one setting)."""
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {', '.join(SELECTIONS)}, not {select!r}")
    cfgs = _configs(rows, select)
    rec = {"experiment": experiment, "dataset": dataset, "model": model, "setting": setting or {},
           "tolerance": tolerance, "selection": select, "baseline": None, "best": [], "best_per_sigma": [],
           "equivalent_folds": None, "counts": {}, "warnings": [], "configurations": []}
    present = {r["spec"]["method"] for r in rows}
    methods = [m for m in METHOD_CLASSES if m in present]
    base = next((c for c in cfgs if c["method"] == "baseline" and c["n"]), None)
    threshold = None
    eligible = []
    if base:
        rec["baseline"] = {"accuracy": base["accuracy"], "accuracy_std": base["accuracy_std"],
                           "robustness": base["robustness"], "robustness_std": base["robustness_std"],
                           "noisy_accuracy": base["noisy_accuracy"], "selection_accuracy": base["sel_accuracy"],
                           "selection_robustness": base["sel_robustness"], "runs": base["n"],
                           "run_ids": base["run_ids"]}
        if base["sel_accuracy"] is not None:
            threshold = base["sel_accuracy"] - tolerance
    for c in cfgs:
        c["reason"] = _reason(c, base, threshold, select)
        c["eligible"] = c["reason"] is None
    eligible = [c for c in cfgs if c["eligible"]]

    def entry(c, **extra):
        e = {"method": c["method"], "params": c["params"], **extra, "seeds": c["n"], "accuracy": c["accuracy"],
             "accuracy_std": c["accuracy_std"], "robustness": c["robustness"], "robustness_std": c["robustness_std"],
             "noisy_accuracy": c["noisy_accuracy"], "selection_accuracy": c["sel_accuracy"],
             "selection_robustness": c["sel_robustness"], "run_ids": c["run_ids"]}
        if base and c["n"]:
            e.update(d_accuracy=c["accuracy"] - base["accuracy"], d_robustness=c["robustness"] - base["robustness"],
                     d_noisy_accuracy=(c["noisy_accuracy"] - base["noisy_accuracy"]
                                       if c["noisy_accuracy"] is not None and base["noisy_accuracy"] is not None
                                       else None))
            e.update(_significance(c, base) if c is not base else {"standard_error": None, "exceeds_2se": None})
        return e

    for m in methods:
        best = _best([c for c in eligible if c["method"] == m])
        if best:
            rec["best"].append(entry(best))
        sigmas = sorted({c["params"]["sigma"] for c in eligible if c["method"] == m and "sigma" in c["params"]})
        for s in sigmas:
            b = _best([c for c in eligible if c["method"] == m and c["params"].get("sigma") == s])
            rec["best_per_sigma"].append(entry(b, sigma=s))
    if base:
        rec["equivalent_folds"] = _equivalent_folds(cfgs, eligible)
    seeds = {e["method"]: e["seeds"] for e in rec["best"]}
    if len(set(seeds.values())) > 1:
        rec["warnings"].append("the compared configurations have different seed counts ("
                               + ", ".join(f"{m} {n}" for m, n in seeds.items()) + ")")
    for m in methods:
        mine = [r for r in rows if r["spec"]["method"] == m]
        rec["counts"][m] = {"total": len(mine), "completed": sum(1 for r in mine if r["state"] == "completed"),
                            "eligible": sum(c["n"] for c in eligible if c["method"] == m)}
    order = sorted(cfgs, key=lambda c: (c["sel_robustness"] is None, -(c["sel_robustness"] or 0),
                                        c["run_ids"][0] if c["run_ids"] else ""))
    rec["configurations"] = [{**entry(c), "eligible": c["eligible"], "reason": c["reason"], "states": c["states"]}
                             for c in order]
    return rec


def _significance(c: dict, base: dict) -> dict:
    """Whether |ΔR| on test exceeds two standard errors of the difference of two means
    (sqrt(s1²/n1 + s0²/n0)); only with at least 2 seeds on each side."""
    if c["n"] < 2 or base["n"] < 2 or c["robustness_std"] is None or base["robustness_std"] is None:
        return {"standard_error": None, "exceeds_2se": None}
    se = math.sqrt(c["robustness_std"] ** 2 / c["n"] + base["robustness_std"] ** 2 / base["n"])
    return {"standard_error": se, "exceeds_2se": abs(c["robustness"] - base["robustness"]) > 2 * se}


def _equivalent_folds(cfgs, eligible) -> dict:
    """The paper's N~ (= folds + 1, the clean copy counted): the smallest augmentation
    whose best eligible configuration is at least as robust as the best eligible
    regularizer (robustness on the selection split). Only completed augment
    configurations count."""
    reg = _best([c for c in eligible if c["method"] == "regularizer"])
    done = [c for c in cfgs if c["method"] == "augment" and c["n"]]
    out = {"n_tilde": None, "folds": None, "augment_configs": len(done),
           "augment_less_accurate": sum(1 for c in done if not c["eligible"])}
    if reg is None:
        return {**out, "text": "no eligible regularizer run"}
    aug = [c for c in eligible if c["method"] == "augment"]
    out["augment_less_robust"] = sum(1 for c in aug if c["sel_robustness"] < reg["sel_robustness"])
    out["regularizer_robustness"] = reg["sel_robustness"]
    tried = sorted({c["params"]["folds"] for c in done})
    if not tried:
        return {**out, "text": "no completed augment runs"}
    for f in tried:
        b = _best([c for c in aug if c["params"]["folds"] == f])
        if b and b["sel_robustness"] >= reg["sel_robustness"]:
            return {**out, "n_tilde": f + 1, "folds": f, "text": f"Ñ = {f + 1}",
                    "augment_robustness": b["sel_robustness"]}
    return {**out, "text": f"Ñ > {tried[-1] + 1}", "max_n_tilde_tried": tried[-1] + 1}


def fair_table(store: Store, experiment: Optional[str] = None, tolerance: Optional[float] = None,
               select: str = "validation") -> dict:
    """The JSON form of `gaussreg table`: one record per comparison (experiment and
    setting: every run key but method, params and seed)."""
    rows = [r for r in list_runs(store, experiment) if r["spec"] is not None]
    return table_of(rows, lambda exp: tolerance if tolerance is not None
                    else float(store.experiment(exp).get("tolerance", 0.0)), select, certified_runs(store, rows))


def table_of(rows: List[dict], tolerance_of: Callable[[str], float], select: str = "validation",
             certified: Optional[Dict[str, Optional[dict]]] = None) -> dict:
    """The fair table of run records (as list_runs gives them): `tolerance_of(experiment)`
    is the tolerance of each experiment; `certified` maps run ids to run_certified()."""
    groups = defaultdict(list)
    for r in rows:
        s = r["spec"]
        groups[(s.get("experiment", ""), json.dumps(_setting(s), sort_keys=True))].append(r)
    # within an experiment, name a comparison by the setting keys whose values differ
    by_exp = defaultdict(list)
    for exp, key in groups:
        by_exp[exp].append(_flat(json.loads(key)))
    varying = {exp: sorted({k for s in settings for k in s if len({json.dumps(o.get(k)) for o in settings}) > 1})
               for exp, settings in by_exp.items()}
    out = []
    for (exp, key), rs in sorted(groups.items()):
        flat = _flat(json.loads(key))
        s = rs[0]["spec"]
        out.append(compare(rs, exp, s["dataset"], s["model"], tolerance_of(exp), select,
                           {k: flat.get(k) for k in varying[exp]}))
    _add_certified(certified or {}, out)
    return {"selection": select, "experiments": out}


def table_of_export(records: Iterable[dict], tolerance: Optional[float] = None, select: str = "validation") -> dict:
    """The fair table recomputed from `gaussreg export --what runs --format jsonl` records
    (each carries its run's spec, result, certificates and its experiment's tolerance):
    the same table as `gaussreg table` on the store they came from, without the store."""
    rows, tolerances, certified = [], {}, {}
    for rec in records:
        if not isinstance(rec.get("spec"), dict):
            continue
        rows.append({"id": rec["run_id"], "spec": rec["spec"], "state": rec["state"], "result": rec.get("result")})
        tolerances.setdefault(rec["spec"].get("experiment", ""), rec.get("tolerance") or 0.0)
        certified[rec["run_id"]] = rec.get("certified")
    return table_of(rows, lambda exp: tolerance if tolerance is not None else tolerances[exp], select, certified)


# ---------------------------------------------------------------- certified accuracy

CERT_RADII = (0.0, 0.25, 0.5)  # pixel L2 radii shown next to R (gaussreg.science.smoothing.TABLE_RADII)


def run_certified(run) -> Optional[dict]:
    """A run's certified accuracy at CERT_RADII from its certify-<sigma>.json files: per
    radius the best over the noise levels it was certified at (the envelope Cohen et al.
    report), or None when it has none (or they cannot be read)."""
    try:
        certs = run.certifications()
    except RunFileError:
        return None
    if not certs:
        return None
    acc = {}
    for r in CERT_RADII:
        acc[f"{r:g}"] = max(sum(1 for i in c["per_image"] if i.get("correct") and i.get("radius", 0) >= r)
                            / max(1, len(c["per_image"])) for c in certs)
    return {"sigmas": [c["sigma"] for c in certs], "accuracy": acc}


def certified_runs(store: Store, rows: List[dict]) -> Dict[str, Optional[dict]]:
    """run_certified() of every completed run among `rows` (list_runs records), by run id."""
    return {r["id"]: run_certified(RunDir(store.root / r["id"])) for r in rows if r["result"]}


def _add_certified(by_id: Dict[str, Optional[dict]], records: List[dict]) -> None:
    """`certified` of every table entry: the mean over its certified runs (None when
    none of its runs has a certificate); `by_id` maps run ids to run_certified()."""
    for rec in records:
        for e in rec["best"] + rec["best_per_sigma"] + rec.get("configurations", []):
            certs = [by_id[i] for i in e["run_ids"] if by_id.get(i)]
            e["certified"] = None if not certs else {
                "runs": len(certs), "sigmas": sorted({s for c in certs for s in c["sigmas"]}),
                "accuracy": {k: sum(c["accuracy"][k] for c in certs) / len(certs) for k in certs[0]["accuracy"]}}


def _cert_header(rec) -> List[str]:
    return [f"cert@{r:g} %" for r in CERT_RADII] if any(e.get("certified") for e in rec["best"]) else []


def _cert_csv(e) -> list:
    c = e.get("certified")
    return [_r(c["accuracy"][f"{r:g}"]) if c else "" for r in CERT_RADII]


def _cert_cells(rec, e) -> List[str]:
    if not _cert_header(rec):
        return []
    c = e.get("certified")
    return [_pct(c["accuracy"][f"{r:g}"]) if c else "-" for r in CERT_RADII]


# ---------------------------------------------------------------- rendering

def _pct(v, signed=False) -> str:
    if v is None:
        return "-"
    return f"{v * 100:+.2f}" if signed else f"{v * 100:.2f}"


def _pm(mean, std) -> str:
    return _pct(mean) if std is None else f"{_pct(mean)} ± {std * 100:.2f}"


def _yes_no(v) -> str:
    return "-" if v is None else ("yes" if v else "no")


HEADER = ["method", "params", "seeds", "acc %", "Δacc", "R %", "ΔR", "|ΔR| > 2SE", "noisy acc %"]
SIGMA_HEADER = ["method", "sigma", "params", "seeds", "acc %", "R %", "noisy acc %"]
ALL_HEADER = ["", "method", "params", "seeds", "sel acc %", "sel R %", "acc %", "R %", "noisy acc %", "reason"]


def _rows(rec: dict) -> List[List[str]]:
    return [[e["method"], describe_params(e), str(e["seeds"]), _pm(e["accuracy"], e["accuracy_std"]),
             _pct(e.get("d_accuracy"), True), _pm(e["robustness"], e["robustness_std"]),
             _pct(e.get("d_robustness"), True), _yes_no(e.get("exceeds_2se")), _pct(e["noisy_accuracy"]),
             *_cert_cells(rec, e)] for e in rec["best"]]


def _sigma_rows(rec: dict) -> List[List[str]]:
    return [[e["method"], f"{e['sigma']:g}", describe_params(e), str(e["seeds"]),
             _pm(e["accuracy"], e["accuracy_std"]), _pm(e["robustness"], e["robustness_std"]),
             _pct(e["noisy_accuracy"])] for e in rec["best_per_sigma"]]


def _all_rows(rec: dict) -> List[List[str]]:
    return [["✓" if c["eligible"] else "✗", c["method"], describe_params(c), str(c["seeds"]),
             _pct(c["selection_accuracy"]), _pct(c["selection_robustness"]), _pm(c["accuracy"], c["accuracy_std"]),
             _pm(c["robustness"], c["robustness_std"]), _pct(c["noisy_accuracy"]), c["reason"] or ""]
            for c in rec["configurations"]]


def _setting_text(rec) -> str:
    return " ".join(f"{k}={v}" for k, v in rec.get("setting", {}).items())


def _title(rec) -> str:
    b = rec["baseline"]
    base = (f"baseline acc {_pm(b['accuracy'], b['accuracy_std'])}%, R {_pm(b['robustness'], b['robustness_std'])}%"
            f" ({b['runs']} seed(s))" if b else "no completed baseline run yet")
    setting = _setting_text(rec)
    return " · ".join([rec["experiment"], rec["dataset"], rec["model"]] + ([setting] if setting else [])
                      + [f"tolerance {rec['tolerance'] * 100:.2f}%", f"selected on {rec['selection']}", base])


def _footer(rec) -> List[str]:
    lines = []
    ef = rec["equivalent_folds"]
    if ef:
        lines.append(f"equivalent augmentation (the paper's Ñ = folds + 1): {ef['text']}")
        if ef.get("augment_configs"):
            lines.append(f"augment configurations: {ef['augment_configs']} completed, "
                         f"{ef['augment_less_accurate']} lost too much accuracy"
                         + (f", {ef['augment_less_robust']} eligible but less robust than the regularizer"
                            if "augment_less_robust" in ef else ""))
    counts = ", ".join(f"{m} {c['eligible']}/{c['completed']}/{c['total']}" for m, c in rec["counts"].items())
    lines.append(f"runs eligible/completed/total: {counts}")
    lines.append(f"numbers are test means ± std over seeds; eligibility and the best per method were decided on "
                 f"{rec['selection']} accuracy and R")
    for e in rec["best"]:
        if e.get("exceeds_2se") is not None:
            lines.append(f"{e['method']}: ΔR {_pct(e['d_robustness'], True)} "
                         f"{'exceeds' if e['exceeds_2se'] else 'is within'} two standard errors "
                         f"(2 SE = {2 * e['standard_error'] * 100:.2f})")
    lines.extend(f"warning: {w}" for w in rec["warnings"])
    return lines


def render_rich(table: dict, show_all: bool = False):
    """Rich renderables, one table per comparison (user strings escaped)."""
    parts = []
    if not table["experiments"]:
        return Text("no runs in the store")
    for rec in table["experiments"]:
        t = Table(title=escape(_title(rec)), title_justify="left", caption=escape("\n".join(_footer(rec))),
                  caption_justify="left")
        for h in HEADER + _cert_header(rec):
            t.add_column(h, justify="left" if h in ("method", "params") else "right")
        for r in _rows(rec):
            t.add_row(*map(escape, r))
        parts.append(t)
        if rec["best_per_sigma"]:
            s = Table(title="best eligible per training sigma", title_justify="left")
            for h in SIGMA_HEADER:
                s.add_column(h, justify="left" if h in ("method", "params") else "right")
            for r in _sigma_rows(rec):
                s.add_row(*map(escape, r))
            parts.append(s)
        if show_all:
            a = Table(title=f"every configuration, by {rec['selection']} R", title_justify="left")
            for h in ALL_HEADER:
                a.add_column(h, justify="left" if h in ("", "method", "params", "reason") else "right")
            for r in _all_rows(rec):
                a.add_row(*map(escape, r), style=None if r[0] == "✓" else "dim")
            parts.append(a)
    return Group(*parts)


def _md_table(header, rows) -> List[str]:
    def cells(r):  # a "|" inside a cell (the "|ΔR|" header, a param value) would start a new cell
        return "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"
    return [cells(header), "|" + "---|" * len(header)] + [cells(r) for r in rows]


def render_markdown(table: dict, show_all: bool = False) -> str:
    out = []
    for rec in table["experiments"]:
        out.append(f"### {_title(rec)}\n")
        out.extend(_md_table(HEADER + _cert_header(rec), _rows(rec)))
        out.append("")
        if rec["best_per_sigma"]:
            out.append("Best eligible per training sigma:\n")
            out.extend(_md_table(SIGMA_HEADER, _sigma_rows(rec)))
            out.append("")
        if show_all:
            out.append(f"Every configuration, by {rec['selection']} R:\n")
            out.extend(_md_table(ALL_HEADER, _all_rows(rec)))
            out.append("")
        out.extend(f"- {line}" for line in _footer(rec))
        out.append("")
    return "\n".join(out)


def _r(v, digits=6):
    """CSV numbers: rounded, so 0.7663000000000002 reads 0.7663."""
    return "" if v is None else (round(v, digits) if isinstance(v, float) else v)


CSV_HEADER = ["experiment", "dataset", "model", "setting", "tolerance", "selection", "table", "sigma", "method",
              "params", "seeds", "accuracy", "accuracy_std", "d_accuracy", "robustness", "robustness_std",
              "d_robustness", "exceeds_2se", "noisy_accuracy", "selection_accuracy", "selection_robustness",
              "eligible", "reason", "run_ids"]


def render_csv(table: dict, show_all: bool = False) -> str:
    """Long format: one row per best configuration (`table` = best), per training sigma
    (best_per_sigma) and, with show_all, per configuration (all)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_HEADER + [f"certified_{r:g}" for r in CERT_RADII])
    for rec in table["experiments"]:
        parts = [("best", rec["best"]), ("best_per_sigma", rec["best_per_sigma"])]
        if show_all:
            parts.append(("all", rec["configurations"]))
        for name, entries in parts:
            for e in entries:
                w.writerow([rec["experiment"], rec["dataset"], rec["model"], _setting_text(rec),
                            _r(rec["tolerance"]), rec["selection"], name, _r(e.get("sigma")), e["method"],
                            json.dumps(e["params"], sort_keys=True), e["seeds"], _r(e["accuracy"]),
                            _r(e["accuracy_std"]), _r(e.get("d_accuracy")), _r(e["robustness"]),
                            _r(e["robustness_std"]), _r(e.get("d_robustness")), _r(e.get("exceeds_2se")),
                            _r(e["noisy_accuracy"]), _r(e["selection_accuracy"]), _r(e["selection_robustness"]),
                            _r(e.get("eligible", True)), e.get("reason") or "", " ".join(e["run_ids"]),
                            *_cert_csv(e)])
    return buf.getvalue()
