import fcntl
import functools
import inspect
import multiprocessing.util
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import textual.app

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


def apt_install(*packages: str) -> subprocess.CompletedProcess:
    """apt-get update and install, one test worker at a time (the Slurm and browser tests may
    ask at once, and apt holds a lock while it runs): the others wait for the first."""
    with open("/tmp/gaussreg-tests-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wait = ["-o", "DPkg::Lock::Timeout=600"]  # an apt run by anyone else: wait, do not fail
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        r = subprocess.run(["apt-get", *wait, "update", "-q"], capture_output=True, text=True, timeout=900, env=env)
        if r.returncode != 0:
            return r
        return subprocess.run(["apt-get", *wait, "install", "-y", "-q", *packages], capture_output=True, text=True,
                              timeout=900, env=env)


def wait_for(cond, timeout: float, what: str, every: float = 0.05):
    """cond()'s first true value, polled every `every` s; past `timeout` s the test fails
    naming `what` it waited for. Every wait of the suite goes through here or the TUI's
    `until`: none may hang, and none sleeps in the hope that something happened."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def gaussreg(*args, **env):
    """`gaussreg ARGS` in this process (Typer's CliRunner), for checks of what a command says
    and its exit code: .exit_code, .stdout, .stderr. An exception that is not an exit fails
    the test with the command line (a real process would print a traceback)."""
    from typer.testing import CliRunner

    from gaussreg import cli as gaussreg_cli
    # the width a process writing into a pipe gets; set each time, as cli.print_whole leaves
    # its console at the width of the last table it printed (a process prints one)
    columns = env.get("COLUMNS") or os.environ.get("COLUMNS") or ""
    for console in (gaussreg_cli.console, gaussreg_cli.err_console):
        console.width = int(columns) if columns.isdigit() else 80
    r = CliRunner().invoke(gaussreg_cli.app, [str(a) for a in args], env=env or None)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"gaussreg {' '.join(map(str, args))} raised {r.exception!r}") from r.exception
    return r


# ---------------------------------------------------------------- the fast lane
# A test that starts another process (a worker, the fake worker, the `gaussreg` CLI, Slurm
# or its fakes, nvidia-smi where it is installed, any program at all) or runs the Textual
# app is marked `process`; `pytest -m "not process"` runs the others, in under a minute.
# The marking is checked both ways while the tests run: an unmarked test that starts one
# fails, and so does a marked test that started none (it belongs in the fast lane). Marks
# come from a module's `pytestmark`, a decorator, or the two rules in
# pytest_collection_modifyitems.

PROCESS_FIXTURES = {"fake_slurm", "slurm_conf", "snap_compare"}  # each starts Slurm, its fakes or the app

_started: list = []  # what the current test started, in words


def _record(owner, name, say):
    real = getattr(owner, name)

    @functools.wraps(real)
    def recorded(*args, **kwargs):
        what = say(*args, **kwargs)
        if what is not None:
            _started.append(what)
        return real(*args, **kwargs)
    setattr(owner, name, recorded)


def _program(args) -> str:
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    return " ".join(map(str, argv[:4]))


# Popen is under subprocess.run, asyncio's subprocesses and os.popen; recorded before it
# forks, so a program that is missing on this machine counts as on any other
_record(subprocess.Popen, "_execute_child", lambda self, args, *_a, **_k: _program(args))
_record(os, "fork", lambda: "os.fork()")
_record(os, "system", lambda cmd: f"os.system({cmd!r})")
for _name in ("posix_spawn", "posix_spawnp"):
    if hasattr(os, _name):
        _record(os, _name, lambda path, argv, *_a, **_k: _program(argv))
_record(multiprocessing.util, "spawnv_passfds", lambda path, args, fds: _program(args))
for _name in ("run_test", "run_async"):  # App.run and snap_compare go through run_async
    _record(textual.app.App, _name, lambda self, *_a, **_k: f"the Textual app {type(self).__name__}")
# gaussreg asks nvidia-smi only where shutil.which finds it: a test that would start it on a
# GPU box counts as starting it on any machine, so its mark holds on both
_record(shutil, "which", lambda cmd, *_a, **_k: "nvidia-smi (where it is installed)"
        if os.path.basename(str(cmd)) == "nvidia-smi" else None)


# What a library learns once by running a program, learnt here before any test, so that the
# first test to need it does not start that program: matplotlib's font cache (fc-list, on a
# fresh machine) and the processor's name (`uname -p`, device.py's fallback off x86)
platform.processor()
try:
    import matplotlib.font_manager  # noqa: F401
except ImportError:  # an optional extra: the plot tests skip
    pass


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(items):
    for item in items:
        # an async test drives the Textual app: the suite has no other asyncio code
        if PROCESS_FIXTURES.intersection(item.fixturenames) or inspect.iscoroutinefunction(
                getattr(item, "obj", None)):
            item.add_marker(pytest.mark.process)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    _started.clear()  # a module-scoped fixture's processes count for the first test that uses it
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield  # a test that fails (or skips) says so first; its marking is not judged
    marked = item.get_closest_marker("process") is not None
    if _started and not marked:
        pytest.fail(f"this test started {_started[0]}{f' and {len(_started) - 1} more' if len(_started) > 1 else ''}"
                    " but is not marked `process`: mark it @pytest.mark.process, or check what it asks for "
                    "in this process", pytrace=False)
    if marked and not _started:
        pytest.fail("this test is marked `process` but started no process and ran no Textual app: take the "
                    "mark off (or change the rule in tests/conftest.py that gave it) so the fast lane runs it",
                    pytrace=False)
    return result
