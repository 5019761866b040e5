"""The run store: one directory per run, the contract between processes.

Writers: the worker writes a run's progress, checkpoints and result; the scheduler and
gaussreg.launch.control create the run (spec.json, status.json), write its status around the
worker's life and delete its outputs before a retrain; gaussreg.launch.slurm writes status and
a cancel request; `gaussreg certify` adds certificate files; Store.remove (`gaussreg rm`,
the TUI's remove key) deletes whole runs. The CLI's views and the TUI otherwise only read.
Files others read are replaced atomically; events.jsonl is append-only and may end in a
partial line."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from gaussreg.science.methods import METHOD_CLASSES  # the parameter types a spec.json is checked against

STATES = ("queued", "running", "completed", "failed", "cancelled", "interrupted", "diverged")
# One palette for a state wherever it is shown (CLI tables and live view, the TUI), as Rich
# styles; "elsewhere"/"skipped" are the CLI's words for runs it does not start, "corrupt" the TUI's.
FINISHED = ("completed", "diverged")  # re-running a manifest leaves these alone
LIVE = ("queued", "running")  # states whose rows change without their status file changing
TERMINAL = ("completed", "failed", "diverged", "cancelled")  # no run leaves these by itself
HEARTBEAT_S = 5.0  # the worker refreshes updated_at this often (contract: <= 10 s)
STALE_S = 30.0  # a running status of another host older than this is interrupted
SKEW_S = 60.0  # a heartbeat dated further ahead than this comes from a clock that is wrong (another node's)
LOCK_TRIES = 3
# what a running worker is doing (status.json's "phase"), as the views name it
PHASES = {"training": "training", "validating": "validating", "evaluating": "evaluating R",
          "certifying": "certifying"}


def phase_of(status: dict) -> Optional[str]:
    """The phase of a running run in words ("validating", "evaluating R", ...); None when
    it is not running or its worker does not say (older workers)."""
    if status.get("state") != "running":
        return None
    return PHASES.get(status.get("phase"))


class RunFileError(Exception):
    """A run file is missing or corrupt; the message names the file."""


def hash_part(run_id: str) -> str:
    """The hash at the end of a run id (`exp-method-3fa2c1d9e0` -> `3fa2c1d9e0`, spec.run_id):
    the TUI's short id is its start, so Store.get takes a prefix of it too."""
    return run_id.rsplit("-", 1)[-1]


