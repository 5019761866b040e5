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
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from gaussreg.data.datasets import DATASETS
from gaussreg.runs.reader import list_runs
from gaussreg.runs.spec import describe_params
from gaussreg.runs.store import RunDir, RunFileError, Store
from gaussreg.science.methods import METHOD_CLASSES, NOISE_MODES
from gaussreg.science.robustness import CONSTANT_MARGIN, CONSTANT_R, nearly_constant, score_of

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


def run_chance(result: dict, spec: dict, split: str) -> Optional[float]:
    """The accuracy of a constant classifier on a run's `split` ("val" or "test"): what its
    worker recorded (the largest class's share), else 1/classes of a built-in dataset
    (runs from before it was recorded; their subsets are stratified), else None."""
    rec = result.get("constant_accuracy")
    v = _num(rec.get(split)) if isinstance(rec, dict) else None
    if v is not None:
        return v
    ds = DATASETS.get(spec.get("dataset")) if isinstance(spec.get("dataset"), str) else None
    return 1 / ds.classes if ds else None


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
               "noisy_accuracy": None, "sel_accuracy": None, "sel_robustness": None, "sel_chance": None,
               **_cost([r["result"] for r in sorted(done, key=lambda r: r["id"])])}
        if done:
            cfg.update(accuracy=stats["test_accuracy"]["mean"], accuracy_std=stats["test_accuracy"]["std"],
                       robustness=stats["test_robustness"]["mean"], robustness_std=stats["test_robustness"]["std"],
                       noisy_accuracy=stats["test_noisy_accuracy"]["mean"])
            split = "val" if select == "validation" else "test"
            # selection numbers only when every seed has them
            a, r = stats[f"{split}_accuracy"], stats[f"{split}_robustness"]
            if a["n"] == len(done) and r["n"] == len(done):
                cfg.update(sel_accuracy=a["mean"], sel_robustness=r["mean"])
            cfg["sel_chance"] = _mean_or_none([run_chance(r["result"], r["spec"], split) for r in done])
        out.append(cfg)
    return out


# ---------------------------------------------------------------- cost

def train_seconds(result: dict) -> Optional[tuple]:
    """(kind, seconds) of a run's training time as the table compares it: GPU seconds for
    a run trained on CUDA, else CPU seconds of the worker process (epochs and their
    validation; see the README's "Cost"). None when the run did not record it."""
    kind = "gpu" if str(result.get("device", "")).startswith("cuda") else "cpu"
    v = _num(result.get(f"train_{kind}_s"))
    return None if v is None else (kind, v)


def _mean_or_none(values: list) -> Optional[float]:
    """The mean when every seed has the number, else None: a partial mean is not the configuration's."""
    nums = [_num(v) for v in values]
    return None if not nums or None in nums else sum(nums) / len(nums)


def _cost(results: List[dict]) -> dict:
    """A configuration's cost from its seeds' results (in run id order): mean steps, passes
    by kind and training seconds (None where a seed did not record them: runs of a
    gaussreg before cost was recorded), and per seed the best epoch and epochs run."""
    times = [train_seconds(r) for r in results]
    kinds = {t[0] if t else None for t in times}
    kind = next(iter(kinds)) if len(kinds) == 1 else None  # every seed's, of one kind
    images = [r.get("images") if isinstance(r.get("images"), dict) else {} for r in results]
    best = [_epoch(r.get("best_epoch")) for r in results]
    ran = [_epoch(r.get("epochs_run")) for r in results]
    return {"steps": _mean_or_none([r.get("steps") for r in results]),
            "images": ({k: _mean_or_none([i.get(k) for i in images]) for k in ("clean", "noisy", "expected")}
                       if results and all(images) else None),
            "time_kind": kind, "time_s": _mean_or_none([t[1] for t in times]) if kind else None,
            "wall_s": _mean_or_none([r.get("train_time_s") for r in results]),
            "best_epochs": best, "epochs_run": ran,
            # the best validation epoch is the last one run: training had not converged
            "still_improving": sum(1 for b, e in zip(best, ran) if b is not None and b >= 1 and b == e)}


