import os
import sys
from pathlib import Path

import pytest

# The suite checks the same things on a GPU box as here: without this, `device = "auto"` would
# pick cuda and `--gpus all` would make GPU slots in every child. Set before torch can
# initialise CUDA; tests marked `gpu` get the host's value back.
HOST_CUDA_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _deterministic_threads(monkeypatch, request):
    if request.node.get_closest_marker("gpu"):
        if HOST_CUDA_VISIBLE_DEVICES is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", HOST_CUDA_VISIBLE_DEVICES)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    # results compared bitwise must come from the same thread count
    monkeypatch.setenv("GAUSSREG_THREADS", "1")
    # under pytest-xdist every core already runs a test: one thread each, not cores x cores
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def python_env(**extra):
    """The environment of a child process; it sees no GPU unless the test is marked `gpu`
    (or passes CUDA_VISIBLE_DEVICES itself)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "GAUSSREG_THREADS": "1", **extra}


def cli(*args):
    return [sys.executable, "-m", "gaussreg", *map(str, args)]
