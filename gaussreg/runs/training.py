"""One run's training, the paper's protocol on one screen: presets by model, Adam or SGD,
ReduceLROnPlateau on the validation objective, early stopping, the best validation epoch's
model evaluated for clean accuracy and robustness R. Everything a run trains with is one
`Training` object; `train_epochs` is the loop (the one function allowed past a screen, so
that it reads like the method). The whole dataset lives on the training device; batches
are index slices. The process around it (status, signals, locks) is gaussreg.runs.worker."""

from __future__ import annotations

import copy
import hashlib
import io
import math
import os
import platform
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from gaussreg import __version__
from gaussreg.data import loading as data
from gaussreg.runs.certificate import certify_run
from gaussreg.runs.device import (autocast, device_name, keep_freed_memory, make_deterministic, pick_device,
                                  prefer_channels_last, repeatability, resolve_precision, threads_from_env)
from gaussreg.runs.store import RunDir, atomic_write_bytes, now_iso, to_json
from gaussreg.science.methods import Method, make_method
from gaussreg.science.moments import kernels_ran
from gaussreg.science.models import GaussNet, build_model, parameter_count
from gaussreg.science.robustness import EvaluationStopped, certify_batch, constant_accuracy, robustness

PROGRESS_EVERY_S = 0.5
CHECKPOINT_EVERY_S = 60.0  # best.pt and last.pt at most this often (and at every stop), see Checkpoints
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


def _training_state(t: "Training") -> dict:
    """What resuming needs, as it is now; tensors are cloned on their device (a copy that
    does not wait for the GPU), so training on does not change it."""
    return {"model": {k: v.detach().clone() for k, v in t.model.state_dict().items()},
            "optimizer": copy.deepcopy(t.opt.state_dict()), "scheduler": copy.deepcopy(t.sched.state_dict()),
            "state": dict(t.state)}


def write_checkpoint(path: Path, content: dict, spec: dict) -> None:
    """content plus the run's resolved spec, so a checkpoint copied away from its run
    directory still says what it is (`gaussreg eval FILE`)."""
    buf = io.BytesIO()
    torch.save({**content, "spec": spec}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, model, opt, sched) -> dict:
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
    """Seconds between checkpoint writes (at epoch ends); GAUSSREG_CHECKPOINT_S sets it (tests)."""
    try:
        return max(0.0, float(os.environ.get("GAUSSREG_CHECKPOINT_S", CHECKPOINT_EVERY_S)))
    except ValueError:
        return CHECKPOINT_EVERY_S


class Checkpoints:
    """best.pt and last.pt, written together: at an epoch end when `every_s` has passed since
    the last write, and on `flush` (the end of training, a cancel, preemption, a crash). In
    between, the last finished epoch's state and the best epoch's model are kept in memory
    (cloned on their device), so whatever stops the run, last.pt holds exactly a finished
    epoch and resuming equals an uninterrupted run. best.pt is written first, so last.pt is
    never newer than best.pt: the best validation loss a resume reads belongs to the model in
    best.pt. A kill -9 loses the epochs since the last write (at most `every_s` of training),
    which a resume redoes. A checkpoint of AlexNet is ~160 MB and fsync'd: written per short
    GPU epoch, by 16 runs packed on a cluster filesystem, it would dominate the training."""

    def __init__(self, run: RunDir, every_s: float, spec: dict):
        self.run, self.every_s, self.spec = run, every_s, spec
        self.pending: Optional[dict] = None  # last.pt's content, not yet written
        self.best: Optional[dict] = None  # best.pt's content, not yet written
        self.written_at = time.monotonic()

    def epoch_end(self, t: "Training", improved: bool) -> None:
        content = _training_state(t)
        if improved:  # the model alone: what evaluation, `eval` and `certify` read
            self.best = {"model": content["model"], "state": dict(t.state)}
        self.pending = content
        if time.monotonic() - self.written_at >= self.every_s:
            self.flush()

    def flush(self) -> bool:
        """Write what is kept in memory, best.pt before last.pt; whether anything was written."""
        if self.pending is None and self.best is None:
            return False
        if self.best is not None:
            write_checkpoint(self.run.best_checkpoint, self.best, self.spec)
            self.best = None
        if self.pending is not None:
            write_checkpoint(self.run.last_checkpoint, self.pending, self.spec)
            self.pending = None
        self.written_at = time.monotonic()
        return True