def _epoch(v) -> Optional[int]:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _relative_cost(c: dict, base: Optional[dict]) -> dict:
    """Steps and training time relative to the baseline configuration's (None when either
    is unknown, or the times are of different kinds: GPU against CPU seconds)."""
    def ratio(a, b):
        return a / b if a is not None and b else None
    same = base is not None and c["time_kind"] == base["time_kind"]
    return {"steps_x": ratio(c["steps"], base["steps"]) if base else None,
            "time_x": ratio(c["time_s"], base["time_s"]) if same else None}


def _no_time_why(c: dict, base: dict) -> str:
    if base["time_s"] is None:
        return "the baseline's runs recorded no training time"
    if c["time_s"] is None:
        return "its runs recorded no training time (trained before gaussreg recorded cost)"
    return f"its time is {c['time_kind'].upper()} seconds, the baseline's {base['time_kind'].upper()} seconds"


def budget_problem(value, name: str = "--budget") -> Optional[str]:
    """Why `value` is not a budget (a finite number > 0, times the baseline's training
    time), as one sentence, or None; shared by the CLI and the TUI."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return None
    return f"{name} must be a finite number > 0 (times the baseline's training time), not {value}"


def _best(cfgs: List[dict]) -> Optional[dict]:
    # by robustness on the selection split; ties: more accurate first, then the smaller id
    return min(cfgs, key=lambda c: (-c["sel_robustness"], -c["sel_accuracy"], c["run_ids"][0]), default=None)


def _reason(c: dict, base: Optional[dict], threshold: Optional[float], select: str,
            budget: Optional[float] = None) -> Optional[str]:
    """Why a configuration is not eligible (None when it is)."""
    if c["n"] == 0:
        states = ", ".join(f"{s} {k}" for s, k in sorted(c["states"].items()))
        return f"not completed ({states})"
    if base is None:
        return "no completed baseline"
    if c["sel_accuracy"] is None:
        return (f"no {select} numbers (trained before they were recorded; use --select test)"
                if select == "validation" else "no test numbers")
    if nearly_constant(c["sel_accuracy"], c["sel_robustness"], c["sel_chance"]):
        return constant_reason(c, select)
    if threshold is None:
        return f"the baseline has no {select} numbers"
    if c["sel_accuracy"] < threshold - EPS:
        return (f"{select} accuracy {c['sel_accuracy'] * 100:.2f}% below a0 - tolerance = "
                f"{threshold * 100:.2f}%")
    return _budget_reason(c, base, budget)


def constant_reason(c: dict, select: str) -> str:
    """Why a configuration whose predictions are (nearly) constant is never chosen."""
    return (f"predictions (nearly) constant: {select} accuracy {c['sel_accuracy'] * 100:.2f}% is within "
            f"{CONSTANT_MARGIN * 100:g} points of always answering the most frequent class "
            f"({c['sel_chance'] * 100:.2f}%) and R {c['sel_robustness'] * 100:.2f}% >= {CONSTANT_R * 100:g}%: "
            "robust because it ignores its input")


def _budget_reason(c: dict, base: Optional[dict], budget: Optional[float]) -> Optional[str]:
    """Why a completed configuration is outside the budget (None when it is within, or there is none)."""
    if budget is None or base is None or c is base:  # the baseline is the budget's unit
        return None
    if c["time_x"] is None:
        return f"no training time comparable to the baseline's ({_no_time_why(c, base)}): outside the budget"
    if c["time_x"] > budget * (1 + EPS):
        return f"training time {c['time_x']:.2f}x the baseline's, over the budget of {budget:g}x"
    return None


def compare(rows: List[dict], experiment: str, dataset: str, model: str, tolerance: float,
            select: str = "validation", setting: Optional[dict] = None, budget: Optional[float] = None) -> dict:
    """The fair-comparison record of one comparison (one experiment at one setting); with a
    `budget`, only configurations whose training time is at most `budget` times the
    baseline's compete (train_seconds: those without a comparable time do not)."""
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {', '.join(SELECTIONS)}, not {select!r}")
    cfgs = _configs(rows, select)
    rec = {"experiment": experiment, "dataset": dataset, "model": model, "setting": setting or {},
           "tolerance": tolerance, "selection": select, "baseline": None, "best": [], "best_per_sigma": [],
           "equivalent_folds": None, "counts": {}, "warnings": [], "configurations": [], "budget": None}
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
                           "run_ids": base["run_ids"], "steps": base["steps"], "time_s": base["time_s"],
                           "time_kind": base["time_kind"]}
        if base["sel_accuracy"] is not None:
            threshold = base["sel_accuracy"] - tolerance
    for c in cfgs:
        c.update(_relative_cost(c, base))
        c["reason"] = _reason(c, base, threshold, select, budget)
        c["eligible"] = c["reason"] is None
        c["outside_budget"] = bool(c["n"]) and _budget_reason(c, base, budget) is not None
    if base and base["reason"] is not None and base["reason"].startswith("predictions (nearly) constant"):
        rec["warnings"].append(f"the baseline's {base['reason']}; a0 is chance accuracy, so the comparison "
                               "says nothing about robustness")
    if budget is not None and base:
        rec["budget"] = _budget_summary(cfgs, base, budget)
        if base["time_s"] is None:
            rec["warnings"].append(f"budget {budget:g}x: the baseline's runs recorded no training time (trained "
                                   "before gaussreg recorded cost), so no other configuration can be held to it")
    eligible = [c for c in cfgs if c["eligible"]]

    def entry(c, **extra):
        e = {"method": c["method"], "params": c["params"], **extra, "seeds": c["n"], "accuracy": c["accuracy"],
             "accuracy_std": c["accuracy_std"], "robustness": c["robustness"], "robustness_std": c["robustness_std"],
             "noisy_accuracy": c["noisy_accuracy"], "selection_accuracy": c["sel_accuracy"],
             "selection_robustness": c["sel_robustness"], "run_ids": c["run_ids"],
             **{k: c[k] for k in ("steps", "steps_x", "time_s", "time_kind", "time_x", "wall_s", "images",
                                  "best_epochs", "epochs_run", "still_improving")}}
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


