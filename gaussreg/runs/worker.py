"""Train one run: `python -m gaussreg.runs.worker RUN_DIR [--resume]`.

Reads RUN_DIR/spec.json, trains with the paper's protocol (presets by model, Adam/SGD,
ReduceLROnPlateau on the validation objective, early stopping, best-validation model),
evaluates clean accuracy and robustness, and writes the run directory (README: "The run
directory"). The whole dataset lives on the training device; batches are index slices."""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import math
import os
import platform
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, Optional

from gaussreg import __version__
from gaussreg.core import plugins
from gaussreg.data import loading as data
from gaussreg.runs import environment
from gaussreg.runs.device import (autocast, device_name, keep_freed_memory, make_deterministic, out_of_memory,
                                  pick_device, prefer_channels_last, resolve_precision, threads_from_env)
from gaussreg.runs.spec import SpecError, resolve, run_id
from gaussreg.runs.store import (HEARTBEAT_S, RunDir, RunFileError, atomic_write_bytes, atomic_write_json, now_iso,
                                 read_json, to_json, try_lock)
from gaussreg.science.methods import BANK_VERSION, make_method
from gaussreg.science.robustness import EvaluationStopped, robustness

EXIT_BAD_INPUT = 2
EXIT_LOCKED = 3
PROGRESS_EVERY_S = 0.5
CHECKPOINT_EVERY_S = 60.0  # last.pt at most this often (and at every stop), see LastCheckpoint
# Validation robustness (for selecting on validation): the first images of the validation
# split (a seeded permutation shared by every run of a dataset), and the same noise for
# every run, so configurations are compared on identical noisy images.
VAL_ROBUSTNESS_IMAGES = 1000
VAL_ROBUSTNESS_SEED = 0


class Cancelled(Exception):
    pass


class Diverged(Exception):
    def __init__(self, epoch: int, term: str):
        super().__init__(f"loss term {term!r} became non-finite in epoch {epoch}")
        self.epoch, self.term = epoch, term


class Status:
    """status.json, replaced atomically; a heartbeat thread refreshes updated_at."""

    def __init__(self, run: RunDir, **fields):
        self.run, self.fields, self.lock = run, dict(fields), threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def update(self, **fields) -> None:
        with self.lock:
            self.fields.update(fields, updated_at=now_iso())
            self.run.write_status(self.fields)

    def start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    self.update()
                except OSError:
                    pass  # a full disk must not kill training; the next beat retries
        self._thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


class Events:
    """events.jsonl: append-only, one JSON object per line, flushed per line."""

    def __init__(self, path: Path, truncate: bool):
        # O_NOFOLLOW: a symbolic link in a run directory must not get its target truncated
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | (os.O_TRUNC if truncate else os.O_APPEND)
        self.f = os.fdopen(os.open(path, flags, 0o666), "w", buffering=1)

    def emit(self, type_: str, **fields) -> None:
        self.f.write(to_json({"type": type_, "time": now_iso(), **fields}) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def make_optimizer(spec, params):
    import torch
    o = dict(spec["optimizer"])
    name = o.pop("name")
    if name == "adam":
        return torch.optim.Adam(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                                weight_decay=o["weight_decay"])
    return torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"],
                           weight_decay=o["weight_decay"])


