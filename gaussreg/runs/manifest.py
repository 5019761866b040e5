"""The experiment manifest (TOML): experiments x methods x parameter grids -> run specs.

A list value of a run key or of a method parameter is a grid axis; the runs of an
experiment are the Cartesian product. Tables (`optimizer`, `robustness`) are taken
as they are. Errors name the file, the line and the key, and are collected: one
ManifestError lists every problem found in one pass."""

from __future__ import annotations

import copy
import difflib
import fnmatch
import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from gaussreg.core import plugins
from gaussreg.data import datasets
from gaussreg.runs.slurm_settings import SlurmConfigError, settings
from gaussreg.runs.store import RunFileError, read_bytes_nofollow
from gaussreg.runs.spec import ARG_TABLES, EXPERIMENT_NAME, SCALARS, TABLES, SpecError, resolve, run_id
from gaussreg.science.methods import METHOD_CLASSES

RUN_KEYS = (set(SCALARS) - {"experiment", "data_dir"}) | {"optimizer", "robustness", "certify", "preset", *ARG_TABLES}
EXPERIMENT_KEYS = RUN_KEYS | {"name", "tolerance", "methods", "seeds"}
TOP_KEYS = {"defaults", "experiment", "slurm", "python_path"}


class ManifestError(Exception):
    """What is wrong with a manifest: one problem (path, line, key), or several found in one
    pass (`errors`, each a ManifestError), so a user fixes them all at once."""

    def __init__(self, path, line: Optional[int], key: str, message: str):
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")
        self.path, self.line, self.key = path, line, key
        self.errors: List["ManifestError"] = [self]

    @classmethod
    def of(cls, path, errors: List["ManifestError"]) -> "ManifestError":
        if len(errors) == 1:
            return errors[0]
        e = cls(path, None, "", f"{len(errors)} problems, each on its own line:\n"
                + "\n".join(f"  {x}" for x in errors))
        e.line, e.key, e.errors = errors[0].line, errors[0].key, list(errors)
        return e


REQUIRED = ("name", "dataset", "model", "methods")  # per experiment; dataset and model may come from [defaults]
MAX_ERRORS = 50  # a manifest this broken is best fixed from the top
# what a missing or unknown dataset or model is replaced by while the rest of its experiment
# is checked (they accept every other key); the manifest is refused all the same
STAND_IN = {"dataset": "synthetic", "model": "mlp"}


@dataclass
class PlannedRun:
    id: str
    spec: dict


@dataclass
class Experiment:
    name: str
    tolerance: float
    runs: List[PlannedRun] = field(default_factory=list)
    index: int = 0  # its place among the [[experiment]] tables, for error lines


@dataclass
class Manifest:
    path: Path
    experiments: List[Experiment]
    slurm: dict = field(default_factory=dict)  # the optional [slurm] table (gaussreg.runs.slurm_settings)
    error: Optional[Callable] = None  # (experiment index, key path, message) -> ManifestError with its line

    def runs(self) -> List[PlannedRun]:
        return [r for e in self.experiments for r in e.runs]

    def select(self, pattern: Optional[str]) -> List[PlannedRun]:
        """Runs whose experiment name, run id or method matches the glob."""
        if not pattern:
            return self.runs()
        return [r for e in self.experiments for r in e.runs
                if any(fnmatch.fnmatchcase(s, pattern) for s in (e.name, r.id, r.spec["method"]))]