def _budget_summary(cfgs: List[dict], base: dict, budget: float) -> dict:
    """How many completed configurations the budget left out: over it, or without a time
    comparable to the baseline's (each says which in its reason, `--all`)."""
    out = [c for c in cfgs if c["outside_budget"]]
    return {"limit": budget, "time_kind": base["time_kind"], "over": sum(1 for c in out if c["time_x"] is not None),
            "not_comparable": sum(1 for c in out if c["time_x"] is None)}


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
    configurations within the budget (if any) count: the others were not tried at this cost."""
    reg = _best([c for c in eligible if c["method"] == "regularizer"])
    done = [c for c in cfgs if c["method"] == "augment" and c["n"] and not c["outside_budget"]]
    out = {"n_tilde": None, "folds": None, "augment_configs": len(done),
           "augment_less_accurate": sum(1 for c in done if not c["eligible"]),
           "augment_outside_budget": sum(1 for c in cfgs if c["method"] == "augment" and c["outside_budget"])}
    if reg is None:
        return {**out, "text": "no eligible regularizer run"}
    aug = [c for c in eligible if c["method"] == "augment"]
    out["augment_less_robust"] = sum(1 for c in aug if c["sel_robustness"] < reg["sel_robustness"])
    out["regularizer_robustness"] = reg["sel_robustness"]
    if not done:
        return {**out, "text": "no completed augment runs"}
    out.update(_smallest_matching(done, aug, reg))
    modes = sorted({noise_mode(c["params"]) for c in done}, key=NOISE_ORDER.index)
    if len(modes) > 1:  # augmentation protocols differ in kind: one answer per noise mode
        out["by_noise"] = {m: _smallest_matching([c for c in done if noise_mode(c["params"]) == m],
                                                 [c for c in aug if noise_mode(c["params"]) == m], reg)
                           for m in modes}
        out["text"] = ", ".join(f"{m} noise {out['by_noise'][m]['text']}" for m in modes)
    return out


NOISE_ORDER = tuple(sorted(NOISE_MODES, key=("shared", "fixed", "fresh").index))  # the reference's protocol first


def noise_mode(params: dict) -> str:
    """An augment configuration's noise mode (methods.NOISE_MODES), also for runs made
    before `noise` existed (fresh_noise = true/false)."""
    return "fresh" if params.get("fresh_noise") or params.get("noise") == "fresh" else params.get("noise", "fixed")


def _smallest_matching(done, aug, reg) -> dict:
    """The smallest tried N~ whose best eligible configuration is as robust as `reg`; when
    that is the smallest tried, the runs say only N~ <= it."""
    tried = sorted({c["params"]["folds"] for c in done})
    for f in tried:
        b = _best([c for c in aug if c["params"]["folds"] == f])
        if b and b["sel_robustness"] >= reg["sel_robustness"]:
            text = f"Ñ ≤ {f + 1} (the smallest tried)" if f == tried[0] else f"Ñ = {f + 1}"
            return {"n_tilde": f + 1, "folds": f, "text": text, "augment_robustness": b["sel_robustness"]}
    return {"n_tilde": None, "folds": None, "text": f"Ñ > {tried[-1] + 1}", "max_n_tilde_tried": tried[-1] + 1}


def fair_table(store: Store, experiment: Optional[str] = None, tolerance: Optional[float] = None,
               select: str = "validation", budget: Optional[float] = None,
               warn: Optional[Callable[[str], None]] = None) -> dict:
    """The JSON form of `gaussreg table`: one record per comparison (experiment and
    setting: every run key but method, params and seed); `warn` hears of malformed
    certificates, which are left out."""
    rows = [r for r in list_runs(store, experiment) if r["spec"] is not None]
    return table_of(rows, lambda exp: tolerance if tolerance is not None
                    else float(store.experiment(exp).get("tolerance", 0.0)), select,
                    certified_runs(store, rows, warn), budget)


def table_of(rows: List[dict], tolerance_of: Callable[[str], float], select: str = "validation",
             certified: Optional[Dict[str, Optional[dict]]] = None, budget: Optional[float] = None) -> dict:
    """The fair table of run records (as list_runs gives them): `tolerance_of(experiment)`
    is the tolerance of each experiment; `certified` maps run ids to run_certified();
    `budget` (times the baseline's training time) as in compare()."""
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
                           {k: flat.get(k) for k in varying[exp]}, budget))
    _add_certified(certified or {}, out)
    return {"selection": select, "budget": budget, "experiments": out}


