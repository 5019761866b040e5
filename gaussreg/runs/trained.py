"""A trained run's model, loaded for use: from a run directory's best.pt or from a checkpoint
file (which carries its run's spec), with the test split it was evaluated on. For `gaussreg
eval` and `certify`, and for a notebook:

    from gaussreg.runs.trained import load_trained
    t = load_trained("runs/demo-regularizer-3fa2c1d9e0")   # or a run id with store=, or a .pt file
    t.model(t.splits.test_x[:8]).argmax(1)

Every failure is a TrainedRunError of one sentence (the CLI prints it and exits 2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from gaussreg.core.plugins import PluginError
from gaussreg.data import loading as data
from gaussreg.runs.device import pick_device, prefer_channels_last, resolve_precision
from gaussreg.runs.spec import SpecError, changed_source, resolve
from gaussreg.runs.store import RunDir, RunFileError, Store
from gaussreg.science.models import SplitError, build_model


class TrainedRunError(Exception):
    """A trained model cannot be loaded; the message says what and where, in one sentence."""


@dataclass
class Trained:
    model: torch.nn.Module  # in eval mode, on `device`
    splits: object  # data.Splits: the run's test split (test_only) on the same device
    precision: str  # what the run's precision setting is on this device ("fp32" or "bf16")
    spec: dict  # the run's resolved spec
    checkpoint: Path


def spec_in_checkpoint(path: Path) -> dict:
    """The resolved spec a checkpoint carries (gaussreg writes it into best.pt and last.pt)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any file that is not a checkpoint
        ck = None
    if not isinstance(ck, dict) or not isinstance(ck.get("spec"), dict):
        raise TrainedRunError(f"{path} is not a run id or a checkpoint inside a run directory (no spec.json next "
                              "to it, and no spec inside it)")
    return ck["spec"]


def from_checkpoint(ckpt: Path, spec: dict, device: str = "auto", data_dir: Optional[Path] = None) -> Trained:
    """The run's model with the checkpoint's weights on the picked device, the run's test split
    there, and the precision the run's spec computes in on that device (R is evaluated as
    training did)."""
    why = changed_source(spec)  # other code with these weights would not be this run's model
    if why:
        raise TrainedRunError(why)
    try:
        dev = pick_device(device)
    except SpecError as e:
        raise TrainedRunError(str(e)) from None
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    except Exception as e:  # noqa: BLE001
        # torch's own message is many lines, and advises loading with weights_only=False: not for a data file
        raise TrainedRunError(f"{ckpt} is not a gaussreg checkpoint (torch.load cannot read it as one: "
                              f"{type(e).__name__})") from None
    try:
        splits = data.load(spec["dataset"], data_dir or spec["data_dir"], split_seed=spec["split_seed"],
                           test_subset=spec["test_subset"], device=dev, test_only=True,
                           args=spec.get("dataset_args"), python_path=spec.get("python_path", ()))
    except data.DataError as e:
        raise TrainedRunError(str(e)) from None
    try:
        # split=False: a model that trained unsplit (no first activation) loads as it trained
        model = build_model(spec["model"], splits.info, spec.get("model_args"), spec.get("python_path", ()),
                            split=False).to(dev)
    except (PluginError, SplitError) as e:
        raise TrainedRunError(str(e)) from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        # torch's first line is only "Error(s) in loading state_dict for X:"; the next says what
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
        raise TrainedRunError(f"{ckpt} does not fit the run's model {spec['model']} on {spec['dataset']} "
                              f"({' '.join(lines[:2])[:300]})") from None
    precision = resolve_precision(spec["precision"], dev)
    model = prefer_channels_last(model, precision)[0].eval()
    return Trained(model, splits, precision, spec, Path(ckpt))


def load_trained(target: Union[str, Path], store: Union[str, Path] = "runs", device: str = "cpu",
                 data_dir: Optional[Path] = None) -> Trained:
    """A trained run, by its checkpoint file, its run directory, or its run id (or a unique
    prefix) in `store`; the best validation epoch's model (best.pt) unless a file is named."""
    p = Path(target)
    if p.is_file():
        run, ckpt = RunDir(p.parent), p
    else:
        try:
            run = RunDir(p) if p.is_dir() else Store(store).get(str(target))
        except RunFileError as e:
            raise TrainedRunError(str(e)) from None
        ckpt = run.best_checkpoint
        if not ckpt.is_file():
            raise TrainedRunError(f"{ckpt} does not exist: run {run.id} has not finished an epoch")
    try:
        raw = run.spec() if run.spec_file.exists() else spec_in_checkpoint(ckpt)
        spec = resolve(raw)
    except (SpecError, RunFileError) as e:
        raise TrainedRunError(f"bad spec of {run.path}: {e}") from None
    return from_checkpoint(ckpt, spec, device, data_dir)