@dataclass
class Training:
    """Everything one run trains with: its spec, device, data, model, method, generator,
    optimizer and LR schedule, and `state`, the counters a checkpoint carries (epoch, best
    validation loss and epoch, epochs without improvement, cost so far)."""
    spec: dict
    dev: torch.device
    splits: data.Splits
    model: torch.nn.Module
    method: Method
    g: torch.Generator  # shuffling and training noise, reseeded per epoch (epoch_seed)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.ReduceLROnPlateau
    precision: str  # "fp32" or "bf16": what "auto" became on this device
    state: dict

    @property
    def batches(self) -> int:
        """Optimizer steps per epoch: every item of the (augmented) training set once."""
        return math.ceil(len(self.splits.train_x) * self.method.copies / self.spec["batch_size"])

    def step(self, idx: torch.Tensor, tally: "EpochTally") -> None:
        """One optimizer step on the items `idx`, counted in `tally`. Nothing here may wait
        for the GPU (no .item(), float() or int() of a tensor; tests/test_worker.py checks)."""
        X, Y = self.splits.train_x, self.splits.train_y
        with autocast(self.dev, self.precision):
            x, y = self.method.batch(X, Y, idx, self.g)
            L = self.method.loss(self.model, x, y, self.g)
        self.opt.zero_grad(set_to_none=True)
        L.total.backward()
        self.opt.step()
        tally.add(L, y)


class EpochTally:
    """An epoch's sums, kept on the device: the loss terms and total weighted by batch size,
    the first batch at which each went non-finite (else the batch count), and the right
    answers of methods that give clean logits; ~8 small kernels per batch, no host sync."""

    def __init__(self, term_names, batches: int, dev):
        self.names, self.batches, self.b, self.seen = list(term_names) + ["loss"], batches, 0, 0
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=dev)
        self.first_bad = torch.full((len(self.names),), batches, dtype=torch.long, device=dev)
        self.correct = torch.zeros((), dtype=torch.long, device=dev)
        self.has_logits = False

    def add(self, L, y) -> None:
        v = torch.stack([*(L.terms[k] for k in self.names[:-1]), L.total]).detach().double()
        self.sums.add_(v, alpha=len(y))
        self.first_bad.copy_(torch.where(torch.isfinite(v), self.first_bad, self.first_bad.clamp(max=self.b)))
        if L.logits is not None:
            self.correct.add_((L.logits.detach().argmax(1) == y).sum())
            self.has_logits = True
        self.b, self.seen = self.b + 1, self.seen + len(y)

    def mean_loss(self) -> float:
        """The running mean loss (one host sync: for progress events only)."""
        return float(self.sums[-1]) / self.seen

    def close(self, epoch: int):
        """(mean of each term and the loss, accuracy or None); Diverged when a term went non-finite."""
        means = dict(zip(self.names, (self.sums / self.seen).tolist()))
        bad = {k: v for k, v in zip(self.names, self.first_bad.tolist()) if v < self.batches}
        if bad or not all(math.isfinite(v) for v in means.values()):
            raise Diverged(epoch, min(bad, key=lambda k: bad[k]) if bad else "loss")
        return means, (float(self.correct) / self.seen if self.has_logits else None)


