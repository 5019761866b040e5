"""One launch plan: the checked request is planned once (the manifest read, the GPUs asked),
saved as a file, and the detached scheduler carries out that file without planning again."""

import json

import pytest
from typer.testing import CliRunner

from gaussreg import cli
from gaussreg.launch import gpus as inventory
from gaussreg.launch import request
from gaussreg.launch.request import LaunchError, LaunchRequest, Plan, launch, plan
from gaussreg.runs import manifest as mf

MANIFEST = """
[[experiment]]
name = "lp"
dataset = "synthetic"
model = "mlp"
max_epochs = 1
train_subset = 200
test_subset = 100
robustness = { sigmas = [0.0, 0.25] }
methods.baseline = {}
methods.regularizer = { sigma = 0.25, alpha = [0.5, 1.0] }

[[experiment]]
name = "other"
dataset = "synthetic"
model = "mlp"
methods.baseline = {}
"""


def _plan(tmp_path, **kw):
    m = tmp_path / "m.toml"
    m.write_text(MANIFEST)
    return plan(LaunchRequest(str(m), str(tmp_path / "runs"), ("lp",), gpus="none", max_parallel=2, **kw))


def test_a_saved_plan_loads_as_the_same_plan(tmp_path):
    p = _plan(tmp_path, rerun=True)
    p.save(tmp_path / "plan.json")
    q = Plan.load(tmp_path / "plan.json")
    assert q.request == p.request and q.request.experiments == ("lp",) and q.request.rerun
    assert [(r.id, r.spec) for r in q.runs] == [(r.id, r.spec) for r in p.runs] and len(q.runs) == 3
    assert q.slots == p.slots and [s.gpu for s in q.slots] == [None, None] and q.slots[0].threads >= 1
    # only the chosen experiment is recorded, with its tolerance and the manifest's absolute path
    assert q.experiments == p.experiments == [{"name": "lp", "tolerance": mf.load(tmp_path / "m.toml").experiments[0]
                                               .tolerance, "manifest": str((tmp_path / "m.toml").resolve())}]


def test_the_detached_launch_reads_its_plan_not_the_manifest_nor_the_gpus(tmp_path, monkeypatch):
    p = _plan(tmp_path)
    p.save(tmp_path / "plan.json")
    (tmp_path / "m.toml").write_text("this is no longer a manifest")  # edited after the launch

    def no(*a, **k):
        raise AssertionError("planned again")
    monkeypatch.setattr(mf, "load", no)
    monkeypatch.setattr(inventory, "nvidia_gpus", no)
    carried = {}
    monkeypatch.setattr(cli, "_run_here", lambda plan_, st, *a: carried.update(plan=plan_, store=st.root))
    out = CliRunner().invoke(cli.app, ["run", "--plan", str(tmp_path / "plan.json")])
    assert out.exit_code == 0, out.output
    assert [r.id for r in carried["plan"].runs] == [r.id for r in p.runs]
    assert carried["store"] == tmp_path / "runs"


def test_a_damaged_plan_file_is_one_sentence_and_exit_2(tmp_path):
    p = _plan(tmp_path)
    p.save(tmp_path / "plan.json")
    d = json.loads((tmp_path / "plan.json").read_text())
    del d["runs"]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    (tmp_path / "old.json").write_text(json.dumps({**d, "version": 0}))
    for name, says in (("bad.json", "is incomplete or damaged (KeyError: 'runs')"),
                       ("old.json", "is not a launch plan of this gaussreg"),
                       ("gone.json", "does not exist")):
        out = CliRunner().invoke(cli.app, ["run", "--plan", str(tmp_path / name)])
        assert out.exit_code == 2 and says in out.output and len(out.output.strip().splitlines()) == 1, out.output
    assert not (tmp_path / "runs").exists()


def test_launching_a_checked_plan_does_not_plan_it_again(tmp_path, monkeypatch):
    p = _plan(tmp_path)
    started = {}

    def detach(save, store, label):  # what control.detach_plan gets: the plan's writer
        save(tmp_path / "saved.json")
        started.update(store=store.root, label=label)
        return {"pid": 1}
    monkeypatch.setattr(request, "detach_plan", detach)
    # a request is planned (and refused) before anything starts
    with pytest.raises(LaunchError, match="does not exist"):
        launch(LaunchRequest(str(tmp_path / "missing.toml"), str(tmp_path / "runs")))
    assert not started
    monkeypatch.setattr(request, "plan", lambda *a, **k: (_ for _ in ()).throw(AssertionError("planned again")))
    assert launch(p) == {"pid": 1}
    assert started == {"store": tmp_path / "runs", "label": "lp"}
    assert [r.id for r in Plan.load(tmp_path / "saved.json").runs] == [r.id for r in p.runs]