def evaluate(method, model, X, Y, batch_size: int, seed: int, precision: str = "fp32") -> dict:
    """The method's objective, clean CE and clean accuracy over (X, Y), in the run's
    precision; noise (for augment) comes from a generator reseeded per call, so epochs compare."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator(device=X.device).manual_seed(seed)
    chunk = max(1, batch_size // method.copies)
    obj = torch.zeros((), dtype=torch.float64, device=X.device)
    ce = torch.zeros_like(obj)
    correct = torch.zeros((), dtype=torch.long, device=X.device)
    model.eval()
    try:
        with torch.no_grad(), autocast(X.device, precision):
            for i in range(0, len(X), chunk):
                x, y = X[i:i + chunk], Y[i:i + chunk]
                L = method.objective(model, x, y, g)
                logits = L.logits if L.logits is not None and len(L.logits) == len(x) else model(x)
                obj += L.total.detach().double() * len(x)
                ce += F.cross_entropy(logits, y, reduction="sum").double()
                correct += (logits.argmax(1) == y).sum()
    finally:
        model.train()
    n = max(1, len(X))
    return {"loss": float(obj) / n, "ce": float(ce) / n, "accuracy": float(correct) / n}


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the run's generators at the start of `epoch`: shuffling and noise are a
    function of (seed, epoch) alone, so a checkpoint carries no generator state and resumes
    on any device (a CPU generator's state does not fit a CUDA one, nor 8 GPUs' states 1)."""
    return int.from_bytes(hashlib.sha256(f"gaussreg:{seed}:{epoch}".encode()).digest()[:8], "little") >> 1


def _training_state(model, opt, sched, state: dict) -> dict:
    """What resuming needs, as it is now; tensors are cloned on their device (a copy that
    does not wait for the GPU), so training on does not change it."""
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(opt.state_dict()), "scheduler": copy.deepcopy(sched.state_dict()),
            "state": dict(state)}


def _write_checkpoint(path: Path, content: dict, spec: dict) -> None:
    """content plus the run's resolved spec, so a checkpoint copied away from its run
    directory still says what it is (`gaussreg eval FILE`)."""
    import torch
    buf = io.BytesIO()
    torch.save({**content, "spec": spec}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path, model, opt, sched) -> dict:
    import torch

    # weights_only: a run directory is data, never code
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ck["model"])
    if opt is not None:
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        # an "rng" entry (checkpoints before epoch seeding) is ignored: the generators are
        # reseeded from (seed, epoch), whatever device wrote it
    return ck.get("state", {})


def checkpoint_every_s() -> float:
    """Seconds between last.pt writes (at epoch ends); GAUSSREG_CHECKPOINT_S sets it (tests)."""
    try:
        return max(0.0, float(os.environ.get("GAUSSREG_CHECKPOINT_S", CHECKPOINT_EVERY_S)))
    except ValueError:
        return CHECKPOINT_EVERY_S


class LastCheckpoint:
    """last.pt, written at an epoch end when `every_s` has passed since the last write, and
    on `flush` (the end of training, a cancel, preemption, a crash). In between, the state
    of the last finished epoch is kept in memory (cloned on its device), so whatever stops
    the run, last.pt holds exactly a finished epoch and resuming equals an uninterrupted run.
    A checkpoint of AlexNet is ~160 MB and fsync'd: written per short GPU epoch, by 16 runs
    packed on a cluster filesystem, it would dominate the training."""

    def __init__(self, path: Path, every_s: float, spec: dict):
        self.path, self.every_s, self.spec = path, every_s, spec
        self.pending: Optional[dict] = None
        self.written_at = time.monotonic()

    def epoch_end(self, model, opt, sched, state: dict) -> None:
        content = _training_state(model, opt, sched, state)
        if time.monotonic() - self.written_at >= self.every_s:
            self.pending = None
            self.write(content)
        else:
            self.pending = content

    def write(self, content: dict) -> None:
        _write_checkpoint(self.path, content, self.spec)
        self.written_at = time.monotonic()

    def flush(self) -> bool:
        if self.pending is None:
            return False
        content, self.pending = self.pending, None
        self.write(content)
        return True


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


def changed_noise_bank(raw: dict, run: RunDir) -> Optional[str]:
    """Why a run planned with fixed-noise augmentation before the noise bank had versions
    must not train here, or None: its id stands for bank version 1, which could hold +-inf
    (issue 29), and this code computes version 2 only. A spec.json written by hand, with
    no id made from it, trains with version 2."""
    params = raw.get("params")
    if (raw.get("method") != "augment" or not isinstance(params, dict) or params.get("fresh_noise") is not False
            or "noise" in params or "bank" in params or run_id(raw) != run.id):
        return None
    return (f"run {run.id} was planned with fixed noise from noise bank version 1, which could hold infinite "
            f"values (issue 29), and this gaussreg computes version {BANK_VERSION} only; run its manifest again "
            "to plan it anew (the new run gets a new id)")


