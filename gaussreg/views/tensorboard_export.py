"""`gaussreg export --format tensorboard`: the store as TensorBoard event files, one
directory per run, for TensorBoard (and what imports its files: W&B, Aim).

Each run's directory holds, as scalars (float32, TensorBoard's scalar type):
- per epoch (step = epoch): `train/loss`, `train/accuracy`, `train/<term>` for each term of
  the training loss, `val/loss`, `val/ce`, `val/accuracy`, `lr`, `epoch_time`, `images_per_s`;
- the final numbers (step = the last epoch): `final/test_accuracy`, `final/test_robustness` (R),
  `final/test_noisy_accuracy` and their `final/val_*` counterparts, `final/train_time_s`;
- the per-sigma curves (step = round(SIGMA_SCALE x sigma), as a step is an integer):
  `per_sigma/{test,val}_{consistency,accuracy}`;
and, for the HParams plugin, the run's parameters and how it ended (a session: a row of the
HPARAMS table, a line of its parallel coordinates; `config`, a short hash of the spec minus
the seed, is equal for the seeds of one configuration). The folder itself
holds the experiment: which parameters and which `final/*` metrics the table compares.

Exporting again into the same folder replaces what an earlier export wrote there for the
same runs (and the experiment), so no step is shown twice.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from google.protobuf import struct_pb2
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from gaussreg.runs.store import Store
from gaussreg.views.export import RUN_KEYS, epoch_rows, run_rows, sigma_rows

SIGMA_SCALE = 1000  # per-sigma steps are milli-sigmas: 0.25 -> step 250
FINAL = ("test_accuracy", "test_robustness", "test_noisy_accuracy", "val_accuracy", "val_robustness",
         "val_noisy_accuracy", "train_time_s")
EPOCH_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_ce", "val_accuracy", "lr", "epoch_time",
              "images_per_s")
HPARAM_KEYS = ("experiment", "method", "seed", "config", "lr") + RUN_KEYS  # and every param_*
END_STATUS = {"completed": api_pb2.STATUS_SUCCESS, "failed": api_pb2.STATUS_FAILURE,
              "cancelled": api_pb2.STATUS_FAILURE, "running": api_pb2.STATUS_RUNNING}
EVENTS_PREFIX = "events.out.tfevents."


class SigmaStepError(ValueError):
    """Two sigmas of a run's grid would share one per-sigma step."""


def epoch_tag(key: str) -> str:
    """train_loss -> train/loss, val_ce -> val/ce, lr -> lr: TensorBoard groups tags by
    what comes before the slash."""
    for split in ("train_", "val_"):
        if key.startswith(split):
            return f"{split[:-1]}/{key[len(split):]}"
    return key


def _number(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _scalar(tag: str, value: float) -> summary_pb2.Summary.Value:
    # simple_value (float32) as torch and Keras write it: TensorBoard's fast loader shows no
    # float64 tensor as a scalar, and every importer reads this layout
    return summary_pb2.Summary.Value(tag=tag, simple_value=value)


def _hparams_value(tag: str, data: plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary.Value:
    return summary_pb2.Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data),
                                     tensor=metadata.NULL_TENSOR)


def _proto_value(v) -> Optional[struct_pb2.Value]:
    """A parameter as the HParams plugin holds it (number, text or bool); None for none."""
    if v is None:
        return None
    if isinstance(v, bool):
        return struct_pb2.Value(bool_value=v)
    if isinstance(v, (int, float)):
        return struct_pb2.Value(number_value=float(v))
    return struct_pb2.Value(string_value=str(v))


def hparams_of(row: dict) -> Dict[str, object]:
    """The parameters of a run (a row of export.run_rows) that the HPARAMS table compares:
    numbers, text and booleans; anything else as its JSON text."""
    out = {k: row.get(k) for k in HPARAM_KEYS}
    out.update({k: v for k, v in row.items() if k.startswith("param_")})
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v, sort_keys=True)
            for k, v in out.items() if v is not None}


def _group(values: List[dict], key: str) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for v in values:
        out.setdefault(v[key], []).append(v)
    return out