def short_id(run_id: str) -> str:
    """The hash part of a run id (`exp-method-3fa2c1d9e0` -> `3fa2c1`): unique enough to tell
    rows apart and to type as a prefix (`gaussreg show` takes the full id or a unique prefix)."""
    tail = hash_part(run_id)
    return tail[:6] if len(tail) >= 6 else run_id


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def parse_iso(s: Optional[str]) -> Optional[float]:
    try:
        return datetime.fromisoformat(s).timestamp() if s else None
    except (TypeError, ValueError):
        return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    try:  # Linux states it; asking os.umask would change it for a moment under other threads
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _remove_quietly(tmp: str) -> None:
    """Remove a temp file; one already gone (or unremovable) must not hide the error at hand."""
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _complete_temp(path: Path, payload: bytes) -> str:
    """A temp file beside `path` holding `payload`, fsynced, with the permissions a plain
    open() would give (0666 less the umask), not mkstemp's 0600: colleagues reading a
    shared store must see the runs. Removed again if writing fails (a full disk)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # first: the file is closed whatever fails next
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def atomic_write_bytes(path: os.PathLike, payload: bytes) -> None:
    """Temp file in the same directory, fsync, rename: readers see old or new, never half."""
    path = Path(path)
    tmp = _complete_temp(path, payload)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_create_json(path: os.PathLike, obj) -> bool:
    """Write a JSON file only if it does not exist, atomically: a complete temp file is
    hard-linked into place, which fails when the name exists, so a file another process
    wrote meanwhile (a worker's 'running' status) is never replaced. True if written."""
    path = Path(path)
    payload = (to_json(obj, indent=2, sort_keys=True) + "\n").encode()
    tmp = _complete_temp(path, payload)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            if os.path.lexists(path):  # a filesystem without hard links: check, then rename
                return False
            os.replace(tmp, path)
    finally:
        _remove_quietly(tmp)
    _fsync_dir(path.parent)
    return True


def finite(obj):
    """obj with every NaN/inf float replaced by None: JSON has no such numbers, and a
    file holding them is unreadable to strict readers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def to_json(obj, **kw) -> str:
    return json.dumps(finite(obj), allow_nan=False, **kw)


def atomic_write_json(path: os.PathLike, obj) -> None:
    atomic_write_bytes(path, (to_json(obj, indent=2, sort_keys=True) + "\n").encode())


def _reject_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


# Run files are opened without following a symbolic link (a run directory is data others
# wrote; following a link would read, or later overwrite, a file outside it) and without
# blocking: a FIFO or a device in place of a run file would otherwise hang the reader.
READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def open_plain(path: Path, flags: int = READ_FLAGS, mode: int = 0o666, follow: bool = False) -> int:
    """A file descriptor of `path`, which must be a regular file (checked on the open file,
    so it cannot be swapped in between). FileNotFoundError when it does not exist;
    RunFileError naming the file when it is a symbolic link (unless `follow`: a file the
    user names, like a manifest), a FIFO, a device, a folder or unreadable."""
    nofollow = 0 if follow else getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, (flags & ~getattr(os, "O_NOFOLLOW", 0)) | nofollow | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NONBLOCK", 0), mode)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunFileError(f"{path} is a symbolic link; run files must be plain files") from None
        if e.errno == errno.EISDIR:
            raise RunFileError(f"{path} is a folder, not a regular file") from None
        if e.errno in (errno.ENXIO, errno.ENODEV):  # a FIFO without a writer, a socket, an absent device
            raise RunFileError(f"{path} is not a regular file") from None
        raise RunFileError(f"{path} cannot be read ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RunFileError(f"{path} is {_kind(st.st_mode)}, not a regular file")
    return fd


def _kind(mode: int) -> str:
    return ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a special file")


# The most read of one file: what gaussreg writes is far smaller (a spec, a status or a result
# is a few kB; a certificate ~200 bytes per certified image), so a larger file is damage or
# an accident, and reading it whole would exhaust memory.
MAX_RUN_FILE = 4 << 20  # spec.json, status.json, result.json, _experiments, Slurm and launch records
MAX_CERTIFICATE = 64 << 20  # certify-*.json: 300,000 certified images
MAX_PLAN = 256 << 20  # a detached launch's plan holds every run's spec of the grid


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.0f} MB" if n >= 1 << 20 else f"{n} bytes"


def too_large(path, size: int, limit: int) -> str:
    return f"{path} is too large ({_mb(size)}; at most {_mb(limit)} is read)"


def read_bytes_nofollow(path: Path, limit: int = MAX_RUN_FILE, follow: bool = False) -> bytes:
    """A run file's bytes (open_plain: a regular file, not through a symbolic link unless
    `follow`); RunFileError when it holds more than `limit` bytes."""
    with os.fdopen(open_plain(path, follow=follow), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise RunFileError(too_large(path, size, limit))
        raw = f.read(size + 1)  # read(n) allocates n bytes: ask for what fstat says, plus one
        if len(raw) > size:  # it grew since fstat
            raw += f.read(limit + 1 - len(raw))
    if len(raw) > limit:
        raise RunFileError(too_large(path, len(raw), limit))
    return raw


def read_json(path: Path, limit: int = MAX_RUN_FILE):
    """The JSON value of a file, None when it does not exist; RunFileError (naming the
    file and what is wrong) for anything unreadable: not UTF-8, not JSON, NaN/Infinity,
    a symbolic link, a folder, a FIFO or a device, more than `limit` bytes."""
    try:
        raw = read_bytes_nofollow(path, limit)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunFileError(f"{path} cannot be read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RunFileError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise RunFileError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    except (ValueError, RecursionError) as e:
        raise RunFileError(f"{path} is not valid JSON ({e})") from None


# ---------------------------------------------------------------- shapes of run files
# Every reader gets its values through RunDir, which checks them here: a file of the
# wrong shape makes its run 'corrupt' with a reason instead of a KeyError elsewhere.

def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str(v) -> bool:
    return isinstance(v, str)


def _opt(check):
    return lambda v: v is None or check(v)


def _nums(v) -> bool:
    return isinstance(v, list) and all(_is_num(x) for x in v)


_KIND = {_is_num: "a finite number", _is_int: "an integer", _is_str: "a string", _nums: "a list of numbers"}


def _describe(check) -> str:
    return _KIND.get(check, "of another type")


# name -> (check, required)
SPEC_FIELDS = {"experiment": (_is_str, False), "dataset": (_is_str, True), "model": (_is_str, True),
               "method": (_is_str, True), "params": (lambda v: isinstance(v, dict), True),
               "seed": (_is_int, False), "max_epochs": (_is_int, True), "batch_size": (_is_int, False),
               "optimizer": (lambda v: isinstance(v, dict), False),
               "robustness": (lambda v: isinstance(v, dict) and _nums(v.get("sigmas", []))
                              and _is_int(v.get("samples", 1)), False)}
STATUS_FIELDS = {"state": (lambda v: v in STATES, True), "pid": (_opt(_is_int), False),
                 "host": (_opt(_is_str), False), "device": (_opt(_is_str), False),
                 "epoch": (_opt(_is_int), False), "max_epochs": (_opt(_is_int), False),
                 "error": (_opt(_is_str), False), "started_at": (_opt(_is_str), False),
                 "updated_at": (_opt(_is_str), False), "finished_at": (_opt(_is_str), False),
                 "time_before_s": (_opt(_is_num), False)}
RESULT_FIELDS = {"test_accuracy": (_is_num, True), "robustness": (_is_num, True),
                 "best_epoch": (_is_int, False), "epochs_run": (_is_int, False),
                 "best_val_accuracy": (_opt(_is_num), False), "wall_time_s": (_is_num, False),
                 "device_name": (_is_str, False), "sigmas": (_nums, False), "per_sigma": (_nums, False),
                 "accuracy_per_sigma": (_nums, False)}
CERTIFICATE_FIELDS = {"sigma": (lambda v: _is_num(v) and v > 0, True),
                      "per_image": (lambda v: isinstance(v, list) and all(
                          isinstance(i, dict) and _opt(_is_num)(i.get("radius")) for i in v), True)}
# what each event type must hold for the readers (show, live view, TUI) to use it
EVENT_FIELDS = {"epoch": {"epoch": _is_int, "train_loss": _is_num, "val_loss": _is_num, "val_accuracy": _is_num,
                          "lr": _is_num, "images_per_s": _is_num},
                "progress": {"epoch": _is_int, "loss": _is_num},
                "test": {"test_accuracy": _is_num, "robustness": _is_num, "sigmas": _nums, "per_sigma": _nums}}


def shape_error(obj, fields: dict) -> Optional[str]:
    """What is wrong with a JSON object against a field table, or None."""
    if not isinstance(obj, dict):
        return f"is not a JSON object (it is a JSON {type(obj).__name__})"
    for name, (check, required) in fields.items():
        if name not in obj:
            if required:
                return f"has no {name!r}"
            continue
        if not check(obj[name]):
            what = _describe(check)
            return f"has a bad {name!r} ({obj[name]!r:.60}" + (f"; must be {what})" if what != "of another type" else ")")
    return None


def _params_error(spec: dict) -> Optional[str]:
    if spec["method"] not in METHOD_CLASSES:
        return f"has an unknown method {spec['method']!r}"
    schema = METHOD_CLASSES[spec["method"]].schema
    for k, v in spec["params"].items():
        typ = schema[k].type if k in schema else None
        ok = {float: _is_num, int: _is_int, bool: lambda x: isinstance(x, bool), str: _is_str}.get(typ)
        if ok is None:  # a parameter this version does not know: at least a plain value
            ok = lambda x: isinstance(x, (bool, str)) or _is_num(x)  # noqa: E731
        if not ok(v):
            return f"has a bad parameter {k!r} ({v!r:.60})"
    return None


def valid_event(e) -> bool:
    """An events.jsonl record readers can use: an object with a 'type', and the fields
    of that type with the right types. Other lines are skipped like a torn line."""
    if not isinstance(e, dict) or not isinstance(e.get("type"), str):
        return False
    need = EVENT_FIELDS.get(e["type"], {})
    return all(k in e and check(e[k]) for k, check in need.items())


EVENT_CHUNK = 1 << 20  # events.jsonl is read in pieces this large: memory stays flat in its size
MAX_EVENT_LINE = 1 << 20  # an event is < 1 kB; a longer line is damage, skipped like a torn one


def _parse_event(line: bytes) -> Optional[dict]:
    if not line.strip():
        return None
    try:
        e = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None  # a torn line from a crash mid-write; the run goes on after it
    return e if valid_event(e) else None


def event_lines(f, offset: int = 0) -> Iterator[Tuple[Optional[dict], int]]:
    """(the valid event or None, the offset after its line) for each complete line of the
    open file `f` from byte `offset`, read piecewise; a partial last line is left for later."""
    f.seek(offset)
    buf, skipping = b"", False  # skipping: inside a line too long to be an event
    while True:
        piece = f.read(EVENT_CHUNK)
        if not piece:
            return
        buf += piece
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            e = None if skipping else _parse_event(buf[start:nl])
            skipping, start = False, nl + 1
            yield e, offset + start
        offset, buf = offset + start, buf[start:]
        if len(buf) > MAX_EVENT_LINE:
            offset, buf, skipping = offset + len(buf), b"", True


def collapse_progress(events: List[dict], e: dict) -> None:
    """Append `e`, but a progress event right after another replaces it: readers want only
    the latest, and a file of millions of batches must not become a list of millions."""
    if e.get("type") == "progress" and events and events[-1].get("type") == "progress":
        events[-1] = e
    else:
        events.append(e)


def read_events(path: Path, offset: int = 0) -> Tuple[List[dict], int]:
    """Complete lines from byte `offset` on, and the offset after the last complete
    line: a partial last line (a writer mid-line, or killed) is left for next time.
    Lines that are not valid events (torn by a crash, not UTF-8, not an object, a field
    missing) are skipped: the run's other events stay readable."""
    try:
        fd = open_plain(path)
    except (OSError, RunFileError):
        return [], offset  # none, a symbolic link, a FIFO, unreadable: no events, the status says the rest
    events = []
    with os.fdopen(fd, "rb") as f:
        for e, offset in event_lines(f, offset):
            if e is not None:
                events.append(e)
    return events, offset


