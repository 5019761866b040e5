"""The GPU acceptance check (python -m gaussreg.bench.gpu_check) in its CPU mode: every check
it makes on a GPU, small, on the CPU; and what it says on a machine without a GPU."""
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import python_env

from gaussreg.bench import gpu_check


@pytest.mark.process
def test_the_gpu_check_passes_in_its_cpu_mode_and_writes_its_json(tmp_path):
    out = tmp_path / "check.json"
    p = subprocess.run([sys.executable, "-m", "gaussreg.bench.gpu_check", "--cpu", "--out", str(out)],
                       env=python_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASS: 5/5 checks passed" in p.stdout and "FAIL" not in p.stdout
    r = json.loads(out.read_text())
    assert r["mode"] == "cpu" and r["passed"] is True and r["gpu"] is None
    assert [c["name"] for c in r["checks"]] == [
        "sweep --per-gpu 3", "regularizer repeats bitwise (inductor caches off)",
        "SIGKILL then resume equals the uninterrupted run", "peak GPU memory per run",
        "step timings (no per-step sync)"]
    assert all(c["ok"] for c in r["checks"])
    killed = re.search(r"killed after epoch (\d+), resumed to epoch (\d+): equal", r["checks"][2]["detail"])
    assert killed and 3 <= int(killed[1]) < int(killed[2]) == 8  # the CPU mode's 8 epochs
    assert "['exact']" in r["checks"][0]["detail"]
    assert sorted((s["method"], s["precision"]) for s in r["steps"]) == [
        ("baseline", "bf16"), ("baseline", "fp32"), ("regularizer", "bf16"), ("regularizer", "fp32")]
    assert all(s["step_s"] > 0 and s["peak_allocated"] is None for s in r["steps"])
    assert r["gpu_peak_memory"] == {"baseline": None, "regularizer": None, "augment": None}
    assert r["repeatability"]["gpu_name"] is None and r["repeatability"]["tf32"] is False


def test_the_gpu_check_without_a_gpu_says_so_and_points_to_cpu_mode(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible: not even nvidia-smi is asked
    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "has no GPU that torch" in err and "(visible: none)" in err and "--cpu" in err
    assert not (tmp_path / "x.json").exists()


def test_the_places_a_worker_holds_are_read_from_its_open_files(tmp_path):
    places = tmp_path / "_gpus"
    places.mkdir()
    (places / "GPU-1.0.lock").touch()
    (places / "GPU-1.1.lock").touch()
    fd = os.open(places / "GPU-1.1.lock", os.O_RDWR)
    try:
        assert gpu_check.held_places(os.getpid(), places) == ["GPU-1.1.lock"]
    finally:
        os.close(fd)
    assert gpu_check.held_places(os.getpid(), places) == []
