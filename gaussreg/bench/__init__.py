"""Benchmarks: `python -m gaussreg.bench [--device cpu|cuda] [--model lenet] [--out FILE]`.

1. training step time of every method in fp32 and bf16, as ratios to the fp32 and to the
   same-precision `baseline` in the same process, and what torch.compile gains;
2. one LeNet epoch on the device-resident path against a torch DataLoader, and in bf16;
3. robustness evaluation throughput (images x sigmas per second) in fp32 and bf16;
4. randomized-smoothing certification throughput (forward passes per second);
5. on a GPU, total images/s of the box with --per-gpu 1, 2, 4, 8 through the real scheduler.
The package is the one home of gaussreg's benchmarks: also `python -m gaussreg.bench.depth`
(analytic moments against Monte Carlo, by depth) and `python -m gaussreg.bench.tui_scale`
(the TUI on a store of thousands of runs); results and their tables are in bench/.
Warm-up first, then the median of repeats; the device is synchronised before every clock read."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gaussreg import __version__
from gaussreg.data import loading as data
from gaussreg.launch.gpus import detect_gpus
from gaussreg.launch.scheduler import Scheduler, make_slots
from gaussreg.runs.device import autocast, bf16_native, cpu_bf16_units, keep_freed_memory, prefer_channels_last
from gaussreg.runs.spec import resolve, run_id
from gaussreg.runs.store import Store
from gaussreg.science.methods import make_method
from gaussreg.science.models import build_model
from gaussreg.science.robustness import robustness
from gaussreg.science.smoothing import certify_dataset

METHODS = [("baseline", {}), ("regularizer", {"sigma": 0.5, "alpha": 1.0}),
           ("regularizer", {"sigma": 0.5, "alpha": 1.0, "depth": 2}),
           ("regularizer", {"sigma": 0.5, "alpha": 1.0, "depth": 3}),
           ("regularizer", {"sigma": 0.5, "alpha": 1.0, "depth": "all"}),
           ("augment", {"sigma": 0.5, "folds": 2}), ("augment", {"sigma": 0.5, "folds": 6}),
           ("augment", {"sigma": 0.5, "folds": 11}), ("augment", {"sigma": 0.5, "folds": 21}),
           ("randsign", {"eps": 0.1}), ("fgsm", {"eps": 0.1}),
           ("consistency", {"sigma": 0.5}), ("stability", {"sigma": 0.5})]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, warmup: int, repeats: int) -> float:
    """Median seconds of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_step(dev, model_name, info, X, Y, g, batch, name, params, precision, compiled=False):
    """(method, step): one optimizer step of a fresh model as the worker takes it (the
    forward pass under the precision's autocast, channels_last for conv models in bf16)."""
    torch.manual_seed(0)
    model, _ = prefer_channels_last(build_model(model_name, info).to(dev), precision)
    if compiled:
        for part in (model.first, model.rest):
            part.compile()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    method = make_method(name, params)
    method.prepare(len(X), tuple(X.shape[1:]), g)
    n_items = len(X) * method.copies

    def step():
        idx = torch.randint(0, n_items, (batch,), generator=g, device=dev)
        with autocast(dev, precision):
            x, y = method.batch(X, Y, idx, g)
            loss = method.loss(model, x, y, g)
        opt.zero_grad(set_to_none=True)
        loss.total.backward()
        opt.step()
    return method, step


def _random_batches(dev, dataset, batch):
    info = data.info(dataset)
    g = torch.Generator(device=dev).manual_seed(0)
    X = torch.rand((batch * 4, *info.shape), generator=g, device=dev)
    Y = torch.randint(0, info.classes, (batch * 4,), generator=g, device=dev)
    return info, X, Y, g