def iter_events(path: Path) -> Iterator[dict]:
    """The valid events of a file one by one, read piecewise (the whole file's worth is
    never in memory)."""
    try:
        fd = open_plain(path)
    except (OSError, RunFileError):
        return
    with os.fdopen(fd, "rb") as f:
        for e, _ in event_lines(f):
            if e is not None:
                yield e


def last_event(path: Path, kind: str) -> Optional[dict]:
    """The last valid event of type `kind`, read backwards from the end piece by piece:
    `gaussreg show` needs the newest epoch, not the whole file."""
    try:
        fd = open_plain(path)
    except (OSError, RunFileError):
        return None
    with os.fdopen(fd, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        # rest: the end of a line that began before this piece; skipping: this piece's last
        # line is no event to read (the file's partial last line, or the start of one too long)
        rest, skipping = b"", True
        while end > 0:
            start = max(0, end - EVENT_CHUNK)
            f.seek(start)
            lines = (f.read(end - start) + rest).split(b"\n")
            rest = lines.pop(0) if start > 0 else b""
            if skipping and lines:
                lines.pop()
                skipping = False
            for line in reversed(lines):
                e = _parse_event(line)
                if e is not None and e["type"] == kind:
                    return e
            if len(rest) > MAX_EVENT_LINE:  # too long to be an event: skip the rest of it
                rest, skipping = b"", True
            end = start
    return None


_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)?|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None or "\r" in text