def train(spec: dict, run: RunDir, resume: bool, should_stop, status: Status, log) -> dict:
    """The training loop; returns result.json's content."""
    t_start = time.time()
    s = _setup(spec, log)
    state, resuming = _start_or_resume(run, resume, s, log, spec)
    last_ck = LastCheckpoint(run.last_checkpoint, checkpoint_every_s(), spec)
    events = Events(run.events_file, truncate=not resuming)
    try:
        events.emit("resume" if resuming else "start", epoch=state["epoch"], device=str(s.dev),
                    sizes=s.splits.sizes(), parameters=s.parameters)
        try:
            _train_epochs(spec, run, state, s, events, status, last_ck, should_stop, log)
        except BaseException:
            # cancel, preemption, divergence or a crash: last.pt gets the last finished epoch
            try:
                if last_ck.flush():
                    log(f"last.pt written (epoch {state['epoch']})")
            except Exception as e:  # noqa: BLE001 - the original error matters more
                log(f"could not write last.pt: {type(e).__name__}: {e}")
            raise
        last_ck.flush()
        ev = _final_evaluation(spec, run, s, status, should_stop, events)
        if spec.get("certify"):
            status.update(phase="certifying")
            with autocast(s.dev, s.precision):  # the classifier that was trained and evaluated
                _certify(spec, s.model, s.splits, run, should_stop, events, log)
    finally:
        events.close()
    return _result_record(spec, run, s, state, ev, t_start)


class _Setup(NamedTuple):
    dev: object
    splits: object
    model: object
    method: object
    g: object  # shuffling and training noise
    opt: object
    sched: object
    parameters: int
    precision: str  # "fp32" or "bf16": what "auto" became on this device


def _setup(spec: dict, log) -> _Setup:
    """The process, the data, the model, the method and the optimizer of a run, seeded."""
    import torch

    from gaussreg.science.models import build_model, parameter_count

    keep_freed_memory()
    make_deterministic()
    dev = pick_device(spec["device"], os.environ.get("GAUSSREG_GPU"))
    seed = spec["seed"]
    threads_from_env()
    splits = data.load(spec["dataset"], spec["data_dir"], split_seed=spec["split_seed"],
                       train_subset=spec["train_subset"], test_subset=spec["test_subset"], device=dev,
                       args=spec.get("dataset_args"), python_path=spec.get("python_path", ()))
    log(f"data {spec['dataset']} {splits.sizes()} on {dev}")
    torch.manual_seed(seed)
    model = build_model(spec["model"], splits.info, spec.get("model_args"), spec.get("python_path", ())).to(dev)
    precision = resolve_precision(spec["precision"], dev)
    model, channels_last = prefer_channels_last(model, precision)
    if spec["compile"]:
        for part in (model.first, model.rest):  # in place: state_dict keys and model.first stay as they are
            part.compile()
    log(f"precision {precision}{', channels_last' if channels_last else ''}{', compiled' if spec['compile'] else ''}")
    method = make_method(spec["method"], spec["params"])
    _set_pixel_sigma(method, spec, splits.info, log)
    g = torch.Generator(device=dev).manual_seed(seed)
    X = splits.train_x
    method.prepare(len(X), tuple(X.shape[1:]), g)
    opt = make_optimizer(spec, model.parameters())
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=spec["lr_patience"],
                                                       factor=spec["lr_factor"])
    return _Setup(dev, splits, model, method, g, opt, sched, parameter_count(model), precision)


def _set_pixel_sigma(method, spec: dict, info, log) -> None:
    """A sigma in the reference's units as the per-channel pixel sigma it trains at: the
    spec's (a built-in dataset), else from the loaded dataset's mean and std (a user's)."""
    px = spec.get("pixel_sigma") or method.reference_sigma(spec["params"], spec["dataset"], info.mean, info.std)
    if px is None:
        return
    if len(px) != info.shape[0]:
        raise ValueError(f"the spec's pixel_sigma has {len(px)} values but the images of {spec['dataset']} have "
                         f"{info.shape[0]} channels")
    method.pixel_sigma = tuple(float(v) for v in px)
    log(f"sigma {spec['params']['sigma']:g} in the reference's units: per channel "
        f"{', '.join(f'{v:.4g}' for v in px)} in pixel units")