def bench_steps(dev, model_name, dataset, batch, warmup, repeats, methods=METHODS,
                precisions=("fp32", "bf16")) -> list:
    """Seconds per optimizer step of each method in each precision on one batch of `batch`
    items. All are timed round-robin, so drift of the machine hits them all alike."""
    info, X, Y, g = _random_batches(dev, dataset, batch)
    configs = [(name, params, p) for p in precisions for name, params in methods]  # fp32 baseline first
    steps = [make_step(dev, model_name, info, X, Y, g, batch, *c) for c in configs]
    times = [[] for _ in steps]
    for _ in range(warmup):
        for _, step in steps:
            step()
    for _ in range(repeats):
        for i, (_, step) in enumerate(steps):
            times[i].append(timed(step, dev, 0, 1))
    rows = []
    for (name, params, precision), (method, _), ts in zip(configs, steps, times):
        t = statistics.median(ts)
        rows.append({"method": name, "params": params, "precision": precision, "step_s": t,
                     "images_per_s": batch / t, "copies": method.copies})
    base = rows[0]["step_s"]
    same = {r["precision"]: r["step_s"] for r in rows if r["method"] == "baseline"}
    for r in rows:
        r["step_ratio"] = r["step_s"] / base  # to the fp32 baseline
        r["ratio_to_own_baseline"] = r["step_s"] / same[r["precision"]]
        # an epoch of augment holds (folds + 1) items per clean image
        r["epoch_ratio"] = r["step_s"] * r["copies"] / base
    return rows


def bench_compile(dev, model_name, dataset, batch, repeats, precision="bf16") -> list:
    """torch.compile of the model (the `compile` key): seconds its first steps take (the
    compilation, with whatever inductor cache this machine has), step time against eager,
    and the steps it needs to repay itself, for the baseline and the regularizer."""
    info, X, Y, g = _random_batches(dev, dataset, batch)
    rows = []
    for name, params in METHODS[:2]:
        eager = make_step(dev, model_name, info, X, Y, g, batch, name, params, precision)[1]
        comp = make_step(dev, model_name, info, X, Y, g, batch, name, params, precision, compiled=True)[1]
        sync(dev)
        t0 = time.perf_counter()
        comp()
        comp()
        sync(dev)
        first = time.perf_counter() - t0
        eager()
        te, tc = [], []
        for _ in range(repeats):
            te.append(timed(eager, dev, 0, 1))
            tc.append(timed(comp, dev, 0, 1))
        e, c = statistics.median(te), statistics.median(tc)
        gain = e - c
        rows.append({"method": name, "params": params, "precision": precision, "eager_step_s": e,
                     "compiled_step_s": c, "first_two_steps_s": first,
                     "steps_to_repay": (first - 2 * c) / gain if gain > 0 else None})
    return rows


def bench_epoch(dev, dataset, batch, repeats) -> dict:
    """One LeNet baseline epoch: device-resident index slices vs a DataLoader."""
    try:
        s = data.load(dataset, device="cpu")
        X, Y, source = s.train_x, s.train_y, dataset
    except data.DataError:
        info = data.info(dataset)
        X = torch.rand(54_000, *info.shape)
        Y = torch.randint(0, info.classes, (54_000,))
        source = f"random tensors shaped like {dataset} (dataset not installed)"
    def trainer(precision):
        torch.manual_seed(0)
        model, _ = prefer_channels_last(build_model("lenet", dataset).to(dev), precision)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def train_step(x, y):
            with autocast(dev, precision):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return train_step

    Xd, Yd = X.to(dev), Y.to(dev)
    g = torch.Generator(device=dev).manual_seed(0)

    def resident(step):
        perm = torch.randperm(len(Xd), generator=g, device=dev)
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            step(Xd[idx], Yd[idx])

    train_step, bf16_step = trainer("fp32"), trainer("bf16")
    out = {"images": len(X), "source": source, "resident_s": timed(lambda: resident(train_step), dev, 1, repeats),
           "resident_bf16_s": timed(lambda: resident(bf16_step), dev, 1, repeats)}
    ds = torch.utils.data.TensorDataset(X, Y)
    choices = [{"num_workers": 0, "pin_memory": dev.type == "cuda"},
               {"num_workers": 2, "pin_memory": dev.type == "cuda", "persistent_workers": True}]
    loaders = []
    for kw in choices:
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, **kw)

        def conventional():
            for x, y in loader:
                train_step(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True))

        loaders.append({**kw, "epoch_s": timed(conventional, dev, 1, repeats)})
    best = min(loaders, key=lambda r: r["epoch_s"])
    out.update(dataloader=loaders, dataloader_best_s=best["epoch_s"], speedup=best["epoch_s"] / out["resident_s"])
    return out


