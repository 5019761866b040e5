import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _deterministic_threads(monkeypatch):
    # results compared bitwise must come from the same thread count
    monkeypatch.setenv("GAUSSREG_THREADS", "1")
    torch.set_num_threads(2)


def python_env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "GAUSSREG_THREADS": "1", **extra}


def cli(*args):
    return [sys.executable, "-m", "gaussreg", *map(str, args)]
