"""The Fashion-MNIST study (docs/study-fmnist.md) is recomputable: every fair table in the
doc is what gaussreg.views.report computes from the committed runs (docs/study-fmnist/runs.jsonl),
every protocol and cost table what docs/study-fmnist/protocols.py computes from them, and those runs
are the study manifest's runs."""

import importlib.util
import re
import shlex

from conftest import ROOT

from gaussreg.runs import manifest
from gaussreg.views import report
from gaussreg.views.export import read_runs

DOC = ROOT / "docs" / "study-fmnist.md"
RUNS = ROOT / "docs" / "study-fmnist" / "runs.jsonl"
# a table in the doc: the command it was made with, then its markdown
BLOCK = re.compile(r"<!-- gaussreg table --from docs/study-fmnist/runs.jsonl(.*?) -->\n(.*?)<!-- end of table -->",
                   re.S)
PROTOCOLS = re.compile(r"<!-- python docs/study-fmnist/protocols.py(.*?) -->\n(.*?)<!-- end of table -->", re.S)


def _protocols():
    spec = importlib.util.spec_from_file_location("protocols", ROOT / "docs" / "study-fmnist" / "protocols.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(text: str) -> dict:
    words, out = shlex.split(text), {"tolerance": None, "select": "validation", "show_all": False, "budget": None}
    for i, w in enumerate(words):
        if w == "--tolerance":
            out["tolerance"] = float(words[i + 1])
        elif w == "--select":
            out["select"] = words[i + 1]
        elif w == "--budget":
            out["budget"] = float(words[i + 1])
        elif w == "--all":
            out["show_all"] = True
    return out


def test_every_table_of_the_study_is_recomputed_from_its_runs():
    records = read_runs(RUNS)
    blocks = BLOCK.findall(DOC.read_text())
    assert len(blocks) >= 4  # the chosen tolerance, tolerance 0, selection on test, a cost budget
    seen = set()
    for args, body in blocks:
        a = _args(args)
        t = report.table_of_export(records, a["tolerance"], a["select"], a["budget"])
        assert body.strip() == report.render_markdown(t, a["show_all"]).strip(), args
        seen.add((a["tolerance"], a["select"], a["budget"]))
    assert (0.0, "validation", None) in seen and any(s == "test" for _, s, _ in seen)
    assert any(b is not None for _, _, b in seen)


def test_every_protocol_table_of_the_study_is_recomputed_from_its_runs():
    records, protocols = read_runs(RUNS), _protocols()
    blocks = PROTOCOLS.findall(DOC.read_text())
    assert len(blocks) >= 3  # the chosen tolerance, tolerance 0, the cost
    for args, body in blocks:
        a = _args(args)
        want = protocols.cost_table(records) if "--cost" in args else protocols.table(records, a["tolerance"],
                                                                                        a["select"])
        assert body.strip() == want.strip(), args
    assert any("--cost" in args for args, _ in blocks)


def test_the_study_runs_are_its_manifest_and_its_comparisons_have_three_seeds():
    records = read_runs(RUNS)
    planned = {r.id for r in manifest.load(ROOT / "experiments" / "study-fmnist.toml").runs()}
    assert {r["run_id"] for r in records} == planned
    assert all(r["state"] == "completed" for r in records)
    (rec,) = report.table_of_export(records)["experiments"]
    # the table at the manifest's tolerance, selected on validation: every configuration it
    # chooses was trained with at least 3 seeds, and stopped early (none still improving)
    assert {e["method"] for e in rec["best"]} >= {"baseline", "augment", "regularizer"}
    assert all(e["seeds"] >= 3 for e in rec["best"]), [(e["method"], e["seeds"]) for e in rec["best"]]
    assert all(e["still_improving"] == 0 for e in rec["best"] if e["method"] != "baseline")
    assert rec["baseline"]["runs"] >= 3
    # each augmentation protocol's comparison has a 3-seed configuration: fixed noise its most
    # robust eligible one; shared noise Ñ = 2 and 6 at sigma 0.25 (its most robust eligible,
    # Ñ = 2 at sigma 0.5, has 1 seed: the doc says so); fresh noise Ñ = 2 at sigma 0.25, though
    # no fresh-noise configuration is eligible at 3 seeds (the doc says so)
    protocols = _protocols()
    aug = [e for e in rec["configurations"] if e["method"] == "augment"]
    best = {m: max([e for e in aug if e["eligible"] and protocols.mode(e["params"]) == m],
                   key=lambda e: e["selection_robustness"], default=None) for m in protocols.MODES}
    assert best["fixed"]["seeds"] >= 3 and best["shared"]["seeds"] == 1 and best["fresh"] is None
    three = {(protocols.mode(e["params"]), e["params"]["folds"] + 1, e["params"]["sigma"]) for e in aug
             if e["seeds"] >= 3}
    assert {("shared", 2, 0.25), ("shared", 6, 0.25), ("fresh", 2, 0.25), ("fixed", 2, 0.5)} <= three