def _epoch_work(s: _Setup, spec: dict):
    """The optimizer steps and the forward passes by kind (Method.passes) of one epoch."""
    n = len(s.splits.train_x)
    return math.ceil(n * s.method.copies / spec["batch_size"]), s.method.passes(n)


def _start_or_resume(run: RunDir, resume: bool, s: _Setup, log, spec: dict):
    """The training state to start from, and whether it comes from last.pt; a fresh start
    removes the previous model's outputs and writes a last.pt at once. The state carries
    the run's cost so far (steps, passes, CPU and GPU seconds of finished epochs), so a
    resumed run reports the totals of an uninterrupted one; the time of an epoch cut
    short is not counted, as its work is redone."""
    import torch
    state = {"epoch": 0, "best_val_loss": math.inf, "best_epoch": 0, "bad_epochs": 0, "train_time": 0.0,
             "threads": torch.get_num_threads(), "steps": 0, "images": {"clean": 0, "noisy": 0, "expected": 0},
             "cpu_time": 0.0, "gpu_time": 0.0 if s.dev.type == "cuda" else None}
    last = run.last_checkpoint
    resuming = resume and last.exists()
    if resuming:
        try:
            saved = _load_checkpoint(last, s.model, s.opt, s.sched)
        except Exception as e:  # noqa: BLE001 - truncated, foreign or tampered: all mean the same here
            raise RuntimeError(f"cannot resume from {last} ({type(e).__name__}: {str(e)[:200]}); "
                               "`gaussreg run --rerun` (or deleting last.pt) starts the run over") from None
        state.update(saved)
        if "steps" not in saved:  # a last.pt of a worker that counted no cost
            steps, passes = _epoch_work(s, spec)  # the same every epoch: exact for the epochs done
            state.update(steps=steps * state["epoch"], images={k: v * state["epoch"] for k, v in passes.items()},
                         cpu_time=None, gpu_time=None)  # times it did not measure stay unknown
        log(f"resumed from last.pt after epoch {state['epoch']}")
        # float sums depend on how work is split over threads: a bitwise-exact resume
        # needs the thread count the run started with, whatever this launch would use
        if state.get("threads") and state["threads"] != torch.get_num_threads():
            log(f"using {state['threads']} thread(s) as before the interruption (not {torch.get_num_threads()}), "
                "so the result equals an uninterrupted run")
            torch.set_num_threads(state["threads"])
    else:
        for f in (run.result_file, run.best_checkpoint):
            f.unlink(missing_ok=True)
        for f in run.certification_files():  # certificates of a model about to be replaced
            f.unlink(missing_ok=True)
        _write_checkpoint(last, _training_state(s.model, s.opt, s.sched, state), spec)  # kill -9 leaves a last.pt
    return state, resuming


class _Evaluation(NamedTuple):
    test: dict
    rob: object
    rob_time: float
    vrob: object
    val_images: int