def setup(spec: dict, log) -> Training:
    """The process, the data, the model, the method and the optimizer of a run, seeded."""
    keep_freed_memory()
    make_deterministic()
    dev = pick_device(spec["device"], os.environ.get("GAUSSREG_GPU"))
    threads_from_env()
    splits = data.load(spec["dataset"], spec["data_dir"], split_seed=spec["split_seed"],
                       train_subset=spec["train_subset"], test_subset=spec["test_subset"], device=dev,
                       args=spec.get("dataset_args"), python_path=spec.get("python_path", ()))
    log(f"data {spec['dataset']} {splits.sizes()} on {dev}")
    method = make_method(spec["method"], spec["params"])
    torch.manual_seed(spec["seed"])
    # a model with no first activation to split at (a ViT) trains whole with the methods that need no split
    model = build_model(spec["model"], splits.info, spec.get("model_args"), spec.get("python_path", ()),
                        split=method.needs_split).to(dev)
    precision = resolve_precision(spec["precision"], dev)
    model, channels_last = prefer_channels_last(model, precision)
    if spec["compile"]:
        # in place: state_dict keys and model.first stay as they are
        for part in ((model.first, model.rest) if isinstance(model, GaussNet) else (model,)):
            part.compile()
    log(f"precision {precision}{', channels_last' if channels_last else ''}{', compiled' if spec['compile'] else ''}")
    _set_pixel_sigma(method, spec, splits.info, log)
    g = torch.Generator(device=dev).manual_seed(spec["seed"])
    method.prepare(len(splits.train_x), tuple(splits.train_x.shape[1:]), g)
    opt = make_optimizer(spec, model.parameters())
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=spec["lr_patience"],
                                                       factor=spec["lr_factor"])
    state = {"epoch": 0, "best_val_loss": math.inf, "best_epoch": 0, "bad_epochs": 0, "train_time": 0.0,
             "threads": torch.get_num_threads(), "steps": 0, "images": {"clean": 0, "noisy": 0, "expected": 0},
             "cpu_time": 0.0, "gpu_time": 0.0 if dev.type == "cuda" else None}
    return Training(spec, dev, splits, model, method, g, opt, sched, precision, state)


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


def start_or_resume(t: Training, run: RunDir, resume: bool, log) -> bool:
    """Load last.pt into `t` when resuming (returns True), else start afresh: the previous
    model's outputs removed and a last.pt written at once. The state carries the run's cost
    so far (steps, passes, CPU and GPU seconds of finished epochs), so a resumed run reports
    the totals of an uninterrupted one; the time of an epoch cut short is not counted, as
    its work is redone."""
    last = run.last_checkpoint
    if not (resume and last.exists()):
        for f in (run.result_file, run.best_checkpoint):
            f.unlink(missing_ok=True)
        for f in run.certification_files():  # certificates of a model about to be replaced
            f.unlink(missing_ok=True)
        write_checkpoint(last, _training_state(t), t.spec)  # kill -9 leaves a last.pt
        return False
    try:
        saved = load_checkpoint(last, t.model, t.opt, t.sched)
    except Exception as e:  # noqa: BLE001 - truncated, foreign or tampered: all mean the same here
        raise RuntimeError(f"cannot resume from {last} ({type(e).__name__}: {str(e)[:200]}); "
                           "`gaussreg run --rerun` (or deleting last.pt) starts the run over") from None
    t.state.update(saved)
    if "steps" not in saved:  # a last.pt of a worker that counted no cost
        done = t.state["epoch"]  # an epoch's work is the same every epoch: exact for the epochs done
        t.state.update(steps=t.batches * done,
                       images={k: v * done for k, v in t.method.passes(len(t.splits.train_x)).items()},
                       cpu_time=None, gpu_time=None)  # times it did not measure stay unknown
    log(f"resumed from last.pt after epoch {t.state['epoch']}")
    # float sums depend on how work is split over threads: a bitwise-exact resume
    # needs the thread count the run started with, whatever this launch would use
    if t.state.get("threads") and t.state["threads"] != torch.get_num_threads():
        log(f"using {t.state['threads']} thread(s) as before the interruption (not {torch.get_num_threads()}), "
            "so the result equals an uninterrupted run")
        torch.set_num_threads(t.state["threads"])
    return True


def train(spec: dict, run: RunDir, resume: bool, should_stop, status, log) -> dict:
    """Train, evaluate and (with the spec's `certify`) certify one run; returns result.json's
    content. `status` takes phase and epoch updates (worker.Status)."""
    t_start = time.time()
    t = setup(spec, log)
    resuming = start_or_resume(t, run, resume, log)
    # started_at is this attempt's start: the readers add the epochs trained before it, so a
    # resumed run shows its whole training time (reader.training_time)
    status.update(time_before_s=t.state["train_time"] if resuming else 0.0)
    checkpoints = Checkpoints(run, checkpoint_every_s(), spec)
    events = Events(run.events_file, truncate=not resuming)
    try:
        events.emit("resume" if resuming else "start", epoch=t.state["epoch"], device=str(t.dev),
                    sizes=t.splits.sizes(), parameters=parameter_count(t.model))
        try:
            train_epochs(t, run, events, status, checkpoints, should_stop, log)
        except BaseException:
            # cancel, preemption, divergence or a crash: best.pt and last.pt get the last finished epoch
            try:
                if checkpoints.flush():
                    log(f"last.pt written (epoch {t.state['epoch']})")
            except Exception as e:  # noqa: BLE001 - the original error matters more
                log(f"could not write last.pt: {type(e).__name__}: {e}")
            raise
        checkpoints.flush()
        ev = _final_evaluation(t, run, status, should_stop, events)
        if spec.get("certify"):
            status.update(phase="certifying")
            with autocast(t.dev, t.precision):  # the classifier that was trained and evaluated
                _certify(spec, t.model, t.splits, run, should_stop, events, log)
    finally:
        events.close()
    return _result_record(t, run, ev, t_start)