class _Lines:
    """Finds the line of a key in the manifest text (tomllib keeps no positions)."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.sections = []  # (kind, first line index), kind is 'defaults' or 'experiment'
        for i, line in enumerate(self.lines):
            s = line.strip()
            if re.match(r"\[\[\s*experiment\s*\]\]", s):
                self.sections.append(("experiment", i))
            elif re.match(r"\[\s*defaults\s*\]", s):
                self.sections.append(("defaults", i))

    def _range(self, section):
        if section is None:
            return 0, len(self.lines)
        kind, index = section
        starts = [i for k, i in self.sections if k == kind]
        if index >= len(starts):
            return 0, len(self.lines)
        start = starts[index]
        later = [i for _, i in self.sections if i > start]
        return start, later[0] if later else len(self.lines)

    def find(self, section, path: List[str]) -> Optional[int]:
        lo, hi = self._range(section)
        for depth in range(len(path), 0, -1):
            leaf = re.escape(path[depth - 1])
            pat = re.compile(rf'(^|[\s{{,.\[])"?{leaf}"?\s*(=|\.|\])')
            hits = [i for i in range(lo, hi) if pat.search(self.lines[i].split("#", 1)[0])]
            if hits:
                richer = [i for i in hits if all(p in self.lines[i] for p in path[:depth - 1])]
                return (richer or hits)[0] + 1
        return lo + 1 if section is not None else None


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"


def load(path, data_dir: Optional[str] = None) -> Manifest:
    """Parse, validate and expand a manifest. Raises ManifestError; launches nothing."""
    path = Path(path)
    text, doc = _read(path)
    lines = _Lines(text)
    errors: List[ManifestError] = []

    def make(section, keypath: List[str], message: str) -> ManifestError:
        return ManifestError(path, lines.find(section, keypath), ".".join(keypath), message)

    def err(section, keypath: List[str], message: str) -> None:
        e = make(section, keypath, message)
        if str(e) not in {str(x) for x in errors}:  # a grid repeats the same mistake at every point
            errors.append(e)

    slurm_table, python_path, defaults, exps = _top_level(doc, path, err)
    base = path.resolve().parent
    out, names = [], set()
    for i, exp in enumerate(exps):
        if len(errors) >= MAX_ERRORS:
            break
        sec = ("experiment", i)
        if not isinstance(exp, dict):
            err(sec, ["experiment"], "each [[experiment]] must be a table")
            continue
        name, exp, merged, tol, methods = _merge_experiment(i, exp, defaults, names, base, err)
        axes = _axes(merged, sec, err)
        if axes is None:
            continue  # no runs to check: the grid has no points
        exp_out = Experiment(name, float(tol), index=i)
        extra = {**({"python_path": python_path} if python_path else {}),
                 **({"data_dir": str(data_dir)} if data_dir else {})}
        _expand_methods(exp_out, exp, methods, axes, extra, sec, err, errors)
        ids = [r.id for r in exp_out.runs]
        if len(set(ids)) != len(ids):
            dup = next(x for x in ids if ids.count(x) > 1)
            err(sec, ["methods"], f"two grid points give the same run ({dup}): a grid repeats a value "
                "or two tables of a method overlap")
        out.append(exp_out)
    if errors:
        raise ManifestError.of(path, sorted(errors[:MAX_ERRORS], key=lambda e: e.line or 0))

    def located(i: int, keypath: List[str], message: str) -> ManifestError:
        sec = ("experiment", i) if keypath[0] in exps[i] else ("defaults", 0) if keypath[0] in defaults else None
        return make(sec, keypath, message)

    return Manifest(path, out, slurm_table, located)


MAX_MANIFEST = 16 << 20  # a hand-written manifest is a few kB; a grid of 100,000 runs needs no more than a few lines


def _read(path: Path):
    """The manifest's text and its TOML document, or the ManifestError saying why not."""
    try:
        # a regular file of a sane size: a FIFO or a device (/dev/zero) would hang or never end
        text = read_bytes_nofollow(path, MAX_MANIFEST, follow=True).decode("utf-8")
    except FileNotFoundError:
        raise ManifestError(path, None, "", "the manifest file does not exist") from None
    except RunFileError as e:
        raise ManifestError(path, None, "", str(e).replace(f"{path} ", "", 1).replace(
            "a folder, not a regular file", "a folder, not a manifest file")) from None
    except OSError as e:
        raise ManifestError(path, None, "", f"cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        line = text_line = e.object[:e.start].count(b"\n") + 1
        raise ManifestError(path, line, "", f"is not UTF-8 text (bad byte at offset {e.start}, line {text_line})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise ManifestError(path, int(m.group(1)) if m else None, "", f"not valid TOML ({e})") from None
    return text, doc


def _top_level(doc: dict, path: Path, err):
    """The checked top-level tables: [slurm], python_path (absolute), [defaults], [[experiment]]."""
    for key in doc:
        if key not in TOP_KEYS:
            err(None, [key], "unknown top-level key" + _suggest(key, TOP_KEYS))
    slurm_table = doc.get("slurm", {})
    if not isinstance(slurm_table, dict):
        err(None, ["slurm"], "must be a table")
        slurm_table = {}
    try:
        settings(slurm_table)
    except SlurmConfigError as e:
        err(None, ["slurm", e.key], str(e).split(": ", 1)[1])
    python_path = doc.get("python_path", [])
    if not (isinstance(python_path, list) and all(isinstance(p, str) and p for p in python_path)):
        err(None, ["python_path"], f"must be a list of folders (relative to the manifest), like [\"src\"], "
            f"not {python_path!r}")
        python_path = []
    base = path.resolve().parent
    python_path = [str((base / p).resolve()) for p in python_path]
    for p in python_path:
        if not Path(p).is_dir():
            err(None, ["python_path"], f"folder {p} does not exist")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        err(None, ["defaults"], "must be a table")
        defaults = {}
    for key in list(defaults):
        if key not in RUN_KEYS | {"tolerance", "seeds"}:
            err(("defaults", 0), [key], "unknown key in [defaults]" + _suggest(key, RUN_KEYS))
            defaults = {k: v for k, v in defaults.items() if k != key}
    exps = doc.get("experiment", [])
    if not isinstance(exps, list) or not exps:
        err(None, ["experiment"], "the manifest has no [[experiment]]")
        exps = []
    return slurm_table, python_path, defaults, exps


SEEDS_MESSAGE = "must be a non-empty list of integers >= 0"


def _is_seed_list(v) -> bool:
    """An experiment's or a method table's `seeds`: the seed axis of its runs."""
    return isinstance(v, list) and bool(v) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                   for x in v)


def _merge_experiment(i: int, exp: dict, defaults: dict, names: set, base: Path, err):
    """One [[experiment]] over [defaults], checked: its name, its known keys, its tolerance,
    its methods table and its values (seeds as the seed axis, data paths made absolute)."""
    sec = ("experiment", i)
    name = exp.get("name")
    table = f"[[experiment]] {name!r}" if isinstance(name, str) else f"[[experiment]] number {i + 1}"
    for key in exp:
        if key not in EXPERIMENT_KEYS:
            err(sec, [key], f"unknown key in {table}" + _suggest(key, EXPERIMENT_KEYS))
    exp = {k: v for k, v in exp.items() if k in EXPERIMENT_KEYS}
    if not isinstance(name, str) or not EXPERIMENT_NAME.fullmatch(name):
        err(sec, ["name"], "every experiment needs a name of 1 to 100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit" + (f" (got {name!r:.120})" if name is not None else ""))
        name = f"experiment{i + 1}"
    elif name in names:
        err(sec, ["name"], f"duplicate experiment name {name!r}")
    names.add(name)
    merged = {k: v for k, v in {**defaults, **exp}.items() if k != "name"}
    tol = merged.pop("tolerance", 0.0)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol <= 1:  # NaN fails too
        err(sec if "tolerance" in exp else ("defaults", 0), ["tolerance"],
            f"must be a fraction in [0, 1] (0.0039 means 0.39%), not {tol!r}")
        tol = 0.0
    methods = merged.pop("methods", None)
    if not isinstance(methods, dict) or not methods:
        err(sec, ["methods"], f"{table} needs a non-empty 'methods' table, e.g. methods.baseline = {{}}")
        methods = {}
    for key in ("dataset", "model"):
        if key not in merged:
            err(sec, [key], f"{table} needs a {key!r} (in it or in [defaults])")
            merged[key] = STAND_IN[key]  # to check the rest of the experiment; reported, so never run
    seeds = merged.pop("seeds", None)
    if seeds is not None:
        if "seed" in exp:
            err(sec, ["seeds"], "give either 'seed' or 'seeds', not both")
        elif not _is_seed_list(seeds):
            err(sec, ["seeds"], SEEDS_MESSAGE)
        else:
            merged["seed"] = seeds
    ds = merged.get("dataset")
    for d in (ds if isinstance(ds, list) else [ds]):
        if isinstance(d, str) and datasets.source_path(d) is not None and not datasets.source_path(d).is_absolute():
            # a user's data file or folder: relative to the manifest, stored absolute
            kind = d.split(":", 1)[0]
            fixed = f"{kind}:{(base / datasets.source_path(d)).resolve()}"
            merged["dataset"] = [fixed if x == d else x for x in ds] if isinstance(ds, list) else fixed
            ds = merged["dataset"]
    return name, exp, merged, tol, methods


def _axes(merged: dict, sec, err) -> Optional[dict]:
    """The grid's axes: a list value is an axis, each argument of an argument table its own;
    None when an axis is empty (the grid has no points)."""
    axes, empty = {}, False
    for key, v in merged.items():
        if key in ARG_TABLES and isinstance(v, dict):
            for k2, v2 in v.items():  # each argument is an axis of its own
                if isinstance(v2, list) and not v2:
                    err(sec, [key, k2], "empty grid: a list value needs at least one element")
                    empty = True
                axes[f"{key}.{k2}"] = v2 if isinstance(v2, list) else [v2]
            if not v:
                axes[key] = [{}]
            continue
        if isinstance(v, list) and key not in TABLES:
            if not v:
                err(sec, [key], "empty grid: a list value needs at least one element")
                empty = True
            axes[key] = v
        else:
            axes[key] = [v]
    return None if empty else axes


def _expand_methods(exp_out: Experiment, exp: dict, methods: dict, axes: dict, extra: dict, sec, err,
                    errors: list) -> None:
    """Every grid point of every method, resolved into exp_out.runs (none once there are errors)."""
    for method, entries in methods.items():
        if method not in METHOD_CLASSES:
            err(sec, ["methods", method], f"unknown method {method!r}" + _suggest(method, METHOD_CLASSES))
            continue
        # several grids of one method: an array of tables, e.g. a wide grid at one seed and
        # its winner at more seeds
        entries = entries if isinstance(entries, list) and entries else [entries]
        for params in entries:
            if not isinstance(params, dict):
                err(sec, ["methods", method], "must be a table of parameters, e.g. {} or { sigma = 0.25 }, "
                    "or an array of such tables")
                continue
            entry_axes = axes
            if "seeds" in params:  # this entry's own seeds instead of the experiment's
                params = dict(params)
                seeds = params.pop("seeds")
                if not _is_seed_list(seeds):
                    err(sec, ["methods", method, "seeds"], SEEDS_MESSAGE)
                    continue
                entry_axes = {**axes, "seed": seeds}
            _expand_entry(exp_out, exp, method, params, entry_axes, extra, sec, err, errors)


def _expand_entry(exp_out: Experiment, exp: dict, method: str, params: dict, axes: dict, extra: dict, sec,
                  err, errors: list) -> None:
    """The grid points of one table of a method's parameters, resolved into exp_out.runs."""
    name = exp_out.name
    p_axes = {}
    for k, v in params.items():
        if isinstance(v, list):
            if not v:
                err(sec, ["methods", method, k], "empty grid: a list value needs at least one element")
            p_axes[k] = v
        else:
            p_axes[k] = [v]
    keys, pkeys = list(axes), list(p_axes)
    for combo in itertools.product(*axes.values()):
        for pcombo in itertools.product(*p_axes.values()):
            partial = {"experiment": name, "method": method, "params": dict(zip(pkeys, pcombo))}
            for k, v in zip(keys, combo):
                if "." in k and k.split(".", 1)[0] in ARG_TABLES:
                    partial.setdefault(k.split(".", 1)[0], {})[k.split(".", 1)[1]] = v
                else:
                    partial.setdefault(k, v)
            partial.update(extra)
            spec = _resolve_all(partial, lambda e: _spec_error(err, sec, exp, method, e))
            if spec is not None and not errors:
                exp_out.runs.append(PlannedRun(run_id(spec), spec))
            if len(errors) >= MAX_ERRORS:
                break


def _spec_error(err, sec, exp: dict, method: str, e: SpecError) -> None:
    k = e.key
    kp = ["methods", method, k.split(".", 1)[1]] if k.startswith("params.") else k.split(".")
    section = sec if (kp[0] in exp or kp[0] == "methods") else ("defaults", 0)
    err(section, kp, str(e))


def _resolve_all(partial: dict, report) -> Optional[dict]:
    """The resolved spec, or None after reporting every bad key of it: resolve() stops at the
    first, so the bad key is dropped (its default taken) and the rest checked again."""
    partial, dropped = copy.deepcopy(partial), set()
    for _ in range(20):
        try:
            return resolve(partial)
        except SpecError as e:
            path = e.key.split(".") if e.key else []
            holder = partial
            for part in path[:-1]:
                holder = holder.get(part) if isinstance(holder, dict) else None
            absent = path[:1] == ["params"] and isinstance(holder, dict) and path[-1] not in holder
            if e.key in dropped or (dropped and absent):
                # "needs parameter x" after x, or a misspelling of x, was dropped: the same mistake again
                return None
            report(e)
            dropped.add(e.key)
            if path in (["dataset"], ["model"]) and partial.get(path[0]) != STAND_IN[path[0]]:
                partial[path[0]] = STAND_IN[path[0]]
                continue
            if (not path or path[0] == "method" or not isinstance(holder, dict) or path[-1] not in holder):
                return None  # nothing to drop: the rest cannot be checked without it
            del holder[path[-1]]
    return None


def uses_own_code(m: Manifest, runs: Optional[List[PlannedRun]] = None) -> bool:
    """Whether a run (of `runs`, default all of the manifest's) names a model or dataset that
    is not built into gaussreg, or gives a factory arguments (which only calling it checks)."""
    return any(r.spec["model"] not in plugins.BUILTIN_MODELS or not datasets.is_builtin(r.spec["dataset"])
               or any(k in r.spec for k in ARG_TABLES) for r in (m.runs() if runs is None else runs))


def check_code(m: Manifest, timeout: float = 600, runs: Optional[List[PlannedRun]] = None) -> List[ManifestError]:
    """Import every factory and loader the manifest names, in a subprocess (gaussreg.runs.check),
    build each model, run 2 images through it and check its split; the problems found,
    as manifest errors naming the file, line and key. With `runs`, only theirs: a launch of
    some experiments trains only those, so another's broken model is not its problem."""
    combos, where = [], {}
    chosen = None if runs is None else {r.id for r in runs}
    for e in m.experiments:
        for r in e.runs:
            if chosen is not None and r.id not in chosen:
                continue
            s = r.spec
            item = {k: s.get(k) for k in ("model", "model_args", "dataset", "dataset_args", "python_path")}
            key = json.dumps(item, sort_keys=True)
            if key not in where:
                where[key] = (len(combos), e.index)
                combos.append({**item, "depths": []})
            c = combos[where[key][0]]
            depth = s["params"].get("depth", 1) if s["method"] == "regularizer" else None
            if depth is not None and depth not in c["depths"]:
                c["depths"].append(depth)
    root = str(Path(__file__).resolve().parents[1])  # the child imports this gaussreg
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
           "GAUSSREG_PARENT_PID": str(os.getpid())}  # it dies with us (gaussreg.runs.environment.watch_parent)
    try:
        out = subprocess.run([sys.executable, "-m", "gaussreg.runs.check"], input=json.dumps(combos),
                             capture_output=True, text=True, env=env, timeout=timeout)
        found = json.loads(out.stdout)
    except subprocess.TimeoutExpired:
        return [ManifestError(m.path, None, "", f"checking the manifest's models and datasets took more than "
                                                f"{timeout:g} s")]
    except ValueError:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return [ManifestError(m.path, None, "", f"checking the manifest's models and datasets failed ({tail})")]
    index_of = {i: exp for i, exp in where.values()}
    return [m.error(index_of[f["index"]], f["key"].split("."), f["message"]) for f in found]