def _final_evaluation(spec: dict, run: RunDir, s: _Setup, status: Status, should_stop, events) -> _Evaluation:
    """The model with the best validation objective: test accuracy, then R on test and validation."""
    seed, splits, model = spec["seed"], s.splits, s.model
    _load_checkpoint(run.best_checkpoint, model, None, None)
    status.update(phase="evaluating")
    test = evaluate(make_method("baseline", {}), model, splits.test_x, splits.test_y, spec["batch_size"], seed,
                    s.precision)
    rcfg = spec["robustness"]
    t0 = time.time()
    with autocast(s.dev, s.precision):  # R in the precision the model trained in (inference only)
        try:
            rob = robustness(model, splits.test_x, splits.test_y, sigmas=rcfg["sigmas"], samples=rcfg["samples"],
                             seed=seed, clip=rcfg["clip"], should_stop=should_stop)
        except EvaluationStopped:
            raise Cancelled() from None
        rob_time = time.time() - t0
        nv = min(VAL_ROBUSTNESS_IMAGES, len(splits.val_y))
        vrob = robustness(model, splits.val_x[:nv], splits.val_y[:nv], sigmas=rcfg["sigmas"],
                          samples=rcfg["samples"], seed=VAL_ROBUSTNESS_SEED, clip=rcfg["clip"])
    events.emit("test", test_accuracy=test["accuracy"], test_loss=test["ce"], robustness=rob.score,
                sigmas=rob.sigmas, per_sigma=rob.per_sigma, accuracy_per_sigma=rob.accuracy_per_sigma,
                eval_time=rob_time)
    return _Evaluation(test, rob, rob_time, vrob, nv)