def _experiment(rows: List[dict], hparams: Dict[str, Dict[str, object]]) -> plugin_data_pb2.HParamsPluginData:
    infos = []
    for name in sorted({k for h in hparams.values() for k in h}):
        values = [h[name] for h in hparams.values() if name in h]
        info = api_pb2.HParamInfo(name=name)
        if all(isinstance(v, bool) for v in values):
            info.type = api_pb2.DATA_TYPE_BOOL
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            info.type = api_pb2.DATA_TYPE_FLOAT64
        else:  # text, or a mix: shown as text
            info.type = api_pb2.DATA_TYPE_STRING
            values = [str(v) for v in values]
        if info.type != api_pb2.DATA_TYPE_FLOAT64:  # a discrete domain: the table filters by checkbox
            info.domain_discrete.extend(sorted(set(values)))
        info.differs = len(set(values)) > 1 or len(values) < len(rows)
        infos.append(info)
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=f"final/{k}")) for k in FINAL]
    return plugin_data_pb2.HParamsPluginData(
        experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics))


def _run_events(r: dict, hparams: Dict[str, object], epochs: List[dict], sigmas: List[dict],
                now: float) -> List[Tuple[int, List[summary_pb2.Summary.Value]]]:
    """The (step, values) of one run's event file, in order; SigmaStepError when two of its
    sigmas would share a step."""
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=now)  # no group: a row per run
    for k, v in hparams.items():
        start.hparams[k].CopyFrom(_proto_value(v))
    out = [(0, [_hparams_value(metadata.SESSION_START_INFO_TAG,
                               plugin_data_pb2.HParamsPluginData(session_start_info=start))])]
    last = 0
    for e in epochs:
        step = e.get("epoch")
        if not isinstance(step, int):
            continue
        last = max(last, step)
        keys = EPOCH_KEYS + tuple(k for k in e if k.startswith("train_") and k not in EPOCH_KEYS)
        out.append((step, [_scalar(epoch_tag(k), _number(e.get(k))) for k in keys if _number(e.get(k)) is not None]))
    out.append((r["epochs_run"] if isinstance(r.get("epochs_run"), int) else last,
                [_scalar(f"final/{k}", _number(r.get(k))) for k in FINAL if _number(r.get(k)) is not None]))
    steps: Dict[int, float] = {}
    for s in sigmas:
        sigma = _number(s.get("sigma"))
        if sigma is None:
            continue
        step = round(SIGMA_SCALE * sigma)
        if steps.setdefault(step, sigma) != sigma:  # one step would hold two points of each curve
            raise SigmaStepError(f"run {r['run_id']}: sigmas {steps[step]:g} and {sigma:g} are closer than "
                                 f"1/{SIGMA_SCALE}, the resolution of the per-sigma steps")
        out.append((step, [_scalar(f"per_sigma/{s['split']}_{k}", _number(s.get(k)))
                           for k in ("consistency", "accuracy") if _number(s.get(k)) is not None]))
    if r["state"] in END_STATUS:
        end = plugin_data_pb2.SessionEndInfo(status=END_STATUS[r["state"]], end_time_secs=now)
        out.append((last, [_hparams_value(metadata.SESSION_END_INFO_TAG,
                                          plugin_data_pb2.HParamsPluginData(session_end_info=end))]))
    return [(step, values) for step, values in out if values]


def _write(logdir: Path, events, wall_time: float) -> None:
    """One event file in `logdir`, written with TensorBoard's own writer, in place of the
    ones an earlier export left there (their steps would be shown twice)."""
    logdir.mkdir(parents=True, exist_ok=True)
    for old in logdir.iterdir():
        if old.name.startswith(EVENTS_PREFIX) and old.is_file():
            old.unlink()
    writer = EventFileWriter(str(logdir))
    try:
        for step, values in events:
            writer.add_event(event_pb2.Event(wall_time=wall_time, step=step, summary=summary_pb2.Summary(value=values)))
    finally:
        writer.close()


def write_tensorboard(store: Store, out: Path, experiment=None) -> List[Path]:
    """The event-file directories of the store's runs (of `experiment`) under `out`, one per
    run id; their paths. `out` also gets the experiment file the HParams plugin starts from.
    Nothing is written when a run cannot be (SigmaStepError)."""
    out = Path(out)
    rows = list(run_rows(store, experiment))
    epochs = _group(list(epoch_rows(store, experiment)), "run_id")
    sigmas = _group(list(sigma_rows(store, experiment)), "run_id")
    now = time.time()
    hparams = {r["run_id"]: hparams_of(r) for r in rows}
    files = {out / r["run_id"]: _run_events(r, hparams[r["run_id"]], epochs.get(r["run_id"], []),
                                            sigmas.get(r["run_id"], []), now) for r in rows}
    for logdir, events in files.items():
        _write(logdir, events, now)
    if rows:
        _write(out, [(0, [_hparams_value(metadata.EXPERIMENT_TAG, _experiment(rows, hparams))])], now)
    return list(files)