def table_of_export(records: Iterable[dict], tolerance: Optional[float] = None, select: str = "validation",
                    budget: Optional[float] = None) -> dict:
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
    return table_of(rows, lambda exp: tolerance if tolerance is not None else tolerances[exp], select, certified,
                    budget)


# ---------------------------------------------------------------- certified accuracy

CERT_RADII = (0.0, 0.25, 0.5)  # pixel L2 radii shown next to R (gaussreg.science.smoothing.TABLE_RADII)


def run_certified(run, problems: Optional[List[str]] = None) -> Optional[dict]:
    """A run's certified accuracy at CERT_RADII from its certify-<sigma>.json files: per
    radius the best over the noise levels it was certified at (the envelope Cohen et al.
    report), or None when it has none (or they cannot be read). A malformed certificate
    is left out, and said in `problems`."""
    try:
        certs = run.certifications(problems)
    except RunFileError:
        return None
    if not certs:
        return None
    acc = {}
    for r in CERT_RADII:
        acc[f"{r:g}"] = max(sum(1 for i in c["per_image"] if i.get("correct") and i.get("radius", 0) >= r)
                            / max(1, len(c["per_image"])) for c in certs)
    return {"sigmas": [c["sigma"] for c in certs], "accuracy": acc,
            # on how much it was measured: the table's footnote says it next to the cert@ columns
            "measured": [_measured(c) for c in certs]}