def strip_control(text: str) -> str:
    """Text without terminal escape sequences and control characters (a log line must
    not move the cursor, retitle the terminal or clear the screen of whoever reads it)."""
    return _CONTROL.sub("", text).replace("\r", "")


def pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours has exited for every purpose that matters here
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


# The files of a run directory, named here only (tests/test_contracts.py greps for them elsewhere)
SPEC_FILE = "spec.json"  # the resolved spec (gaussreg.runs.spec), written once
STATUS_FILE = "status.json"  # state, epoch, heartbeat; replaced atomically
EVENTS_FILE = "events.jsonl"  # one JSON object per line, appended by the worker
RESULT_FILE = "result.json"  # the trained run's test accuracy and robustness
LAST_CHECKPOINT = "last.pt"  # where an interrupted run resumes from
BEST_CHECKPOINT = "best.pt"  # the model of the best validation epoch, which is evaluated
WORKER_LOG = "worker.log"  # the worker's stdout and stderr
LOCK_FILE = "lock"  # flock'd by whoever trains the run (try_lock)
CANCEL_REQUEST = "cancel_requested"  # a Slurm run's cancel asked for before its worker started (gaussreg.launch.slurm)
CERTIFICATE_GLOB = "certify-*.json"
TRASH_PREFIX = ".trash-"  # a removed run directory, renamed at once, deleted after (Store.remove)


