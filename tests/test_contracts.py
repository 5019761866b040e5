"""The import contracts, enforced rather than remembered.

The core (gaussreg) must run without the TUI, and the file-reading tools (ls, table, show, the
scheduler, the TUI) must start without torch, which costs over a second at every start."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Modules that read run files or manifests only: torch must not be imported at module level.
TORCH_FREE = ["gaussreg.runs.store", "gaussreg.runs.spec", "gaussreg.runs.manifest", "gaussreg.runs.reader",
              "gaussreg.views.report", "gaussreg.launch.scheduler", "gaussreg.cli", "gaussreg.launch.request",
              "gaussreg.views.live_view", "gaussreg.launch.slurm", "gaussreg.runs.device", "gaussreg.science.methods",
              "gaussreg.science.robustness", "gaussreg.core.schema", "gaussreg.data.datasets", "gaussreg.science.units",
              "gaussreg.api", "tui.app"]
CORE = ["gaussreg.cli", "gaussreg.runs.worker", "gaussreg.views.report", "gaussreg.launch.scheduler", "gaussreg.bench"]


def _imported(module):
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.mark.process  # a fresh interpreter: what a module imports at its start
@pytest.mark.parametrize("module", TORCH_FREE)
def test_file_readers_do_not_import_torch(module):
    assert "torch" not in _imported(module)


@pytest.mark.process
@pytest.mark.parametrize("module", CORE)
def test_core_does_not_import_textual(module):
    mods = _imported(module)
    assert not {m for m in mods if m == "textual" or m.startswith(("textual.", "tui"))}


@pytest.mark.process
def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports")
    assert exe, "import-linter is a dev dependency: pip install -e '.[dev]'"
    out = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 kept, 0 broken" in out.stdout


@pytest.mark.process
@pytest.mark.parametrize("where,line", [
    ("gaussreg/science/moments.py", "from gaussreg.runs import store  # upward: science below runs\n"),
    ("gaussreg/runs/spec.py", "def _hidden():\n    from gaussreg.launch import slurm  # upward, hidden in a function\n"),
    ("tui/watcher.py", "from tui import widgets  # upward: the watcher is the TUI's floor\n"),
    ("gaussreg/cli.py", "from gaussreg import worker  # the README's old name, not the real module\n"),
])
def test_the_contracts_catch_an_import_that_breaks_the_layers(tmp_path, where, line):
    """A copy of the code with one forbidden import added: lint-imports says which contract broke."""
    for pkg in ("gaussreg", "tui"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    f = tmp_path / where
    f.write_text(f.read_text() + "\n\n" + line)
    out = subprocess.run([shutil.which("lint-imports"), "--config", str(tmp_path / "pyproject.toml"), "--no-cache"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 1 and "1 broken" in out.stdout, out.stdout + out.stderr


MAX_FUNCTION_LINES = 80  # a function longer than a screen gets split into named steps


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted([*(ROOT / "gaussreg").rglob("*.py"), *(ROOT / "tui").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(long)


def _run_file_names_spelled(source: str) -> list:
    """The string literals in `source` that name a file of a run directory."""
    from gaussreg.runs import store
    names = {store.SPEC_FILE, store.STATUS_FILE, store.EVENTS_FILE, store.RESULT_FILE, store.LAST_CHECKPOINT,
             store.BEST_CHECKPOINT, store.WORKER_LOG, store.LOCK_FILE, store.CANCEL_REQUEST, store.CERTIFICATE_GLOB}
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and (node.value in names or node.value.startswith("certify-"))]


def test_run_directory_files_are_named_only_in_the_store():
    """The run directory's layout is store.py's: elsewhere a file is reached through RunDir
    (run.spec_file, run.best_checkpoint, ...), never by spelling its name (prose may)."""
    assert _run_file_names_spelled('p = run.path / "best.pt"\nq = f"certify-{s}.json"') == [
        (1, "best.pt"), (2, "certify-")]
    spelled = [f"{path.relative_to(ROOT)}:{line} {name!r}"
               for path in sorted([*(ROOT / "gaussreg").rglob("*.py"), *(ROOT / "tui").rglob("*.py")])
               if path.name != "store.py" for line, name in _run_file_names_spelled(path.read_text())]
    assert not spelled, "run-directory file names outside gaussreg/store.py: " + "; ".join(spelled)


@pytest.mark.process
def test_the_readmes_older_names_still_work_and_are_the_real_objects():
    """Notebooks and scripts written against the flat package keep working after the split
    into layers: the same objects, so a monkeypatch through an old name reaches the real one."""
    import gaussreg.adf
    import gaussreg.datasets
    import gaussreg.models
    import gaussreg.regularizer
    import gaussreg.report
    import gaussreg.smoothing
    import gaussreg.store
    from gaussreg.data import datasets
    from gaussreg.runs import reader, store
    from gaussreg.science import adf, models, regularizer, smoothing
    assert (gaussreg.models, gaussreg.regularizer, gaussreg.smoothing, gaussreg.adf, gaussreg.store,
            gaussreg.datasets) == (models, regularizer, smoothing, adf, store, datasets)
    from gaussreg.models import FirstBlock, GaussNet, NormalizedConv2d, as_gaussnet  # noqa: F401
    from gaussreg.regularizer import expected_logits
    from gaussreg.smoothing import predict
    assert expected_logits is regularizer.expected_logits and predict is smoothing.predict
    assert gaussreg.report.RunReader is reader.RunReader and gaussreg.report.fair_table is not None
    for old in ("gaussreg.worker", "gaussreg.slurm"):  # as `python -m`: their usage line, exit 2 without arguments
        out = subprocess.run([sys.executable, "-m", old], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 2 and "usage: python -m gaussreg." in out.stderr, (old, out.stderr)