def _measured(cert: dict) -> dict:
    """A certificate's sample: its noise level, images, noise draws per image (n) and failure
    probability (alpha); None where an older file does not say."""
    num = lambda v: v if isinstance(v, (int, float)) and not isinstance(v, bool) else None  # noqa: E731
    return {"sigma": cert["sigma"], "images": len(cert["per_image"]), "n": num(cert.get("n")),
            "alpha": num(cert.get("alpha"))}


def certified_runs(store: Store, rows: List[dict], warn: Optional[Callable[[str], None]] = None
                   ) -> Dict[str, Optional[dict]]:
    """run_certified() of every completed run among `rows` (list_runs records), by run id;
    `warn` is told of every malformed certificate left out."""
    problems: List[str] = []
    out = {r["id"]: run_certified(RunDir(store.root / r["id"]), problems) for r in rows if r["result"]}
    for p in problems if warn is not None else ():
        warn(p)
    return out


def _add_certified(by_id: Dict[str, Optional[dict]], records: List[dict]) -> None:
    """`certified` of every table entry: the mean over its certified runs (None when
    none of its runs has a certificate); `by_id` maps run ids to run_certified()."""
    for rec in records:
        for e in rec["best"] + rec["best_per_sigma"] + rec.get("configurations", []):
            certs = [by_id[i] for i in e["run_ids"] if by_id.get(i)]
            e["certified"] = None if not certs else {
                "runs": len(certs), "sigmas": sorted({s for c in certs for s in c["sigmas"]}),
                "accuracy": {k: sum(c["accuracy"][k] for c in certs) / len(certs) for k in certs[0]["accuracy"]},
                "measured": [dict(t) for t in sorted({tuple(m.items()) for c in certs for m in c.get("measured", [])},
                                                     key=str)]}


def _cert_header(rec) -> List[str]:
    return [f"cert@{r:g} %" for r in CERT_RADII] if any(e.get("certified") for e in rec["best"]) else []


def cert_lines(rec) -> List[str]:
    """What the cert@ columns are and on how many images and noise draws they were measured."""
    if not _cert_header(rec):
        return []
    samples = sorted({(m["images"], m["n"], m["alpha"]) for e in rec["best"] if e.get("certified")
                      for m in e["certified"].get("measured", [])}, key=str)
    how = "; ".join(f"{i} test images, n = {'?' if n is None else n} noise draws each, alpha "
                    f"{'?' if a is None else f'{a:g}'}" for i, n, a in samples)
    return ["cert@r: certified accuracy (%) within L2 radius r by randomized smoothing (the best over the sigmas "
            "certified at; mean over certified seeds)" + (f", measured on {how}" if how else "")]


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


NOT_RECORDED = "—"  # a cost the runs did not record (or that does not compare with the baseline's)
COST_HEADER = ["steps ×", "time ×", "best/epochs"]
HEADER = ["method", "params", "seeds", "acc %", "Δacc", "R %", "ΔR", "|ΔR| > 2SE", "noisy acc %", *COST_HEADER]
SIGMA_HEADER = ["method", "sigma", "params", "seeds", "acc %", "R %", "noisy acc %"]
ALL_HEADER = ["", "method", "params", "seeds", "sel acc %", "sel R %", "acc %", "R %", "noisy acc %", *COST_HEADER,
              "reason"]
STILL_IMPROVING = "↑"  # the mark of a configuration whose best epoch is its last (see the footer)


