"""How settings are declared and checked: one error naming the bad key, and a declared
parameter (type, default, range). Torch-free: specs and manifests are checked without torch."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict


class SpecError(ValueError):
    """One clear sentence about one key of a spec (`model`, `optimizer.lr`, `params.sigma`)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


REQUIRED = object()  # the default of a parameter that must be given


@dataclass(frozen=True)
class Param:
    """One parameter of a training method."""

    type: Any  # a type, or a tuple of types
    default: Any = REQUIRED
    ok: Callable[[Any], bool] = lambda v: True
    why: str = ""  # what `ok` means, said when it fails
    # Added after run ids existed: left out of a resolved spec at its default, so the ids
    # of earlier runs (and of manifests that do not use it) stay the same.
    omitted_at_default: bool = False

    def type_name(self) -> str:
        return " or ".join(t.__name__ for t in self.type) if isinstance(self.type, tuple) else self.type.__name__


def nonneg(typ, default=REQUIRED) -> Param:
    return Param(typ, default, lambda v: v >= 0, "must be >= 0")


def check_params(method: str, schema: Dict[str, Param], given: dict) -> dict:
    """The method's parameters with defaults filled in; SpecError names the bad key as `params.<key>`."""
    for key in given:
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known: " + (", ".join(schema) or "none")
            raise SpecError(f"params.{key}", f"unknown parameter {key!r} for method {method!r} ({hint})")
    out = {}
    for key, p in schema.items():
        if key not in given:
            if p.default is REQUIRED:
                raise SpecError(f"params.{key}", f"method {method!r} needs parameter {key!r}")
            out[key] = p.default
            continue
        out[key] = _check_value(method, key, p, given[key])
    return out


def _check_value(method: str, key: str, p: Param, v):
    def bad(what):
        return SpecError(f"params.{key}", f"parameter {key!r} of method {method!r} {what}")
    if p.type is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, p.type) or (p.type is not bool and isinstance(v, bool)):
        raise bad(f"must be {p.type_name()}, not {v!r}")
    if p.type is float and not math.isfinite(v):
        raise bad(f"must be a finite number, not {v!r}")
    if not p.ok(v):
        raise bad(f"{p.why} (got {v!r})")
    return v
