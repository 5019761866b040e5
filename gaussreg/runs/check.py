"""`gaussreg run --dry-run`'s check of a manifest's own code, run as a subprocess
(`python -m gaussreg.runs.check`) so the manifest reader stays torch-free and a user's
import cannot disturb the CLI: reads a JSON list of model/dataset combinations on
stdin, writes a JSON list of problems `{"index", "key", "message"}` on stdout.

Per combination: load the dataset (a user's; a built-in one is only described), build
the model with its factory, split it (models.as_gaussnet; refused only where a run's
method needs the split), run 2 training images
through it, check the output shape, run one regularizer loss at each depth the
manifest asks for, and check those depths can be propagated (gaussreg.science.adf)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

import torch

from gaussreg.core import plugins
from gaussreg.data import loading as data
from gaussreg.runs.environment import orphaned, watch_parent
from gaussreg.science import adf, models
from gaussreg.science.regularizer import moment_loss


def _last_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[-1] if text else type(e).__name__


def check(item: dict) -> list:
    ds_name, path = item["dataset"], item.get("python_path", [])
    try:
        if data.is_builtin(ds_name):
            info = data.info(ds_name)
            x = torch.rand(2, *info.shape, generator=torch.Generator().manual_seed(0))
            y = torch.zeros(2, dtype=torch.int64)
        else:
            tx, ty, _, _, info = data.load_custom(ds_name, item.get("dataset_args") or {}, path)
            x = tx[:2].float() / 255 if tx.dtype == torch.uint8 else tx[:2].float()
            y = ty[:2]
    except data.DataError as e:
        return [("dataset", str(e))]
    except Exception as e:  # noqa: BLE001 - a loader's or a file's fault, never the model's
        return [("dataset", f"loading dataset {ds_name!r} failed: {_last_line(e)}")]
    model = item["model"]
    torch.manual_seed(0)
    try:
        net = models.build_model(model, info, item.get("model_args"), path, split=item.get("split", True))
    except (plugins.PluginError, models.SplitError) as e:
        return [("model", str(e))]
    except Exception as e:  # noqa: BLE001 - whatever the user's code raised
        return [("model", f"building model {model!r} failed: {_last_line(e)}")]
    if len(x) < 2:
        return []
    try:
        net.eval()
        with torch.no_grad():
            out = net(x)
    except Exception as e:  # noqa: BLE001
        return [("model", f"model {model!r} fails on 2 images of {ds_name} (shape {tuple(x.shape)}): {_last_line(e)}")]
    if tuple(out.shape) != (2, info.classes):
        return [("model", f"model {model!r} gives outputs of shape {tuple(out.shape)} for 2 images; {ds_name} has "
                          f"{info.classes} classes, so it must give (2, {info.classes})")]
    problems = []
    net.train()
    for depth in item.get("depths", []):
        try:
            adf.split(net.rest, depth)
            moment_loss(net, x, y, 0.1, 1.0, depth).total.backward()
        except Exception as e:  # noqa: BLE001
            problems.append(("methods.regularizer.depth" if depth != 1 else "model",
                             f"the regularizer at depth {depth!r} fails on model {model!r}: {_last_line(e)}"))
    return problems


def main() -> int:
    # a user's factory may hang: this check must never outlive the CLI that waits for it
    if orphaned(watch_parent(signal.SIGKILL)):
        return 1
    items = json.load(sys.stdin)
    out = []
    # The answer must reach the CLI whatever the user's code writes: not only print() but a
    # C library or os.system writing to file descriptor 1. So the answer gets its own copy
    # of fd 1 (not inherited by the user's children), and fd 1 is stderr while user code runs.
    sys.stdout.flush()
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    with contextlib.redirect_stdout(sys.stderr):
        _check_all(items, out)
    json.dump(out, answer)
    answer.close()
    return 0


def _check_all(items, out):
    for i, item in enumerate(items):
        try:
            found = check(item)
        except Exception as e:  # noqa: BLE001 - report, never crash the dry run
            found = [("model", f"checking model {item.get('model')!r} on {item.get('dataset')!r} failed: "
                               f"{_last_line(e)}")]
        out += [{"index": i, "key": k, "message": m} for k, m in found]


if __name__ == "__main__":
    sys.exit(main())