def train_epochs(t: Training, run: RunDir, events: Events, status, checkpoints: Checkpoints, should_stop, log) -> None:
    """The epochs from t.state["epoch"] + 1 on: train, validate, schedule the LR and hand each
    finished epoch, and whether it is the best so far, to checkpoints; early stopping ends it. Per
    batch nothing reads back from the device but a progress event's loss. Phase and epoch
    reach status.json with its next heartbeat: two fsync'd writes per epoch cost more than a
    short GPU epoch's validation."""
    spec, model, method, opt, state = t.spec, t.model, t.method, t.opt, t.state
    B, batches = spec["batch_size"], t.batches
    passes = method.passes(len(t.splits.train_x))
    val_seed = spec["seed"] + 1_000_003
    # the progress clock runs across epochs: short epochs still give a progress event every PROGRESS_EVERY_S
    next_progress = time.monotonic() + PROGRESS_EVERY_S
    kernels_seen = {"kernels": [], "compile_error": None}
    for epoch in range(state["epoch"] + 1, spec["max_epochs"] + 1):
        if state["bad_epochs"] >= spec["early_stop"]:
            break
        status.note(epoch=epoch, phase="training")
        t0, c0 = time.time(), time.process_time()
        model.train()
        es = epoch_seed(spec["seed"], epoch)  # the epoch's randomness depends on (seed, epoch) only
        t.g.manual_seed(es)
        torch.manual_seed(es)
        perm = torch.randperm(len(t.splits.train_x) * method.copies, generator=t.g, device=t.dev)
        tally = EpochTally(method.term_names, batches, t.dev)
        for b in range(batches):
            if should_stop():
                raise Cancelled()
            t.step(perm[b * B:(b + 1) * B], tally)
            if time.monotonic() >= next_progress:  # one host sync per PROGRESS_EVERY_S, not per batch
                next_progress = time.monotonic() + PROGRESS_EVERY_S
                events.emit("progress", epoch=epoch, batch=b + 1, batches=batches, loss=tally.mean_loss())
        train, train_accuracy = tally.close(epoch)  # Diverged if a loss term went non-finite
        status.note(phase="validating")  # what the views say while no batch progresses
        val = evaluate(method, model, t.splits.val_x, t.splits.val_y, B, val_seed, t.precision)
        if not math.isfinite(val["loss"]):
            raise Diverged(epoch, "val_loss")
        t.sched.step(val["loss"])
        improved = val["loss"] < state["best_val_loss"]
        dt = time.time() - t0
        # new objects, never changed in place: checkpoints may hold this state's shallow copy
        state.update(epoch=epoch, train_time=state["train_time"] + dt, steps=state["steps"] + batches,
                     images={k: state["images"].get(k, 0) + v for k, v in passes.items()},
                     cpu_time=_plus(state["cpu_time"], time.process_time() - c0),
                     # GPU seconds: the epoch's wall on the GPU, which it holds until the
                     # epoch's end reads the losses back (None unless every epoch ran on one)
                     gpu_time=_plus(state["gpu_time"], dt) if t.dev.type == "cuda" else None)
        if improved:
            state.update(best_val_loss=val["loss"], best_epoch=epoch, bad_epochs=0, best_val_accuracy=val["accuracy"])
        else:
            state["bad_epochs"] += 1
        train_loss = train.pop("loss")
        events.emit("epoch", epoch=epoch, train_loss=train_loss, train_terms=train, train_accuracy=train_accuracy,
                    val_loss=val["loss"], val_ce=val["ce"], val_accuracy=val["accuracy"],
                    lr=opt.param_groups[0]["lr"], epoch_time=dt, images_per_s=tally.seen / dt, best=improved)
        checkpoints.epoch_end(t, improved)
        log(f"epoch {epoch}: train {train_loss:.4f} "
            f"val {val['loss']:.4f} acc {val['accuracy']:.4f} ({dt:.1f}s, {tally.seen / dt:.0f} img/s)")
        kernels = kernels_ran()
        if kernels != kernels_seen:  # a kernel switch changes the numbers: worker.log says when
            log(f"regularizer kernel: {', '.join(kernels['kernels'])}"
                + (f" (compiling failed: {kernels['compile_error']})" if kernels["compile_error"] else ""))
            kernels_seen = kernels


