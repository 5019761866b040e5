"""User code named in a manifest: model factories and dataset loaders.

A factory is named by an import path `module:attr` (`mypkg.models:resnet18`), by a
name an installed package registers under the entry-point group `gaussreg.models`
(`gaussreg.datasets` for loaders), or, for models, by a built-in name: the built-in
models are registered here as `gaussreg.science.models:lenet` etc. and go through the same
import-and-call path as everybody's.

This module is torch-free: specs and manifests name factories and hash their source
without importing them. Importing (`load`) happens in the worker and in
`gaussreg run --dry-run`'s check subprocess, which run the user's code with the user's
rights, as running their script would."""

from __future__ import annotations

import functools
import hashlib
import importlib
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

BUILTIN_MODELS = {"lenet": "gaussreg.science.models:lenet", "alexnet": "gaussreg.science.models:alexnet",
                  "mlp": "gaussreg.science.models:mlp"}
GROUPS = {"model": "gaussreg.models", "dataset": "gaussreg.datasets"}
IMPORT_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class PluginError(ValueError):
    """A factory cannot be found, imported or called; one sentence naming it."""


@functools.lru_cache(maxsize=None)  # installed packages do not change under a running process
def entry_points(kind: str) -> Dict[str, str]:
    """name -> `module:attr` of the installed packages' entry points for models or datasets."""
    group = GROUPS[kind]
    try:
        eps = metadata.entry_points(group=group)
    except TypeError:  # Python 3.9: a dict of groups
        eps = metadata.entry_points().get(group, [])
    return {ep.name: ep.value.replace(" ", "") for ep in eps}


def target(kind: str, name: str) -> Optional[str]:
    """The `module:attr` a model or dataset name stands for, or None when it names none
    (built-in models first, then entry points, then an import path)."""
    if kind == "model" and name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]
    eps = entry_points(kind)
    if name in eps:
        return eps[name]
    if IMPORT_PATH.fullmatch(name):
        return name
    return None


def _with_path(python_path: Sequence[str]):
    for p in reversed(list(python_path or ())):
        if p not in sys.path:
            sys.path.insert(0, p)


def load(kind: str, name: str, python_path: Sequence[str] = ()):
    """Import and return the callable `name` stands for (python_path first on sys.path)."""
    tgt = target(kind, name)
    if tgt is None:
        raise PluginError(f"{kind} {name!r} is neither a built-in name, nor registered under the entry-point group "
                          f"{GROUPS[kind]}, nor an import path like 'mypkg.{kind}s:build'")
    _with_path(python_path)
    module, attr = tgt.split(":", 1)
    try:
        obj = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - the user's module: any error is theirs to see
        raise PluginError(f"cannot import module {module!r} of {kind} factory {name!r} "
                          f"({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"module {module!r} has no attribute {attr!r} ({kind} factory {name!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(f"{kind} factory {name!r} is a value of type {type(obj).__name__}, not a callable")
    return obj


def _module_file(module: str, python_path: Sequence[str]) -> Optional[Path]:
    """The source file of a module, found on python_path and sys.path without importing it."""
    parts = module.split(".")
    for root in [*(python_path or ()), *sys.path]:
        base = Path(root or ".").joinpath(*parts)
        for p in (base.with_suffix(".py"), base / "__init__.py"):
            if p.is_file():
                return p
    return None


def _files(module: str, python_path: Sequence[str]) -> Iterable[Path]:
    """What the hash covers: every .py file of the top-level package the module is in
    (a model is rarely one file), or the module's own file."""
    f = _module_file(module, python_path)
    if f is None:
        return []
    top = _module_file(module.split(".")[0], python_path)
    if top is not None and top.name == "__init__.py":
        return sorted(top.parent.rglob("*.py"))
    return [f]


def source_hash(kind: str, name: str, python_path: Sequence[str] = ()) -> Optional[str]:
    """A short hash of the source of the module a factory lives in (its whole top-level
    package), so runs of changed model or loader code get new ids. None for the
    built-in models (gaussreg's own code) and for modules without a findable source."""
    if kind == "model" and name in BUILTIN_MODELS:
        return None
    tgt = target(kind, name)
    if tgt is None:
        return None
    module = tgt.split(":", 1)[0]
    files = list(_files(module, python_path))
    if not files:
        return None
    h = hashlib.sha1()
    root = files[0].parent if len(files) == 1 else Path(_module_file(module.split(".")[0], python_path)).parent
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()[:12]