def bench_robustness(dev, dataset, images: int, repeats: int) -> list:
    """R's evaluation (30 sigmas) of a LeNet in each precision, as the worker runs it."""
    info = data.info(dataset)
    x = torch.rand((images, *info.shape), device=dev)
    y = torch.randint(0, info.classes, (images,), device=dev)
    batch = 16384 if dev.type == "cuda" else 4096
    rows = []
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model, _ = prefer_channels_last(build_model("lenet", info).to(dev), precision)

        def evaluate():
            with autocast(dev, precision):
                robustness(model, x, y, batch_size=batch)
        t = timed(evaluate, dev, 1, repeats)
        rows.append({"precision": precision, "images": images, "sigmas": 30, "seconds": t,
                     "image_sigmas_per_s": images * 30 / t, "seconds_for_10k_x_30": 10_000 * 30 / (images * 30 / t)})
    return rows


def bench_certify(dev, model_name, dataset, images: int, n: int, batch: int) -> dict:
    """Randomized-smoothing certification (gaussreg.science.smoothing.certify, n0 = 100) of an
    untrained model: forward passes per second, and what 500 images x 10,000 draws cost.
    The cost does not depend on the weights: every draw is one forward pass."""
    info = data.info(dataset)
    torch.manual_seed(0)
    model = build_model(model_name, info).to(dev)
    x = torch.rand((images, *info.shape), device=dev)
    y = torch.randint(0, info.classes, (images,), device=dev)
    certify_dataset(model, x[:1], y[:1], 0.25, 100, min(n, 2 * batch), 0.001, batch)  # warm-up
    sync(dev)
    t0 = time.perf_counter()
    certify_dataset(model, x, y, 0.25, 100, n, 0.001, batch)
    sync(dev)
    t = time.perf_counter() - t0
    fps = images * (n + 100) / t
    return {"model": model_name, "images": images, "n": n, "n0": 100, "batch": batch, "seconds": t,
            "forward_passes_per_s": fps, "seconds_per_image": t / images,
            "seconds_for_500_x_10k": 500 * (10_000 + 100) / fps}


