"""`gaussreg certify`, the manifest's certify option in the worker, and the table's columns."""

import json
import signal
import subprocess
import sys

import pytest
from conftest import cli, gaussreg, python_env, wait_for
from factories import queued_run, spec_only_run

from gaussreg.runs import manifest
from gaussreg.runs.store import RunDir, Store

MANIFEST = """
[[experiment]]
name = "cert"
dataset = "synthetic"
model = "mlp"
max_epochs = 2
batch_size = 200
train_subset = 400
test_subset = 100
optimizer = { lr = 1e-3 }
robustness = { sigmas = [0.0, 0.25] }
methods.baseline = {}
methods.regularizer = { sigma = 0.5, alpha = 1.0 }
certify = { n = 200, n0 = 20, images = 10 }
"""


def run(*args):
    return subprocess.run(cli(*args), capture_output=True, text=True, env=python_env(COLUMNS="200"))


@pytest.mark.process
def test_worker_certifies_then_certify_command_and_table(tmp_path):
    (tmp_path / "m.toml").write_text(MANIFEST)
    ids = {r.spec["method"]: r.id for r in manifest.load(tmp_path / "m.toml").runs()}
    store = tmp_path / "runs"
    out = run("run", tmp_path / "m.toml", "--store", store)
    assert out.returncode == 0, out.stdout + out.stderr
    # the worker certified each run after R, at its training sigma (0.25 for the baseline)
    reg, base = RunDir(store / ids["regularizer"]), RunDir(store / ids["baseline"])
    cert = json.loads(reg.file("certify-0.5.json").read_text())
    assert (cert["sigma"], cert["n"], cert["n0"], cert["images"], cert["run_id"]) == (0.5, 200, 20, 10, reg.id)
    assert [r["index"] for r in cert["per_image"]] == list(range(0, 100, 10))  # spread over the test set
    for r in cert["per_image"]:
        assert r["correct"] == (r["prediction"] == r["label"]) and r["radius"] >= 0
        assert (r["prediction"] == -1) <= (r["radius"] == 0)
    acc0 = sum(r["correct"] for r in cert["per_image"]) / 10
    assert cert["certified_accuracy"]["0"] == acc0 == cert["curve"]["certified_accuracy"][0]
    assert base.file("certify-0.25.json").exists()
    assert any(e["type"] == "certify" for e in reg.events()[0])

    # the command: another sigma, into its own file, with the same numbers when repeated
    out = run("certify", base.id, "--store", store, "--sigma", "0.1", "--n", "100", "--n0", "10", "--images", "5")
    assert out.returncode == 0, out.stderr
    assert "certified accuracy" in out.stdout and "certify-0.1.json" in out.stdout
    c1 = json.loads(base.file("certify-0.1.json").read_text())
    assert c1["sigma"] == 0.1 and c1["images"] == 5 and c1["n"] == 100
    assert run("certify", base.id, "--store", store, "--sigma", "0.1", "--n", "100", "--n0", "10",
               "--images", "5").returncode == 0
    assert json.loads(base.file("certify-0.1.json").read_text())["per_image"] == c1["per_image"]

    # the fair table shows certified accuracy next to R; the baseline's is the best over its sigmas
    t = json.loads(run("table", "--store", store, "--format", "json").stdout)["experiments"][0]
    by = {e["method"]: e for e in t["configurations"]}  # every configuration, eligible or not
    assert by["regularizer"]["certified"]["accuracy"]["0"] == acc0
    assert by["baseline"]["certified"]["sigmas"] == [0.1, 0.25]
    best0 = max(json.loads(base.file(f).read_text())["certified_accuracy"]["0"]
                for f in ("certify-0.1.json", "certify-0.25.json"))
    assert by["baseline"]["certified"]["accuracy"]["0"] == best0
    assert any(e.get("certified") for e in t["best"])
    shown = run("table", "--store", store)
    assert "cert@0 %" in shown.stdout and "cert@0.25 %" in shown.stdout and "cert@0.5 %" in shown.stdout
    assert "certified_0.25" in run("table", "--store", store, "--format", "csv").stdout.splitlines()[0]


def test_refusals_are_one_sentence_exit_2(tmp_path):
    st = Store(tmp_path / "runs")
    r = queued_run(st, experiment="x")
    for args, needle in [((), "best.pt does not exist"), (("--sigma", "-0.5"), "--sigma must be > 0"),
                         (("--n", "50", "--n0", "100"), "--n0 (100) must not exceed --n (50)"),
                         (("--alpha", "2"), "--alpha must be in (0, 1)")]:
        out = gaussreg("certify", r.id, "--store", st.root, *args)
        assert out.exit_code == 2 and needle in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 2
    assert not list(r.path.glob("certify-*"))
    out = gaussreg("certify", "nope", "--store", st.root)
    assert out.exit_code == 2 and "no run 'nope'" in out.stderr


def test_manifest_certify_is_checked_and_keeps_run_ids(tmp_path):
    (tmp_path / "m.toml").write_text(MANIFEST)
    with_cert = [r.id for r in manifest.load(tmp_path / "m.toml").runs()]
    (tmp_path / "m.toml").write_text(MANIFEST.replace("certify = { n = 200, n0 = 20, images = 10 }\n", ""))
    assert [r.id for r in manifest.load(tmp_path / "m.toml").runs()] == with_cert
    (tmp_path / "m.toml").write_text(MANIFEST.replace("n0 = 20", "n0 = 2000"))
    out = gaussreg("run", tmp_path / "m.toml", "--store", tmp_path / "runs", "--dry-run")
    assert out.exit_code == 2 and "m.toml:14: certify.n0: 'certify.n0' (2000) must not exceed" in out.stderr


@pytest.mark.process
def test_sigterm_during_certification_cancels_without_a_half_file(tmp_path):
    run_dir = spec_only_run(tmp_path, dataset="synthetic", model="mlp", method="baseline", max_epochs=1,
                            train_subset=200, test_subset=50, robustness={"sigmas": [0.0]},
                            certify={"n": 100_000, "images": 50})
    d = run_dir.path
    p = subprocess.Popen([sys.executable, "-m", "gaussreg.worker", str(d)], env=python_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def certifying():
        assert p.poll() is None, p.communicate()[1]
        return "certifying" in run_dir.log_tail(5)
    wait_for(certifying, 120, "the worker's certifying log line")
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    assert p.returncode != 0
    st = run_dir.status()
    assert st["state"] == "cancelled" and "SIGTERM" in st["error"]
    assert not list(d.glob("certify-*")) and not list(d.glob(".certify-*"))
