"""A run's fully resolved configuration (`spec.json`): presets, validation, stable id."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from typing import Optional

from gaussreg.core import plugins
from gaussreg.core.schema import REQUIRED, SpecError
from gaussreg.data import datasets
from gaussreg.science.methods import BANK_VERSION, METHOD_CLASSES  # a method's parameters are declared on its class
from gaussreg.science.robustness import CERTIFY_DEFAULTS, CERTIFY_SIGMA, default_sigmas

SPEC_VERSION = 1
MAX_SAMPLES = 1000  # robustness draws per image and sigma: each is a pass over the test set per sigma
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a folder-safe prefix of run ids


# The paper's Table 1, selected by model and overridable key by key.
PRESETS = {
    "lenet": {"batch_size": 1000, "lr_patience": 3, "lr_factor": 0.9, "early_stop": 10,
              "optimizer": {"name": "adam", "lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}},
    "alexnet": {"batch_size": 128, "lr_patience": 5, "lr_factor": 0.5, "early_stop": 20,
                "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}},
}
PRESETS["mlp"] = PRESETS["lenet"]
PRESET_NAMES = ("lenet", "alexnet")  # what `preset` may name; a built-in model starts from its own
PRESET_KEYS = ("batch_size", "lr_patience", "lr_factor", "early_stop")

OPTIMIZER_KEYS = {"adam": {"name", "lr", "betas", "eps", "weight_decay"},
                  "sgd": {"name", "lr", "momentum", "nesterov", "weight_decay"}}
ROBUSTNESS_KEYS = {"sigmas", "samples", "clip"}

# key -> (types, check, meaning); the optimizer, robustness and params tables are checked apart
_nonneg = (lambda v: v >= 0, "must be >= 0")
_pos = (lambda v: v >= 1, "must be >= 1")
_opt_pos = (lambda v: v is None or v >= 1, "must be >= 1")
SCALARS = {
    "experiment": (str, lambda v: v == "" or EXPERIMENT_NAME.fullmatch(v) is not None,
                   "must be 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"),
    "dataset": (str, lambda v: datasets.is_builtin(v) or datasets.source_path(v) is not None
                or plugins.target("dataset", v) is not None,
                "must be one of " + ", ".join(datasets.DATASETS) + ", folder:PATH, npz:PATH, a loader's import path "
                "(mypkg.data:load) or a name registered under the entry-point group gaussreg.datasets"),
    "model": (str, lambda v: plugins.target("model", v) is not None,
              "must be one of " + ", ".join(plugins.BUILTIN_MODELS) + ", a factory's import path (mypkg.models:build) or a name "
              "registered under the entry-point group gaussreg.models"),
    "method": (str, lambda v: v in METHOD_CLASSES, "must be one of " + ", ".join(METHOD_CLASSES)),
    "seed": (int, *_nonneg),
    "split_seed": (int, *_nonneg),
    "max_epochs": (int, *_pos),
    "batch_size": (int, *_pos),
    "lr_patience": (int, *_nonneg),
    "lr_factor": (float, lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "early_stop": (int, *_pos),
    "train_subset": ((int, type(None)), *_opt_pos),
    "test_subset": ((int, type(None)), *_opt_pos),
    # a run sees only its slot's GPU, as cuda:0: cuda:1 would be "invalid device ordinal"
    "device": (str, lambda v: valid_device(v) and not re.fullmatch(r"cuda:0*[1-9]\d*", v),
               "must be auto, cpu, cuda or cuda:0 (each run sees only the GPU of its slot, as cuda:0; "
               "choose GPUs with `gaussreg run --gpus`)"),
    "data_dir": ((str, type(None)), lambda v: True, ""),
    # bf16 autocast where the device does it natively ("auto"), or fp32 / bf16 everywhere
    "precision": (str, lambda v: v in PRECISIONS, "must be auto, fp32 or bf16"),
    "compile": (bool, lambda v: True, ""),  # torch.compile the model (bench/README.md: not worth it on CPU)
}
TABLES = {"params", "optimizer", "robustness", "certify"}
# A user's factory: its arguments (grid-expanded by the manifest, key by key), the optimiser
# preset to start from, where its code is, and the hash of its source (computed here).
ARG_TABLES = ("model_args", "dataset_args")
PLUGIN_KEYS = {*ARG_TABLES, "preset", "python_path", "model_source", "dataset_source"}
# Computed by resolve() from other keys, and kept from a stored spec: it says what was trained.
DERIVED_KEYS = {"pixel_sigma"}
KEYS = set(SCALARS) | TABLES | PLUGIN_KEYS | DERIVED_KEYS | {"version"}
# Where a run happens, not what it computes: left out of the run id. `certify` only adds
# a certificate of the trained model (certify-<sigma>.json), so adding it to a manifest does
# not retrain its runs (certify finished ones with `gaussreg certify`). `python_path` says
# where the code is; what it is, is `model_source` / `dataset_source`.
NOT_IN_ID = {"device", "data_dir", "certify", "python_path"}
# Keys added after run ids existed: left out of the id at their default, so earlier runs
# keep their ids. "auto" precision, like "auto" device, is where a run happens: the
# precision it used is in its status.json and result.json.
PRECISIONS = ("auto", "fp32", "bf16")
ID_DEFAULTS = {"precision": "auto", "compile": False}


def valid_device(name: str) -> bool:
    """The devices a spec or `eval --device` may name (README: auto, cpu, cuda, cuda:N)."""
    return isinstance(name, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", name) is not None


def _check_type(key, v, types):
    types = types if isinstance(types, tuple) else (types,)
    if float in types and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, float) and not math.isfinite(v):
        raise SpecError(key, f"{key!r} must be a finite number, not {v!r}")
    if isinstance(v, bool) and bool not in types:
        raise SpecError(key, f"{key!r} must be {types[0].__name__}, not {v!r}")
    if not isinstance(v, types):
        raise SpecError(key, f"{key!r} must be {types[0].__name__}, not {v!r}")
    return v


def _resolve_optimizer(given: dict, preset: dict) -> dict:
    if not isinstance(given, dict):
        raise SpecError("optimizer", f"'optimizer' must be a table, not {given!r}")
    name = given.get("name", preset["name"])
    if name not in OPTIMIZER_KEYS:
        raise SpecError("optimizer.name", f"'optimizer.name' must be adam or sgd, not {name!r}")
    base = dict(preset) if name == preset["name"] else {"name": name}
    defaults = {"adam": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
                "sgd": {"lr": 0.1, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}}[name]
    out = {**defaults, **base, **given}
    for key, v in out.items():
        k = f"optimizer.{key}"
        if key not in OPTIMIZER_KEYS[name]:
            raise SpecError(k, f"unknown key {k!r} for {name} (known: {', '.join(sorted(OPTIMIZER_KEYS[name]))})")
        if key in ("lr", "eps", "weight_decay", "momentum"):
            v = out[key] = _check_type(k, v, float)
            if v < 0 or (key == "lr" and v == 0):
                raise SpecError(k, f"{k!r} must be {'> 0' if key == 'lr' else '>= 0'} (got {v!r})")
        elif key == "nesterov":
            _check_type(k, v, bool)
        elif key == "betas":
            if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(
                    isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v)):
                raise SpecError(k, f"{k!r} must be two numbers in [0, 1), not {v!r}")
            out[key] = [float(b) for b in v]
    return out


def _resolve_robustness(given: dict) -> dict:
    if not isinstance(given, dict):
        raise SpecError("robustness", f"'robustness' must be a table, not {given!r}")
    for key in given:
        if key not in ROBUSTNESS_KEYS:
            raise SpecError(f"robustness.{key}", f"unknown key 'robustness.{key}' (known: sigmas, samples, clip)")
    out = {"sigmas": default_sigmas(), "samples": 1, "clip": False, **given}
    s = out["sigmas"]
    if not (isinstance(s, list) and s and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                                              and math.isfinite(v) for v in s)):
        raise SpecError("robustness.sigmas",
                        f"'robustness.sigmas' must be a non-empty list of finite numbers >= 0, not {s!r}")
    out["sigmas"] = [float(v) for v in s]
    n = out["samples"]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
        raise SpecError("robustness.samples",
                        f"'robustness.samples' must be an integer from 1 to {MAX_SAMPLES}, not {n!r}")
    _check_type("robustness.clip", out["clip"], bool)
    return out


# randomized-smoothing certification after training (gaussreg.science.smoothing); present in a
# spec only when asked for, so other specs (and their ids) are unchanged


def default_certify_sigma(spec: dict) -> float:
    """The run's Gaussian training noise level (its method's `noise_param`), else 0.25."""
    cls = METHOD_CLASSES.get(spec.get("method"))
    s = spec.get("params", {}).get(cls.noise_param) if cls is not None and cls.noise_param else None
    if spec.get("pixel_sigma"):  # per channel: the isotropic noise of the same expected energy
        s = math.sqrt(sum(v * v for v in spec["pixel_sigma"]) / len(spec["pixel_sigma"]))
    return float(s) if s else CERTIFY_SIGMA


def _resolve_certify(given, spec: dict) -> dict:
    if not isinstance(given, dict):
        raise SpecError("certify", f"'certify' must be a table like {{ sigma = 0.25, n = 10000, images = 500 }}, "
                        f"not {given!r}")
    known = {"sigma", *CERTIFY_DEFAULTS}
    for key in given:
        if key not in known:
            raise SpecError(f"certify.{key}", f"unknown key 'certify.{key}' (known: {', '.join(sorted(known))})")
    out = {"sigma": default_certify_sigma(spec), **CERTIFY_DEFAULTS, **given}
    for key in ("sigma", "alpha"):
        v = out[key] = _check_type(f"certify.{key}", out[key], float)
        if not (v > 0 if key == "sigma" else 0 < v < 1):
            raise SpecError(f"certify.{key}", f"'certify.{key}' must be {'> 0' if key == 'sigma' else 'in (0, 1)'}"
                            f" (got {v!r})")
    for key in ("n", "n0", "images"):
        v = _check_type(f"certify.{key}", out[key], int)
        if v < 1:
            raise SpecError(f"certify.{key}", f"'certify.{key}' must be >= 1 (got {v!r})")
    if out["n0"] > out["n"]:
        raise SpecError("certify.n0", f"'certify.n0' ({out['n0']}) must not exceed 'certify.n' ({out['n']})")
    return out


def resolve(partial: dict) -> dict:
    """The complete spec: presets of the model, then the given keys on top. Raises
    SpecError naming the first bad key."""
    if not isinstance(partial, dict):
        raise SpecError("", "a spec must be a JSON object")
    for key in partial:
        if key not in KEYS:
            raise SpecError(key, f"unknown key {key!r} (known: {', '.join(sorted(KEYS))})")
    for key in ("dataset", "model", "method"):
        if key not in partial:
            raise SpecError(key, f"the spec has no {key!r}")
    model = partial["model"]
    _check_type("model", model, str)
    if plugins.target("model", model) is None:
        raise SpecError("model", f"unknown model {model!r}; {SCALARS['model'][2]}")
    preset_name = partial.get("preset")
    if preset_name is not None and preset_name not in PRESET_NAMES:
        raise SpecError("preset", f"'preset' must be {' or '.join(map(repr, PRESET_NAMES))} (the paper's optimiser "
                        f"settings to start from), not {preset_name!r}")
    base = preset_name or (model if model in PRESETS else None)
    if base is None:
        absent = [k for k in PRESET_KEYS if k not in partial]
        opt = partial.get("optimizer", {})
        name = opt.get("name") if isinstance(opt, dict) else None
        if name in OPTIMIZER_KEYS:
            absent += [f"optimizer.{k}" for k in sorted(OPTIMIZER_KEYS[name]) if k not in opt]
        else:
            absent.append("a complete optimizer (name = \"adam\" or \"sgd\" and every key of it)")
        if absent:
            raise SpecError("preset", f"model {model!r} has no optimiser preset: give preset = \"lenet\" or "
                            f"\"alexnet\" to start from the paper's settings, or set {', '.join(absent)}")
        preset = {"optimizer": dict(opt)}
    else:
        preset = copy.deepcopy(PRESETS[base])
    spec = {"version": SPEC_VERSION, "experiment": "", "seed": 0, "split_seed": 0, "max_epochs": 100,
            "train_subset": None, "test_subset": None, "device": "auto", "data_dir": None,
            **ID_DEFAULTS,
            **{k: v for k, v in preset.items() if k != "optimizer"}}
    for key, v in partial.items():
        if key not in TABLES and key not in PLUGIN_KEYS and key not in DERIVED_KEYS and key != "version":
            spec[key] = v
    for key, (types, ok, why) in SCALARS.items():
        spec[key] = v = _check_type(key, spec[key], types)
        if not ok(v):
            if key in ("dataset", "model", "method"):
                raise SpecError(key, f"unknown {key} {v!r}; {why}")
            raise SpecError(key, f"{key!r} {why} (got {v!r})")
    if partial.get("version", SPEC_VERSION) != SPEC_VERSION:
        raise SpecError("version", f"spec version {partial['version']!r} is not supported (this is {SPEC_VERSION})")
    _resolve_plugins(partial, spec)
    if datasets.is_builtin(spec["dataset"]) and model == "alexnet":
        ds = datasets.info(spec["dataset"])
        if ds.shape[1:] != (32, 32):
            raise SpecError("model", f"alexnet needs 32x32 images and {spec['dataset']} has "
                            f"{ds.shape[1]}x{ds.shape[2]}")
    params = partial.get("params", {})
    if not isinstance(params, dict):
        raise SpecError("params", f"'params' must be a table, not {params!r}")
    spec["params"] = METHOD_CLASSES[spec["method"]].spec_params(params)
    _resolve_pixel_sigma(partial.get("pixel_sigma"), spec)
    spec["optimizer"] = _resolve_optimizer(partial.get("optimizer", {}), preset["optimizer"])
    spec["robustness"] = _resolve_robustness(partial.get("robustness", {}))
    if "certify" in partial:
        spec["certify"] = _resolve_certify(partial["certify"], spec)
    return spec


def _resolve_pixel_sigma(given, spec: dict) -> None:
    """spec["pixel_sigma"]: the per-channel training noise in [0,1] pixel units that
    params.sigma stands for with params.sigma_units = "reference" (gaussreg.science.units), from the
    built-in dataset's mean and std, or as a stored spec gives it. Absent in pixel units, so
    those specs and ids are unchanged, and on a user's dataset, whose mean and std are known
    only once it is loaded (the worker computes it then and writes it to result.json)."""
    cls = METHOD_CLASSES[spec["method"]]
    if spec["params"].get("sigma_units", "pixel") != "reference":
        if given is not None:
            raise SpecError("pixel_sigma", "'pixel_sigma' is derived from params.sigma with params.sigma_units = "
                            "\"reference\"; leave it out (this run's sigma is in pixel units)")
        return
    ds = datasets.info(spec["dataset"]) if datasets.is_builtin(spec["dataset"]) else None
    if given is None:
        if ds is not None:
            spec["pixel_sigma"] = cls.reference_sigma(spec["params"], ds.name, ds.mean, ds.std)
        return
    if not (isinstance(given, list) and given and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      and math.isfinite(v) and v >= 0 for v in given)
            and (ds is None or len(given) == ds.shape[0])):
        raise SpecError("pixel_sigma", f"'pixel_sigma' must be one finite number >= 0 per channel of the images, "
                        f"not {given!r:.80}")
    spec["pixel_sigma"] = [float(v) for v in given]


def _plain(key: str, v):
    """A JSON value (TOML dates are not): args go into spec.json and the run id."""
    if isinstance(v, dict):
        for k, x in v.items():
            _plain(f"{key}.{k}", x)
    elif isinstance(v, list):
        for x in v:
            _plain(key, x)
    elif isinstance(v, float) and not math.isfinite(v):
        raise SpecError(key, f"{key!r} must be a finite number, not {v!r}")
    elif not isinstance(v, (str, int, float, bool)):
        raise SpecError(key, f"{key!r} must be a string, number, boolean, list or table, not {type(v).__name__}")


def _resolve_plugins(partial: dict, spec: dict) -> None:
    """model_args, dataset_args, preset, python_path, and the source hashes of the
    factories (kept when the partial spec has them: a stored spec says what was run)."""
    path = partial.get("python_path", [])
    if not (isinstance(path, list) and all(isinstance(p, str) and p for p in path)):
        raise SpecError("python_path", f"'python_path' must be a list of folders, not {path!r}")
    if path:
        spec["python_path"] = list(path)
    for key in ARG_TABLES:
        args = partial.get(key, {})
        if not isinstance(args, dict):
            raise SpecError(key, f"{key!r} must be a table of keyword arguments, like {{ width = 32 }}, not {args!r}")
        _plain(key, args)
        if args:
            spec[key] = args
    if "preset" in partial:
        spec["preset"] = partial["preset"]
    ds = spec["dataset"]
    where = datasets.source_path(ds)
    if where is not None:
        if not where.is_absolute():
            raise SpecError("dataset", f"the path of dataset {ds!r} must be absolute here (a manifest makes it "
                            "relative to itself)")
        if not (where.is_file() if ds.startswith("npz:") else where.is_dir()):
            raise SpecError("dataset", f"{'file' if ds.startswith('npz:') else 'folder'} {where} of dataset "
                            f"{ds!r} does not exist")
    for kind, name, key in (("model", spec["model"], "model_source"), ("dataset", ds, "dataset_source")):
        if kind == "dataset" and (datasets.is_builtin(ds) or where is not None):
            continue
        if key in partial:
            spec[key] = _check_type(key, partial[key], str)
            continue
        if kind == "model" and name in plugins.BUILTIN_MODELS:
            continue
        h = plugins.source_hash(kind, name, path)
        if h is None:
            module = plugins.target(kind, name).split(":")[0]
            raise SpecError(kind, f"cannot find the source of module {module!r} of {kind} {name!r} (looked in "
                            f"python_path and sys.path); add the folder holding it to python_path")
        spec[key] = h


def canonical(spec: dict) -> str:
    return json.dumps({k: v for k, v in spec.items() if k not in NOT_IN_ID and not (
        k in ID_DEFAULTS and v == ID_DEFAULTS[k])}, sort_keys=True, separators=(",", ":"))


def run_id(spec: dict) -> str:
    """Stable across processes and machines: same resolved spec, same id."""
    digest = hashlib.sha1(canonical(spec).encode()).hexdigest()[:10]
    return f"{spec.get('experiment') or 'run'}-{spec['method']}-{digest}"


def describe_params(spec: dict, with_seed: bool = True) -> str:
    """`sigma=0.25 alpha=1` for tables and live views; parameters left at their
    default are not shown (nor the seed where a view has a column for it)."""
    schema = METHOD_CLASSES[spec["method"]].schema if spec.get("method") in METHOD_CLASSES else {}
    # by name: a spec read back from spec.json (sorted keys) reads the same as one just resolved
    items = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(spec.get("params", {}).items())
             if k not in schema or schema[k].default is REQUIRED or schema[k].default != v]
    if with_seed and spec.get("seed"):
        items.append(f"seed={spec['seed']}")
    return " ".join(items)


def changed_source(spec: dict) -> Optional[str]:
    """Why a run's model or loader code is not the code it was planned with, or None:
    its id stands for that code, so other code must make another run."""
    for kind, key in (("model", "model_source"), ("dataset", "dataset_source")):
        if key in spec:
            now = plugins.source_hash(kind, spec[kind], spec.get("python_path", ()))
            if now != spec[key]:
                return (f"the source of {kind} {spec[kind]!r} changed since this run was planned (hash {spec[key]}, "
                        f"now {now}); run the manifest again to plan a run for the new code")
    return None


def changed_noise_bank(raw: dict, rid: str) -> Optional[str]:
    """Why a run planned with fixed-noise augmentation before the noise bank had versions
    must not train here, or None: its id stands for bank version 1, which could hold +-inf
    (issue 29), and this code computes version 2 only. A spec.json written by hand, with
    no id made from it, trains with version 2."""
    params = raw.get("params")
    if (raw.get("method") != "augment" or not isinstance(params, dict) or params.get("fresh_noise") is not False
            or "noise" in params or "bank" in params or run_id(raw) != rid):
        return None
    return (f"run {rid} was planned with fixed noise from noise bank version 1, which could hold infinite "
            f"values (issue 29), and this gaussreg computes version {BANK_VERSION} only; run its manifest again "
            "to plan it anew (the new run gets a new id)")