def _plus(total: Optional[float], x: float) -> Optional[float]:
    """A running total that stays unknown (None) once a part of it was not measured."""
    return None if total is None else total + x


class _Evaluation(NamedTuple):
    test: dict
    rob: object
    rob_time: float
    vrob: object
    val_images: int


def _final_evaluation(t: Training, run: RunDir, status, should_stop, events) -> _Evaluation:
    """The model with the best validation objective: test accuracy, then R on test and validation."""
    spec, seed, splits, model = t.spec, t.spec["seed"], t.splits, t.model
    load_checkpoint(run.best_checkpoint, model, None, None)
    status.update(phase="evaluating")
    test = evaluate(make_method("baseline", {}), model, splits.test_x, splits.test_y, spec["batch_size"], seed,
                    t.precision)
    rcfg = spec["robustness"]
    t0 = time.time()
    with autocast(t.dev, t.precision):  # R in the precision the model trained in (inference only)
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


def _result_record(t: Training, run: RunDir, ev: _Evaluation, t_start: float) -> dict:
    """result.json's content."""
    spec, state = t.spec, t.state
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
        "steps": state["steps"], "images": state["images"], "robustness_time_s": ev.rob_time,
        "wall_time_s": time.time() - t_start,
        "parameters": parameter_count(t.model), "device": str(t.dev), "device_name": device_name(t.dev),
        "precision": t.precision, "compile": spec["compile"],
        # what repeating the numbers bitwise needs besides the spec; regularizer_kernel: the
        # kernels of the regularizer's ReLU moments in the process that finished the run
        "repeatability": {**repeatability(t.dev), "regularizer_kernel": kernels_ran()["kernels"] or None,
                          "regularizer_compile_error": kernels_ran()["compile_error"]},
        # what packing runs on a GPU must fit: the caching allocator's peak (reserved) and the
        # tensors' peak (allocated) in the process that finished the run; None on a CPU
        "gpu_peak_memory": ({"reserved": torch.cuda.max_memory_reserved(t.dev),
                             "allocated": torch.cuda.max_memory_allocated(t.dev)} if t.dev.type == "cuda" else None),
        **({"pixel_sigma": list(t.method.pixel_sigma)} if t.method.pixel_sigma is not None else {}),
        "sizes": t.splits.sizes(), "host": socket.gethostname(),
        # what a constant classifier scores on each split: the fair table flags one (views.report)
        "constant_accuracy": {"val": constant_accuracy(t.splits.val_y), "test": constant_accuracy(t.splits.test_y)},
        "versions": {"gaussreg": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "finished_at": now_iso(),
    }


def _certify(spec, model, splits, run, should_stop, events, log) -> None:
    """The manifest's `certify` table: randomized-smoothing certificates of the best
    model after R; a stop request (SIGTERM) is honoured between images."""
    c = spec["certify"]
    log(f"certifying {c['images']} test images at sigma {c['sigma']:g} (n0 {c['n0']}, n {c['n']}, "
        f"alpha {c['alpha']:g})")
    cert = certify_run(run, model, splits.test_x, splits.test_y, c["sigma"], c["n0"], c["n"], c["alpha"],
                       c["images"], certify_batch(splits.test_x.device.type), seed=spec["seed"],
                       should_stop=should_stop)
    if cert is None:
        raise Cancelled()
    events.emit("certify", sigma=cert["sigma"], images=cert["images"], n=cert["n"],
                certified_accuracy=cert["certified_accuracy"], time_s=cert["time_s"])
    log("certified accuracy at radius 0/0.25/0.5: "
        + "/".join(f"{v:.4f}" for v in cert["certified_accuracy"].values()) + f" ({cert['time_s']:.1f}s)")