class RunDir:
    """One run's directory."""

    def __init__(self, path: os.PathLike):
        self.path = Path(path)

    @property
    def id(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    spec_file = property(lambda self: self.path / SPEC_FILE)
    status_file = property(lambda self: self.path / STATUS_FILE)
    events_file = property(lambda self: self.path / EVENTS_FILE)
    result_file = property(lambda self: self.path / RESULT_FILE)
    last_checkpoint = property(lambda self: self.path / LAST_CHECKPOINT)
    best_checkpoint = property(lambda self: self.path / BEST_CHECKPOINT)
    log_file = property(lambda self: self.path / WORKER_LOG)
    lock_file = property(lambda self: self.path / LOCK_FILE)
    cancel_request = property(lambda self: self.path / CANCEL_REQUEST)

    def check_dir(self) -> None:
        """RunFileError unless the run directory is a real folder: through a symbolic link
        every reader and writer would work on the link's target, outside the store
        (O_NOFOLLOW guards only a path's last component). One not made yet passes."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise RunFileError(f"run directory {self.path} cannot be read ({e.strerror})") from None
        if stat.S_ISLNK(st.st_mode):
            raise RunFileError(f"run directory {self.path} is a symbolic link; a run directory must be a "
                               "real folder inside the store")
        if not stat.S_ISDIR(st.st_mode):
            raise RunFileError(f"run directory {self.path} is not a folder")

    def check_is_run(self) -> None:
        """RunFileError unless this is a run directory: a real folder holding spec.json.
        Whoever trains a directory asks first, and writes nothing into any other folder."""
        self.check_dir()
        if not self.path.is_dir():
            raise RunFileError(f"{self.path} is not a run directory (no such folder)")
        if not os.path.lexists(self.spec_file):
            raise RunFileError(f"{self.path} is not a run directory (it holds no {SPEC_FILE})")

    def spec(self) -> dict:
        self.check_dir()
        path = self.spec_file
        s = read_json(path)
        if s is None:
            raise RunFileError(f"{path} is missing")
        why = shape_error(s, SPEC_FIELDS) or _params_error(s)
        if why:
            raise RunFileError(f"{path} {why}")
        return s

    def status(self) -> dict:
        self.check_dir()
        path = self.status_file
        s = read_json(path)
        if s is None:
            return {"state": "queued"}
        why = shape_error(s, STATUS_FIELDS)
        if why:
            raise RunFileError(f"{path} {why}")
        return s

    def result(self) -> Optional[dict]:
        self.check_dir()
        path = self.result_file
        r = read_json(path)
        why = None if r is None else shape_error(r, RESULT_FIELDS)
        if why:
            raise RunFileError(f"{path} {why}")
        return r

    def events(self, offset: int = 0) -> Tuple[List[dict], int]:
        try:
            self.check_dir()
        except RunFileError:
            return [], offset  # the spec says it is corrupt; its events are not its own
        return read_events(self.events_file, offset)

    def last_epoch(self) -> Optional[dict]:
        """The newest epoch event, read from the end of the file."""
        return last_event(self.events_file, "epoch")

    def tail(self) -> "EventTail":
        """A reader of this run's events that follows appends and notices a new file."""
        return EventTail(self)

    def epochs(self) -> List[dict]:
        """Epoch events, one per epoch: after a resume the later record of an epoch wins."""
        by_epoch = {}
        for e in iter_events(self.events_file):  # piecewise: a file of millions of batches is never held whole
            if e.get("type") == "epoch":
                by_epoch[e.get("epoch")] = e
        return [by_epoch[k] for k in sorted(by_epoch, key=lambda k: (k is None, k))]

    def state(self, status: Optional[dict] = None) -> str:
        """The state a reader should believe. A 'running' run on this host is running only
        while some process holds its lock (the worker takes it before it writes 'running'
        and holds it until it exits, after its last status): a free lock means it died
        without a word, whatever process has its pid now (pids are reused). On another
        host (a Slurm node; flock is not trusted across nodes) a stale heartbeat says it."""
        status = self.status() if status is None else status
        state = status.get("state", "queued")
        if state != "running":
            return state
        if status.get("host") == socket.gethostname():
            held = self.lock_held()
            if held is None:  # the lock cannot be read: the pid and the heartbeat must do
                age = self.heartbeat_age(status)
                return "interrupted" if age > STALE_S and not pid_alive(status.get("pid")) else state
            if held:
                return state
            try:  # the worker may have written its last status and exited since `status` was read
                now = self.status()
            except RunFileError:
                return "interrupted"
            return "interrupted" if now.get("state") == "running" else now.get("state", "queued")
        return "interrupted" if self.heartbeat_age(status) > STALE_S else state

    def heartbeat_age(self, status: dict) -> float:
        """Seconds since the worker last showed life. `updated_at` is the worker's clock: one
        more than SKEW_S ahead of ours (clock skew between nodes) proves nothing, so then the
        status file's modification time (the shared filesystem's clock) stands in for it,
        and when that is in the future too, nothing says the worker lives."""
        now = time.time()
        beat = parse_iso(status.get("updated_at")) or 0
        if beat - now <= SKEW_S:
            return now - beat
        try:
            mtime = os.stat(self.status_file, follow_symlinks=False).st_mtime
        except OSError:
            return math.inf
        return now - mtime if mtime - now <= SKEW_S else math.inf

    def heartbeat_note(self, status: dict) -> Optional[str]:
        """A sentence when the run's heartbeat is dated in the future (see heartbeat_age), else None."""
        ahead = (parse_iso(status.get("updated_at")) or 0) - time.time()
        if ahead <= SKEW_S:
            return None
        span = f"{ahead:.0f} s" if ahead < 120 else f"{ahead / 60:.0f} min" if ahead < 7200 else f"{ahead / 3600:.1f} h"
        return (f"its heartbeat is dated {span} in the future (clock skew between nodes?), so it is not trusted: "
                "the status file's own time tells whether the worker still writes")

    def log_tail(self, lines: int = 20) -> str:
        try:
            self.check_dir()
            fd = open_plain(self.log_file)
        except (OSError, RunFileError):
            return ""  # none yet, a symbolic link, a FIFO, a linked run directory: nothing we should show
        with os.fdopen(fd, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
        return "\n".join(strip_control(line) for line in text.splitlines()[-lines:])

    def lock_held(self) -> Optional[bool]:
        """Whether some process holds this run's lock (it is being trained); None when the
        lock file cannot be probed (unreadable, a directory, a symbolic link). The probe
        takes a shared lock for an instant, read-only and without creating the file, so it
        works on a read-only shared store; try_lock retries past such a probe."""
        try:
            fd = open_plain(self.lock_file)
        except FileNotFoundError:
            return False  # every trainer creates it before it says 'running'
        except (OSError, RunFileError):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
        finally:
            os.close(fd)  # closing releases the probe's lock
        return False

    def write_status(self, status: dict) -> None:
        self.check_dir()
        atomic_write_json(self.status_file, status)

    # certify-<sigma>.json: randomized-smoothing certificates (gaussreg.science.smoothing), one
    # file per noise level, written atomically by `gaussreg certify` or the worker

    @staticmethod
    def certification_name(sigma: float) -> str:
        return f"certify-{float(sigma):g}.json"

    def certification_files(self) -> List[Path]:
        return sorted(self.path.glob(CERTIFICATE_GLOB))

    def certifications(self, problems: Optional[List[str]] = None) -> List[dict]:
        """Every readable certification of the run, by increasing sigma. A malformed file
        is skipped, and why is appended to `problems` (the run's other certificates, and
        every other run, stay readable); RunFileError only for a run directory that is a link."""
        self.check_dir()
        out = []
        for f in self.certification_files():
            try:
                c = read_json(f, MAX_CERTIFICATE)
                why = None if c is None else shape_error(c, CERTIFICATE_FIELDS)  # None: removed meanwhile
                if why:
                    raise RunFileError(f"{f} {why}")
            except RunFileError as e:
                if problems is not None:
                    problems.append(f"{e}; skipped")
                continue
            if c is not None:
                out.append(c)
        return sorted(out, key=lambda c: c["sigma"])

    def write_certification(self, cert: dict) -> Path:
        self.check_dir()
        path = self.file(self.certification_name(cert["sigma"]))
        atomic_write_json(path, cert)
        return path

    def forget_results(self) -> None:
        """Forget a finished run's results (keep its spec) so that it trains afresh."""
        self.check_dir()
        for f in (self.result_file, self.events_file, self.best_checkpoint, self.last_checkpoint):
            f.unlink(missing_ok=True)


def try_lock(run: RunDir) -> Optional[int]:
    """An exclusive OS lock on the run (flock): held by whoever trains it, released by
    the kernel when that process dies, so a dead holder's lock is simply free."""
    run.check_dir()
    try:
        fd = open_plain(run.lock_file, os.O_RDWR | os.O_CREAT)
    except FileNotFoundError:
        return None
    except RunFileError as e:  # a folder, a symbolic link, a FIFO, no permission: this run cannot be trained
        raise RunFileError(f"{run.lock_file} cannot be used as a lock file: {e}") from None
    for attempt in range(LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if attempt + 1 < LOCK_TRIES:
                time.sleep(0.01)  # a reader's probe (RunDir.lock_held) holds it for microseconds
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS: the filesystem has no flock (Lustre without -o flock)
            os.close(fd)
            raise RunFileError(no_locks_message(run.path.parent, e)) from None
    os.close(fd)
    return None


def no_locks_message(where: Path, e: OSError) -> str:
    return (f"the store {where} is on a filesystem without file locks (flock: {e.strerror or e}); gaussreg needs "
            "them so that two processes never train one run: put the store on a local disk, or mount the "
            "filesystem with the flock option (Lustre: -o flock)")


def check_locking(root: Path) -> Optional[str]:
    """None when flock works in the store folder, else one sentence saying it does not."""
    try:
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None  # an unreadable folder is reported by whoever reads it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        pass  # someone holds it exclusively: locks work
    except OSError as e:
        return no_locks_message(root, e)
    finally:
        os.close(fd)
    return None


# A launch (a scheduler: `gaussreg run` in the foreground or detached, the TUI's launches)
# holds STORE/_launches/<host>@<pid>.<ns>.live locked (flock) while it runs. A queued run of
# the local backend with no live launch in its store will never start (its launch was stopped
# by Ctrl-C before it got to it): the readers say "not launched", and `gaussreg rm` may remove it.
LAUNCHES_DIR = "_launches"
LIVE_LAUNCH = ".live"
LIVE_CACHE_S = 1.0  # the readers ask per queued run; the answer is kept this long (or until a launch comes or goes)
_live_cache: dict = {}


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())


def launch_alive(root: os.PathLike) -> bool:
    """Whether some launch of the store at `root` is running. A launch of another host counts
    as alive (flock is not trusted across nodes); one of this host, while its file is locked."""
    d = Path(root) / LAUNCHES_DIR
    try:
        mtime = os.stat(d).st_mtime_ns  # a launch's file made or removed changes it
    except OSError:
        return False
    now, hit = time.monotonic(), _live_cache.get(str(d))
    if hit and hit[0] == mtime and now - hit[1] < LIVE_CACHE_S:
        return hit[2]
    alive, mine = False, _host_tag() + "@"
    for p in d.glob("*" + LIVE_LAUNCH):
        if not p.name.startswith(mine):
            alive = True
            break
        try:
            fd = open_plain(p)
        except (OSError, RunFileError):
            continue  # removed meanwhile: that launch ended
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # held (BlockingIOError), or no way to tell: believe it runs
            alive = True
            break
        finally:
            os.close(fd)
    _live_cache[str(d)] = (mtime, now, alive)
    return alive


def not_launched(status: dict, state: str, root: os.PathLike) -> bool:
    """A queued run that nothing will start: of the local backend (Slurm starts its own), with
    no launch of its store running."""
    return state == "queued" and status.get("backend") != "slurm" and not launch_alive(root)


class Store:
    """A folder of run directories (default ./runs)."""

    def __init__(self, root: os.PathLike = "runs"):
        self.root = Path(root)

    def runs(self) -> Iterator[RunDir]:
        if not self.root.is_dir():
            return
        for p in sorted(self.root.iterdir()):
            # lexists: a spec.json that is a broken link is a corrupt run, not no run
            if p.is_dir() and not p.name.startswith(("_", ".")) and os.path.lexists(p / SPEC_FILE):
                yield RunDir(p)

    @staticmethod
    def _gpu_place_name(gpu: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "_", gpu)

    def gpu_places_made(self, gpu: str) -> int:
        """How many places on `gpu` the launches of this store have made (the largest
        --per-gpu used with it); 0 when none has."""
        name = self._gpu_place_name(gpu)
        ks = [p.name[len(name) + 1:-len(".lock")] for p in (self.root / "_gpus").glob(f"{glob.escape(name)}.*.lock")]
        return max((int(k) + 1 for k in ks if k.isdigit()), default=0)

    def lock_gpu_share(self, gpu: str, shares: int) -> Optional[int]:
        """One of the `shares` places on `gpu` (its canonical name, scheduler.canonical_gpu),
        locked (flock on STORE/_gpus/<gpu>.<k>.lock) for every scheduler of this store, so --per-gpu
        K holds across launches: the fd of the first free one, passed to the worker that holds
        it until it exits; None when all are taken."""
        d = self.root / "_gpus"
        d.mkdir(parents=True, exist_ok=True)
        name = self._gpu_place_name(gpu)
        for k in range(shares):
            path = d / f"{name}.{k}.lock"
            try:
                fd = open_plain(path, os.O_RDWR | os.O_CREAT)
            except (OSError, RunFileError) as e:
                raise RunFileError(f"{path} cannot be used as a lock file: {e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except OSError as e:
                os.close(fd)
                raise RunFileError(no_locks_message(self.root, e)) from None
            return fd
        return None

    def get(self, run_id: str) -> RunDir:
        # a run id is a name inside the store, never a path out of it
        plain = run_id and "/" not in run_id and "\0" not in run_id and not run_id.startswith((".", "_"))
        run = RunDir(self.root / run_id) if plain else None
        if run is None or not os.path.lexists(run.spec_file):
            # a unique prefix of the id, or of its hash part (the short id the TUI shows)
            matches = [r for r in self.runs() if r.id.startswith(run_id)
                       or hash_part(r.id).startswith(run_id)] if plain else []
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise RunFileError(f"run id {run_id!r} is ambiguous in {self.root}: "
                                   + ", ".join(r.id for r in matches[:5]))
            raise RunFileError(f"no run {run_id!r} in store {self.root}")
        return run

    def create(self, spec: dict, run_id: str) -> RunDir:
        """A new run directory with its spec and a queued status (both atomic)."""
        run = RunDir(self.root / run_id)
        run.path.mkdir(parents=True, exist_ok=True)
        run.check_dir()  # mkdir accepts a symbolic link to a folder
        # temp files of a writer killed mid-write (SIGKILL gives no chance to clean up);
        # a minute old: no live writer is still on them
        for tmp in run.path.glob(".*.tmp"):
            try:
                if time.time() - tmp.lstat().st_mtime > 60:
                    tmp.unlink()
            except OSError:
                pass
        # create-if-absent: another scheduler's worker may be writing this run already
        if not os.path.lexists(run.spec_file):
            atomic_create_json(run.spec_file, spec)
        if not os.path.lexists(run.status_file):
            atomic_create_json(run.status_file, {"state": "queued", "updated_at": now_iso(), "epoch": 0,
                                                         "max_epochs": spec.get("max_epochs")})
        return run

    def hold_launch(self) -> Tuple[int, Path]:
        """Mark a launch as running until release_launch (or its process's death): its queued
        runs then read as waiting, not as not launched (see launch_alive). Files that launches
        of this host killed without a word left behind are removed."""
        d = self.root / LAUNCHES_DIR
        d.mkdir(parents=True, exist_ok=True)
        mine = _host_tag() + "@"
        for old in d.glob(glob.escape(mine) + "*" + LIVE_LAUNCH):
            try:
                fd = open_plain(old, os.O_RDWR)
            except (OSError, RunFileError):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                old.unlink()  # locked by us: its launch is dead, and no one else reopens its file
            except OSError:
                pass
            finally:
                os.close(fd)
        path = d / f"{mine}{os.getpid()}.{time.time_ns()}{LIVE_LAUNCH}"
        _live_cache.clear()  # this process's own answer changes now, whatever the folder's time says
        fd = open_plain(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise RunFileError(no_locks_message(self.root, e)) from None
        return fd, path

    @staticmethod
    def release_launch(held: Tuple[int, Path]) -> None:
        fd, path = held
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        _live_cache.clear()

    def removal_refused(self, run: RunDir) -> Optional[str]:
        """Why `run` must not be removed now (one sentence), or None: a running run's worker
        and a queued run's launch would write into a directory that is gone (a queued run that
        was never launched, whose launch has ended, may go)."""
        try:
            status = run.status()
            state = run.state(status)
        except RunFileError:
            return None  # corrupt: nothing trains it
        if state == "running":
            return f"run {run.id} is running: cancel it first (`gaussreg cancel {run.id}`), then remove it"
        if state == "queued" and not not_launched(status, state, self.root):
            return (f"run {run.id} is queued: a launch will start it; stop that launch (or cancel the run) "
                    "first, then remove it")
        return None

    def remove(self, run: RunDir) -> None:
        """Delete a run directory with all it holds (checkpoints, certificates, events, log).
        RunFileError (one sentence) while it is queued or running. Nothing is half-removed:
        the directory is first renamed to a hidden trash name in the store (one atomic rename,
        so every reader sees the run whole or not at all), and the trash is deleted after;
        trash left by a removal cut short is deleted by the next one."""
        if run.path.parent != self.root or run.id.startswith((".", "_")) or not run.id:
            raise RunFileError(f"{run.path} is not a run directory of store {self.root}")
        trash = self.root / f"{TRASH_PREFIX}{run.id}.{os.getpid()}.{time.time_ns()}"
        if os.path.islink(run.path):  # the link goes, never what it points to
            os.rename(run.path, trash)
            os.unlink(trash)
            return
        why = self.removal_refused(run)  # read before the lock is ours: holding it makes a run look alive
        if why:
            raise RunFileError(why)
        fd = try_lock(run)  # no worker starts while it is held; one holding it is training the run
        if fd is None:
            raise RunFileError(f"run {run.id} is being trained by another process: cancel it first, then remove it")
        try:
            os.rename(run.path, trash)
        finally:
            os.close(fd)
        _fsync_dir(self.root)
        for old in self.root.glob(glob.escape(TRASH_PREFIX) + "*"):
            shutil.rmtree(old, ignore_errors=old != trash)  # another removal's trash may be going meanwhile

    def write_experiment(self, name: str, info: dict) -> None:
        """Experiment-level facts (tolerance, manifest) that are not part of any run."""
        d = self.root / "_experiments"
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / f"{name}.json", info)

    def experiment(self, name: str) -> dict:
        """The experiment's facts; when its file is unreadable or its tolerance is not a
        fraction, {'error': why} (readers then use the default tolerance and say so)."""
        path = self.root / "_experiments" / f"{name}.json"
        try:
            e = read_json(path)
        except RunFileError as err:
            return {"error": str(err)}
        if e is None:
            return {}
        if not isinstance(e, dict):
            return {"error": f"{path} is not a JSON object"}
        tol = e.get("tolerance", 0.0)
        if not (_is_num(tol) and 0 <= tol <= 1):
            return {k: v for k, v in e.items() if k != "tolerance"} | {
                "error": f"{path} has a bad 'tolerance' ({tol!r:.40}; must be a fraction in [0, 1])"}
        return e


class EventTail:
    """Follows one run's events.jsonl from a byte offset, for every reader (CLI live view,
    TUI). A rerun starts the file anew (the scheduler deletes it, a fresh worker truncates
    it), possibly growing past the old offset before the next read: the tail notices by the
    file's identity and first line, restarts at 0 and says so, so readers drop what they had."""

    HEAD = 4096  # the first line (the start event) is far shorter

    def __init__(self, run: RunDir):
        self.run, self.path = run, run.events_file
        self.offset = 0
        self._ident = None

    def read(self) -> Tuple[List[dict], bool]:
        """(new complete events, restarted): restarted means the file is not the one read
        so far, and the events are from its beginning."""
        try:
            self.run.check_dir()
        except RunFileError:
            return [], False  # a run directory that is a link: its events are not the run's
        try:
            fd = open_plain(self.path)
        except FileNotFoundError:
            restarted, self.offset, self._ident = self.offset > 0, 0, None
            return [], restarted
        except (OSError, RunFileError):
            return [], False  # a symbolic link, a FIFO, unreadable: no events (as read_events)
        events: List[dict] = []
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            head = f.read(self.HEAD).split(b"\n", 1)[0]
            restarted = self.offset > 0 and ((st.st_dev, st.st_ino, head) != self._ident
                                             or st.st_size < self.offset)
            if restarted:
                self.offset = 0
            fresh = self.offset == 0
            for e, self.offset in event_lines(f, self.offset):
                if e is not None:
                    collapse_progress(events, e)
            if fresh:  # the first line as complete as this read has it
                head = os.pread(f.fileno(), self.HEAD, 0).split(b"\n", 1)[0]
        if self.offset:
            self._ident = (st.st_dev, st.st_ino, head)
        return events, restarted