def _ratio(v) -> str:
    return NOT_RECORDED if v is None else f"{v:.2f}"


def _span(values: list) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _epochs_cell(e: dict) -> str:
    """Best epoch over epochs run, as a range over the seeds ("3-5/5"), marked while still improving."""
    pairs = [(b, n) for b, n in zip(e.get("best_epochs") or [], e.get("epochs_run") or [])
             if b is not None and n is not None]
    if not pairs or len(pairs) < len(e.get("best_epochs") or []):
        return NOT_RECORDED
    text = f"{_span([b for b, _ in pairs])}/{_span([n for _, n in pairs])}"
    return f"{text} {STILL_IMPROVING}" if e.get("still_improving") else text


def cost_cells(e: dict) -> List[str]:
    return [_ratio(e.get("steps_x")), _ratio(e.get("time_x")), _epochs_cell(e)]


def _rows(rec: dict) -> List[List[str]]:
    return [[e["method"], describe_params(e), str(e["seeds"]), _pm(e["accuracy"], e["accuracy_std"]),
             _pct(e.get("d_accuracy"), True), _pm(e["robustness"], e["robustness_std"]),
             _pct(e.get("d_robustness"), True), _yes_no(e.get("exceeds_2se")), _pct(e["noisy_accuracy"]),
             *cost_cells(e), *_cert_cells(rec, e)] for e in rec["best"]]


def _sigma_rows(rec: dict) -> List[List[str]]:
    return [[e["method"], f"{e['sigma']:g}", describe_params(e), str(e["seeds"]),
             _pm(e["accuracy"], e["accuracy_std"]), _pm(e["robustness"], e["robustness_std"]),
             _pct(e["noisy_accuracy"])] for e in rec["best_per_sigma"]]


def _all_rows(rec: dict) -> List[List[str]]:
    return [["✓" if c["eligible"] else "✗", c["method"], describe_params(c), str(c["seeds"]),
             _pct(c["selection_accuracy"]), _pct(c["selection_robustness"]), _pm(c["accuracy"], c["accuracy_std"]),
             _pm(c["robustness"], c["robustness_std"]), _pct(c["noisy_accuracy"]), *cost_cells(c),
             c["reason"] or ""] for c in rec["configurations"]]


def _setting_text(rec) -> str:
    return " ".join(f"{k}={v}" for k, v in rec.get("setting", {}).items())


def _title(rec) -> str:
    b = rec["baseline"]
    base = (f"baseline acc {_pm(b['accuracy'], b['accuracy_std'])}%, R {_pm(b['robustness'], b['robustness_std'])}%"
            f" ({b['runs']} seed(s))" if b else "no completed baseline run yet")
    setting = _setting_text(rec)
    budget = [f"budget {rec['budget']['limit']:g}× the baseline's time"] if rec.get("budget") else []
    return " · ".join([rec["experiment"], rec["dataset"], rec["model"]] + ([setting] if setting else [])
                      + [f"tolerance {rec['tolerance'] * 100:.2f}%", f"selected on {rec['selection']}"] + budget
                      + [base])