def bench_packing(dev, per_gpu_values, epochs: int) -> list:
    """Total images/s of one GPU (the benchmark's device) with N LeNet runs packed on it, via
    the real scheduler."""
    visible = detect_gpus()  # the slot names the GPU as CUDA_VISIBLE_DEVICES does: cuda:1 under "2,3" is "3"
    gpu = visible[dev.index or 0] if len(visible) > (dev.index or 0) else str(dev.index or 0)
    rows = []
    for n in per_gpu_values:
        root = Path(tempfile.mkdtemp(prefix=f"gaussreg-pack{n}-"))
        st = Store(root)
        ids = []
        for seed in range(n):
            spec = resolve({"dataset": "fashion-mnist" if data.find("fashion-mnist") else "synthetic",
                            "model": "lenet", "method": "baseline", "seed": seed, "max_epochs": epochs,
                            "experiment": f"pack{n}", "robustness": {"sigmas": [0.0]}})
            ids.append(run_id(spec))
            st.create(spec, ids[-1])
        t0 = time.time()
        Scheduler(st, ids, make_slots([gpu], per_gpu=n), poll_s=0.2).run()
        wall = time.time() - t0
        ips = []
        for i in ids:
            eps = st.get(i).epochs()
            ips.append(statistics.median(e["images_per_s"] for e in eps) if eps else 0.0)
        rows.append({"per_gpu": n, "runs": n, "wall_s": wall, "images_per_s_total": sum(ips),
                     "images_per_s_per_run": statistics.mean(ips)})
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gaussreg.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="lenet", choices=["lenet", "alexnet", "mlp"])
    ap.add_argument("--dataset", default=None, help="default: fashion-mnist for lenet, cifar10 for alexnet")
    ap.add_argument("--batch", type=int, default=None, help="default: the model's preset batch size")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--robust-images", type=int, default=None, help="default: 10000 on cuda, 1000 on cpu")
    ap.add_argument("--epoch-repeats", type=int, default=None)
    ap.add_argument("--packing", default="1,2,4,8", help="--per-gpu values to try (GPU only); '' to skip")
    ap.add_argument("--packing-epochs", type=int, default=3)
    ap.add_argument("--certify-images", type=int, default=None, help="default: 100 on cuda, 10 on cpu")
    ap.add_argument("--skip", default="", help="comma list of: steps,compile,epoch,robustness,certify,packing")
    ap.add_argument("--methods", default="", help="time only these methods' steps (comma list, e.g. "
                    "baseline,regularizer); baseline is always timed")
    ap.add_argument("--out", default=None, help="write the results as JSON here (default: "
                    "bench/results/<machine>.json, e.g. cpu-2core-avx512-amx-bf16.json; '-' for none)")
    a = ap.parse_args(argv)
    keep_freed_memory()  # as the worker does
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    gpu = dev.type == "cuda"
    dataset = a.dataset or ("cifar10" if a.model == "alexnet" else "fashion-mnist")
    batch = a.batch or (128 if a.model == "alexnet" else 1000)
    repeats = a.repeats or (20 if gpu else 5)
    skip = set(filter(None, a.skip.split(",")))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if gpu else platform.processor()
           or platform.machine(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "gaussreg": __version__, "commit": commit or None,
           "model": a.model, "dataset": dataset, "batch": batch, "date": time.strftime("%Y-%m-%d")}

    def report(key, value):
        res[key] = value
        print(json.dumps({key: value}, indent=1), flush=True)

    if "steps" not in skip:
        only = set(filter(None, a.methods.split(","))) | {"baseline"}
        chosen = [m for m in METHODS if not a.methods or m[0] in only]
        report("steps", bench_steps(dev, a.model, dataset, batch, 3 if gpu else 2, repeats, chosen))
        print(summary(res["steps"]), flush=True)
    if "compile" not in skip:
        report("compile", bench_compile(dev, a.model, dataset, batch, repeats))
    if "epoch" not in skip and a.model == "lenet":
        report("epoch", bench_epoch(dev, dataset, batch, a.epoch_repeats or (5 if gpu else 1)))
    if "robustness" not in skip and a.model == "lenet":
        report("robustness", bench_robustness(dev, dataset, a.robust_images or (10_000 if gpu else 1000),
                                              3 if gpu else 1))
    if "certify" not in skip:
        report("certify", bench_certify(dev, a.model, dataset, a.certify_images or (100 if gpu else 10), 10_000,
                                        10_000 if gpu else 1000))
    if "packing" not in skip and gpu and a.packing:
        report("packing", bench_packing(dev, [int(v) for v in a.packing.split(",")], a.packing_epochs))
    out = a.out or f"bench/results/{machine(dev)}.json"
    if out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def machine(dev) -> str:
    """A file name for this machine's results: cuda-<gpu name>, or cpu-<cores>core-<what it
    computes bf16 with> (AMX and avx512_bf16 alone differ in speed, so they get different files)."""
    if dev.type == "cuda":
        return "cuda-" + "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(dev).lower())
    amx = "-amx" if "amx" in cpu_bf16_units() else ""
    return f"cpu-{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}core-" + (
        torch.backends.cpu.get_cpu_capability().lower() + amx + ("-bf16" if bf16_native(dev) else ""))


def summary(rows: list) -> str:
    """The speed issue's two ratios, as plain lines under the JSON."""
    def step(method, precision):
        return next((r["step_s"] for r in rows if r["method"] == method and r["precision"] == precision
                     and (method != "regularizer" or "depth" not in r["params"])), None)
    b32, b16, r16 = step("baseline", "fp32"), step("baseline", "bf16"), step("regularizer", "bf16")
    lines = []
    if b32 and b16:
        lines.append(f"bf16 baseline step / fp32 baseline step: {b16 / b32:.2f} (target <= 0.40)")
    if b16 and r16:
        lines.append(f"bf16 regularizer step / bf16 baseline step: {r16 / b16:.2f} (target <= 2.50)")
    return "\n".join(lines)