def _result_record(spec: dict, run: RunDir, s: _Setup, state: dict, ev: _Evaluation, t_start: float) -> dict:
    """result.json's content."""
    import torch
    test, rob, vrob = ev.test, ev.rob, ev.vrob
    return {
        "run_id": run.id, "experiment": spec["experiment"], "dataset": spec["dataset"], "model": spec["model"],
        "method": spec["method"], "params": spec["params"], "seed": spec["seed"],
        "test_accuracy": test["accuracy"], "test_loss": test["ce"],
        "robustness": rob.score, "sigmas": rob.sigmas, "per_sigma": rob.per_sigma,
        "accuracy_per_sigma": rob.accuracy_per_sigma, "robustness_samples": rob.samples,
        "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
        "best_val_loss": state["best_val_loss"], "best_val_accuracy": state.get("best_val_accuracy"),
        "val_robustness": vrob.score, "val_per_sigma": vrob.per_sigma,
        "val_accuracy_per_sigma": vrob.accuracy_per_sigma, "val_robustness_images": ev.val_images,
        "train_time_s": state["train_time"], "train_cpu_s": state["cpu_time"], "train_gpu_s": state["gpu_time"],
        "steps": state["steps"], "images": state["images"], "robustness_time_s": ev.rob_time, "wall_time_s": time.time() - t_start,
        "parameters": s.parameters, "device": str(s.dev), "device_name": device_name(s.dev),
        "precision": s.precision, "compile": spec["compile"],
        **({"pixel_sigma": list(s.method.pixel_sigma)} if s.method.pixel_sigma is not None else {}),
        "sizes": s.splits.sizes(), "host": socket.gethostname(),
        "versions": {"gaussreg": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "finished_at": now_iso(),
    }


def _batch_step(method, model, opt, X, Y, idx, g, sums, first_bad, correct, b: int, precision: str) -> bool:
    """One training step and its bookkeeping, all on the device: nothing here may wait for
    the GPU (no .item(), float() or int() of a tensor; tests/test_worker.py checks). `sums`
    holds the epoch's sums of [*method.term_names, total] weighted by batch size, `first_bad`
    the first batch at which each went non-finite (else the batch count), `correct` the right
    answers; ~8 small kernels per batch whatever the number of terms. Returns whether the
    method gave clean logits (counted in `correct`). The forward pass runs in `precision`."""
    import torch
    with autocast(X.device, precision):
        x, y = method.batch(X, Y, idx, g)
        L = method.loss(model, x, y, g)
    opt.zero_grad(set_to_none=True)
    L.total.backward()
    opt.step()
    v = torch.stack([*(L.terms[k] for k in method.term_names), L.total]).detach().double()
    sums.add_(v, alpha=len(y))
    first_bad.copy_(torch.where(torch.isfinite(v), first_bad, first_bad.clamp(max=b)))
    if L.logits is not None:
        correct.add_((L.logits.detach().argmax(1) == y).sum())
    return L.logits is not None


def _train_epochs(spec, run, state, s: _Setup, events, status, last_ck, should_stop, log) -> None:
    """The epochs from state["epoch"] + 1 on; updates `state`, writes best.pt (the model
    only) when validation improves and hands each finished epoch to last_ck."""
    import torch
    model, method, opt, sched, g, splits, dev = s.model, s.method, s.opt, s.sched, s.g, s.splits, s.dev
    X, Y = splits.train_x, splits.train_y
    N, B = len(X) * method.copies, spec["batch_size"]
    batches, passes = _epoch_work(s, spec)
    seed = spec["seed"]
    val_seed = seed + 1_000_003
    terms = list(method.term_names)
    # the progress clock runs across epochs: short epochs still give a progress event every PROGRESS_EVERY_S
    next_progress = time.monotonic() + PROGRESS_EVERY_S
    for epoch in range(state["epoch"] + 1, spec["max_epochs"] + 1):
        if state["bad_epochs"] >= spec["early_stop"]:
            break
        status.update(epoch=epoch, phase="training")
        t0, c0 = time.time(), time.process_time()
        model.train()
        es = epoch_seed(seed, epoch)  # the epoch's randomness depends on (seed, epoch) only: see epoch_seed
        g.manual_seed(es)
        torch.manual_seed(es)
        perm = torch.randperm(N, generator=g, device=dev)
        sums = torch.zeros(len(terms) + 1, dtype=torch.float64, device=dev)
        first_bad = torch.full((len(terms) + 1,), batches, dtype=torch.long, device=dev)
        correct = torch.zeros((), dtype=torch.long, device=dev)
        seen = 0
        for b in range(batches):
            if should_stop():
                raise Cancelled()
            idx = perm[b * B:(b + 1) * B]
            has_logits = _batch_step(method, model, opt, X, Y, idx, g, sums, first_bad, correct, b, s.precision)
            seen += len(idx)
            if time.monotonic() >= next_progress:  # one host sync per PROGRESS_EVERY_S, not per batch
                next_progress = time.monotonic() + PROGRESS_EVERY_S
                events.emit("progress", epoch=epoch, batch=b + 1, batches=batches, loss=float(sums[-1]) / seen)
        names = terms + ["loss"]
        train = dict(zip(names, (sums / seen).tolist()))
        bad = {k: v for k, v in zip(names, first_bad.tolist()) if v < batches}
        if bad or not all(math.isfinite(v) for v in train.values()):
            raise Diverged(epoch, min(bad, key=lambda k: bad[k]) if bad else "loss")
        status.update(phase="validating")  # what the views say while no batch progresses
        val = evaluate(method, model, splits.val_x, splits.val_y, B, val_seed, s.precision)
        if not math.isfinite(val["loss"]):
            raise Diverged(epoch, "val_loss")
        sched.step(val["loss"])
        improved = val["loss"] < state["best_val_loss"]
        dt = time.time() - t0
        # new objects, never changed in place: last_ck may hold this state's shallow copy
        state.update(epoch=epoch, train_time=state["train_time"] + dt, steps=state["steps"] + batches,
                     images={k: state["images"].get(k, 0) + v for k, v in passes.items()},
                     cpu_time=_plus(state["cpu_time"], time.process_time() - c0),
                     # GPU seconds: the epoch's wall on the GPU, which it holds until the
                     # epoch's end reads the losses back (None unless every epoch ran on one)
                     gpu_time=_plus(state["gpu_time"], dt) if dev.type == "cuda" else None)
        if improved:
            state.update(best_val_loss=val["loss"], best_epoch=epoch, bad_epochs=0,
                         best_val_accuracy=val["accuracy"])
            # the model alone: what evaluation, `eval` and `certify` read
            _write_checkpoint(run.best_checkpoint, {"model": model.state_dict(), "state": dict(state)}, spec)
        else:
            state["bad_epochs"] += 1
        train_loss = train.pop("loss")
        events.emit("epoch", epoch=epoch, train_loss=train_loss, train_terms=train,
                    train_accuracy=float(correct) / seen if has_logits else None,
                    val_loss=val["loss"], val_ce=val["ce"], val_accuracy=val["accuracy"],
                    lr=opt.param_groups[0]["lr"], epoch_time=dt, images_per_s=seen / dt,
                    best=improved)
        last_ck.epoch_end(model, opt, sched, state)
        log(f"epoch {epoch}: train {train_loss:.4f} "
            f"val {val['loss']:.4f} acc {val['accuracy']:.4f} ({dt:.1f}s, {seen / dt:.0f} img/s)")


def _plus(total: Optional[float], x: float) -> Optional[float]:
    """A running total that stays unknown (None) once a part of it was not measured."""
    return None if total is None else total + x


def _certify(spec, model, splits, run, should_stop, events, log) -> None:
    """The manifest's `certify` table: randomized-smoothing certificates of the best
    model after R; a stop request (SIGTERM) is honoured between images."""
    from gaussreg.runs.certificate import certify_run
    c = spec["certify"]
    log(f"certifying {c['images']} test images at sigma {c['sigma']:g} (n0 {c['n0']}, n {c['n']}, "
        f"alpha {c['alpha']:g})")
    cert = certify_run(run, model, splits.test_x, splits.test_y, c["sigma"], c["n0"], c["n"], c["alpha"],
                       c["images"], seed=spec["seed"], should_stop=should_stop)
    if cert is None:
        raise Cancelled()
    events.emit("certify", sigma=cert["sigma"], images=cert["images"], n=cert["n"],
                certified_accuracy=cert["certified_accuracy"], time_s=cert["time_s"])
    log("certified accuracy at radius 0/0.25/0.5: "
        + "/".join(f"{v:.4f}" for v in cert["certified_accuracy"].values()) + f" ({cert['time_s']:.1f}s)")


def watch_parent() -> Optional[int]:
    """The scheduler that started this worker (GAUSSREG_PARENT_PID), made to stop us when
    it dies: Linux sends SIGTERM on its death (PR_SET_PDEATHSIG), which the worker treats
    like a cancel (last.pt kept, the run resumable); elsewhere the training loop notices
    that its parent changed. None when no parent asked to be watched."""
    parent = os.environ.pop("GAUSSREG_PARENT_PID", None)
    if not parent or not parent.isdigit():
        return None
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            PR_SET_PDEATHSIG = 1
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the per-batch check below still stops us
    return int(parent)


def orphaned(parent: Optional[int]) -> bool:
    return parent is not None and os.getppid() != parent


@contextmanager
def _signals(flag: dict):
    def handler(signum, _frame):
        flag["signal"] = signum
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gaussreg.runs.worker", description="Train one run directory.")
    ap.add_argument("run_dir")
    ap.add_argument("--resume", action="store_true", help="continue from last.pt when it exists")
    args = ap.parse_args(argv)
    run = RunDir(args.run_dir)
    if not run.path.is_dir():
        print(f"error: run directory {run.path} does not exist", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        fd = os.open(run.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                     0o666)
    except OSError as e:
        print(f"error: cannot write {run.log_file} ({e.strerror}); is the run directory writable "
              "and worker.log a plain file?", file=sys.stderr)
        return EXIT_BAD_INPUT
    logf = os.fdopen(fd, "a", buffering=1)
    echo = sys.stderr.isatty()

    def log(msg: str) -> None:
        line = f"{now_iso()} {msg}"
        logf.write(line + "\n")
        if echo:
            print(line, file=sys.stderr)

    parent = watch_parent()
    held = os.environ.pop("GAUSSREG_LOCK_FD", None)  # the scheduler passes the lock it took
    lock_fd = int(held) if held else try_lock(run)
    if lock_fd is None:
        print(f"error: run {run.id} is already being trained by another process", file=sys.stderr)
        return EXIT_LOCKED
    status = Status(run, state="running", pid=os.getpid(), host=socket.gethostname(), device=None,
                    started_at=now_iso(), finished_at=None, epoch=0, max_epochs=None, error=None, phase="training",
                    cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                    gpu_slot=os.environ.get("GAUSSREG_GPU"), **environment.worker_fields())

    def fail(message: str, state: str = "failed", **extra) -> None:
        log(f"{state}: {message}")
        status.update(state=state, error=message, finished_at=now_iso(), **extra)

    def refuse(message: str) -> None:
        """A run that cannot start says why in its status, unless it is completed: then
        only this attempt (`gaussreg train --force`) is refused, and its result stands."""
        try:
            completed = run.state() == "completed"
        except Exception:  # noqa: BLE001 - a corrupt status: nothing to keep
            completed = False
        if completed:
            log(f"refused to train again: {message}")
        else:
            fail(message)

    try:
        checked = _check_run(run, refuse)
        if isinstance(checked, int):
            return checked
        spec, dev = checked
        status.fields.update(device=str(dev), max_epochs=spec["max_epochs"],
                             precision=resolve_precision(spec["precision"], dev))
        status.update()
        status.start_heartbeat()
        log(f"start {run.id} pid {os.getpid()} device {dev} resume={args.resume}")
        return _train_to_the_end(spec, run, dev, args.resume, parent, status, log, logf, fail)
    finally:
        status.stop_heartbeat()
        logf.close()


def _check_run(run: RunDir, fail):
    """(spec, device) when the run can start, else its exit code after saying why."""
    try:
        raw = read_json(run.spec_file)  # resolve() checks it key by key, with its own messages
        if raw is None:
            raise RunFileError(f"{run.spec_file} is missing")
        spec = resolve(raw)
    except (SpecError, RunFileError) as e:
        fail(f"bad spec {run.spec_file}: {e}")
        print(f"error: bad spec {run.spec_file}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if (data.is_builtin(spec["dataset"]) and spec["dataset"] != "synthetic"
            and data.find(spec["dataset"], spec["data_dir"]) is None):
        msg = data.missing_message(spec["dataset"], spec["data_dir"])
    else:
        msg = changed_source(spec) or changed_noise_bank(raw, run)
    if msg:
        fail(msg)
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        make_deterministic()
        dev = pick_device(spec["device"], os.environ.get("GAUSSREG_GPU"))
    except SpecError as e:
        fail(str(e))
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return spec, dev


def _train_to_the_end(spec, run: RunDir, dev, resume: bool, parent, status: Status, log, logf, fail) -> int:
    """Train under the stop signals; record the result or how the run ended. The exit code."""
    flag = {}
    with _signals(flag):
        if orphaned(parent):
            flag["signal"] = signal.SIGTERM  # the scheduler died before we could ask to follow it
        try:
            result = train(spec, run, resume, lambda: "signal" in flag or orphaned(parent), status, log)
        except Cancelled:
            sig = flag.get("signal", signal.SIGTERM)
            if orphaned(parent):
                fail(f"its scheduler (pid {parent}) died; last.pt holds the last finished epoch "
                     "(run it again to resume)", "cancelled")
            else:
                state, message = environment.stop_state(run, sig)  # under Slurm, SIGTERM may be preemption
                fail(message, state)
            return 128 + sig
        except Diverged as e:
            fail(str(e), "diverged", diverged_epoch=e.epoch, diverged_term=e.term)
            return 1
        except Exception as e:
            logf.write(traceback.format_exc())
            if out_of_memory(e):
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                fail(f"out of memory on {dev} ({first}); run fewer runs per GPU (--per-gpu), a smaller "
                     "batch_size or a smaller train_subset", out_of_memory=True)
            else:
                fail(f"{type(e).__name__}: {e}")
            return 1
    atomic_write_json(run.result_file, result)
    # phase: what a running worker does; a failed run keeps the one it failed in
    status.update(state="completed", finished_at=now_iso(), error=None, phase=None)
    log(f"completed: test accuracy {result['test_accuracy']:.4f}, robustness {result['robustness']:.4f}")
    return 0


def run_as_script() -> None:
    """`python -m gaussreg.runs.worker` (and the README's `python -m gaussreg.worker`)."""
    code = main()
    # Every file the run writes is closed by now: skip tearing down torch's module graph,
    # which costs about a second per run (a sweep of small runs, the test suite).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_as_script()