def _footer(rec) -> List[str]:
    lines = []
    ef = rec["equivalent_folds"]
    if ef:
        lines.append(f"equivalent augmentation (the paper's Ñ = folds + 1): {ef['text']}")
        if ef.get("augment_configs") or ef.get("augment_outside_budget"):
            lines.append(f"augment configurations: {ef['augment_configs']} completed"
                         + (" within the budget" if rec.get("budget") else "")
                         + f", {ef['augment_less_accurate']} lost too much accuracy"
                         + (f", {ef['augment_less_robust']} eligible but less robust than the regularizer"
                            if "augment_less_robust" in ef else "")
                         + (f"; {ef['augment_outside_budget']} outside the budget"
                            if ef.get("augment_outside_budget") else ""))
    counts = ", ".join(f"{m} {c['eligible']}/{c['completed']}/{c['total']}" for m, c in rec["counts"].items())
    lines.append(f"runs eligible/completed/total: {counts}")
    lines.append(f"numbers are test means ± std over seeds; eligibility and the best per method were decided on "
                 f"{rec['selection']} accuracy and R")
    lines.extend(cost_lines(rec))
    lines.extend(cert_lines(rec))
    for e in rec["best"]:
        if e.get("exceeds_2se") is not None:
            lines.append(f"{e['method']}: ΔR {_pct(e['d_robustness'], True)} "
                         f"{'exceeds' if e['exceeds_2se'] else 'is within'} two standard errors "
                         f"(2 SE = {2 * e['standard_error'] * 100:.2f})")
    lines.extend(f"warning: {w}" for w in rec["warnings"])
    return lines


def cost_lines(rec) -> List[str]:
    """What the cost columns mean, which chosen configurations are still improving, and what the budget left out."""
    b, lines = rec["baseline"], []
    if b:
        kind = f"{b['time_kind'].upper()} seconds" if b.get("time_kind") else "CPU (on CUDA: GPU) seconds"
        line = (f"steps × and time × are relative to the baseline (time: {kind} of the training epochs, "
                "validation included)")
        if any(NOT_RECORDED in cost_cells(e)[:2] for e in rec["best"]):
            line += (f"; {NOT_RECORDED}: not recorded (runs from before gaussreg recorded cost) or not comparable "
                     "(GPU against CPU seconds)")
        lines.append(line)
    still = [e for e in rec["best"] if e.get("still_improving")]
    if still:
        lines.append(f"{STILL_IMPROVING} still improving (the best validation epoch is the last one run; more epochs "
                     "may change the comparison): "
                     + ", ".join(f"{e['method']} in {e['still_improving']} of {e['seeds']} seed(s)" for e in still))
    bud = rec.get("budget")
    if bud:
        lines.append(f"budget: only configurations whose training time is at most {bud['limit']:g}× the baseline's "
                     f"compete; {bud['over']} over it and {bud['not_comparable']} without a comparable time are left "
                     "out (`gaussreg table --all` says which and why)")
    return lines


def comparison_text(rec: dict) -> Tuple[str, List[str], List[List[str]], List[str]]:
    """A comparison as `gaussreg table` shows it: its title (the selection split), the header and
    rows of its best configurations (means ± std, the two-standard-error check, cost), and its
    footer lines; the TUI's compare screen shows the same text."""
    return _title(rec), HEADER + _cert_header(rec), _rows(rec), _footer(rec)


def render_rich(table: dict, show_all: bool = False):
    """Rich renderables, one table per comparison (user strings escaped)."""
    parts = []
    if not table["experiments"]:
        return Text("no runs in the store")
    for rec in table["experiments"]:
        title, header, rows, footer = comparison_text(rec)
        t = Table(title=escape(title), title_justify="left", caption=escape("\n".join(footer)),
                  caption_justify="left")
        for h in header:
            t.add_column(h, justify="left" if h in ("method", "params") else "right")
        for r in rows:
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
              "eligible", "reason", "run_ids", "budget", "steps", "steps_ratio", "time_s", "time_kind", "time_ratio",
              "best_epochs", "epochs_run", "still_improving"]


def _cost_csv(table: dict, e: dict) -> list:
    """The cost columns; best epochs and epochs run per seed, in run_ids' order."""
    def seeds(values):
        return " ".join("" if v is None else str(v) for v in values or [])
    return [_r(table.get("budget")), _r(e.get("steps")), _r(e.get("steps_x")), _r(e.get("time_s")),
            e.get("time_kind") or "", _r(e.get("time_x")), seeds(e.get("best_epochs")), seeds(e.get("epochs_run")),
            _r(e.get("still_improving"))]


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
                            *_cost_csv(table, e), *_cert_csv(e)])
    return buf.getvalue()
