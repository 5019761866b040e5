"""Hostile input: every manifest of tests/adversarial/manifests/ (its first line says
`# expect: words of the error`; a second line `# cli-only` marks a valid manifest that
`gaussreg run` refuses) and bad command-line input get one sentence naming what
is wrong, exit 2, no traceback, and nothing written. Add a file to grow the suite."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import gaussreg
from factories import queued_run
from test_tui import until

from gaussreg.runs import manifest as mf
from gaussreg.runs.store import Store, atomic_write_json, read_json
from gaussreg.science.models import build_model
from tui.app import GaussregApp
from tui.screens import LaunchScreen

MANIFESTS = sorted((Path(__file__).parent / "adversarial" / "manifests").glob("*.toml"))


def expected(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: ...'"
    return first[len("# expect: "):].strip()


def one_sentence_exit_2(r, words: str):
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    text = " ".join(r.stderr.split())
    assert text.startswith("error: ") and words in text, text
    assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.stem for p in MANIFESTS])
def test_bad_manifest(path, tmp_path):
    if b"\n# cli-only" not in path.read_bytes():
        with pytest.raises(mf.ManifestError) as e:
            mf.load(path)
        assert expected(path) in str(e.value) and str(path) in str(e.value)
        one_sentence_exit_2(gaussreg("run", path, "--store", tmp_path / "runs", "--dry-run"), expected(path))
    one_sentence_exit_2(gaussreg("run", path, "--store", tmp_path / "runs"), expected(path))
    assert not (tmp_path / "runs").exists()  # nothing launched, nothing written


async def test_launch_dialog_names_a_bad_manifest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = MANIFESTS[[p.stem for p in MANIFESTS].index("not-utf8")]
    app = GaussregApp("runs", manifest=str(bad), poll_s=0.05)
    async with app.run_test(size=(160, 40)) as pilot:
        await pilot.press("l")
        await until(pilot, lambda: isinstance(app.screen, LaunchScreen))
        err = app.screen.query_one("#plan-error")
        await until(pilot, lambda: "is not UTF-8 text" in str(err.render()))
        assert app.return_code is None


GOOD = """
[[experiment]]
name = "ok"
dataset = "synthetic"
model = "mlp"
methods.baseline = {}
"""


@pytest.fixture
def run_store(tmp_path):
    st = Store(tmp_path / "runs")
    run = queued_run(st, experiment="ok", test_subset=50)
    (tmp_path / "m.toml").write_text(GOOD)
    (tmp_path / "afile").write_text("not a folder\n")
    return st, run, tmp_path


BAD_FLAGS = [
    (["run", "{m}", "--store", "{tmp}/afile"], "is a file, not a folder"),
    (["run", "{m}", "--store", "{tmp}/afile", "--detach"], "is a file, not a folder"),
    (["run", "{m}", "--store", "{tmp}/afile/runs"], "cannot create the store folder"),
    (["run", "{m}", "--store", "/proc/gaussreg-store"], "cannot create the store folder"),
    (["ls", "--store", "{tmp}/afile"], "is a file, not a folder"),
    (["table", "--store", "{tmp}/afile"], "is a file, not a folder"),
    (["show", "x", "--store", "{tmp}/afile"], "is a file, not a folder"),
    (["show", "../runs/x", "--store", "{tmp}/runs"], "no run '../runs/x'"),
    (["table", "--store", "{tmp}/runs", "--tolerance", "nan"], "--tolerance must be a fraction"),
    (["table", "--store", "{tmp}/runs", "--budget", "-inf"], "--budget must be a finite number > 0"),
    (["plot", "--store", "{tmp}/runs", "--budget", "0"], "--budget must be a finite number > 0"),
    (["eval", "{run}", "--store", "{tmp}/runs", "--sigmas", "0:0.5:0"], "COUNT of START:STOP:COUNT"),
    (["eval", "{run}", "--store", "{tmp}/runs", "--sigmas", "0:0.5:-3"], "COUNT of START:STOP:COUNT"),
    (["eval", "{run}", "--store", "{tmp}/runs", "--sigmas", "0,nan"], "finite numbers >= 0"),
    (["eval", "{run}", "--store", "{tmp}/runs", "--sigmas", "0:inf:3"], "finite numbers >= 0"),
    (["eval", "{run}", "--store", "{tmp}/runs", "--sigmas", "[/x]"], "not '[/x]'"),
    (["eval", "{run}", "--store", "{tmp}/runs", "--device", "tpu"], "--device must be auto, cpu, cuda"),
    (["eval", "{run}", "--store", "{tmp}/runs", "--samples", "1000000000"], "--samples must be from 1 to 1000"),
    (["show", "[/x]", "--store", "{tmp}/runs"], "no run '[/x]'"),
    (["table", "--store", "{tmp}/runs", "--experiment", "[/x]"], "no runs of experiment '[/x]'"),
    (["ls", "--store", "{tmp}/runs", "--state", "[/x]"], "--state must be one of"),
    (["train", "{tmp}/nowhere"], "is not a run directory"),
]


@pytest.mark.parametrize("args,words", BAD_FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_FLAGS])
def test_bad_flags(run_store, args, words):
    st, run, tmp = run_store
    fill = {"m": tmp / "m.toml", "tmp": tmp, "run": run.id}
    one_sentence_exit_2(gaussreg(*[a.format(**fill) for a in args]), words)


def test_eval_checkpoint_of_another_architecture(run_store):
    st, run, tmp = run_store
    other = build_model("lenet", "synthetic")
    torch.save({"model": other.state_dict()}, run.file("best.pt"))
    one_sentence_exit_2(gaussreg("eval", run.id, "--store", st.root), "does not fit the run's model mlp")


def test_train_refuses_to_wipe_a_completed_run(run_store):
    st, run, tmp = run_store
    atomic_write_json(run.file("result.json"), {"test_accuracy": 0.5, "robustness": 0.4})
    run.write_status({"state": "completed"})
    one_sentence_exit_2(gaussreg("train", run.path), "add --force")
    assert read_json(run.file("result.json"))["test_accuracy"] == 0.5


def test_no_nan_or_inf_is_written_to_json(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": 0.5})
    text = (tmp_path / "x.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None, None], "c": 0.5}


def test_store_files_respect_the_umask(tmp_path):
    import os
    old = os.umask(0o002)
    try:
        atomic_write_json(tmp_path / "g.json", {})
        os.umask(0o022)
        atomic_write_json(tmp_path / "o.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "g.json").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "o.json").stat().st_mode & 0o777 == 0o644
