"""The run store: one directory per run, the contract between processes.

The worker writes a run directory; the scheduler, the CLI and the TUI only read it
(plus the scheduler's initial spec.json/status.json). Files others read are
replaced atomically; events.jsonl is append-only and may end in a partial line."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

STATES = ("queued", "running", "completed", "failed", "cancelled", "interrupted", "diverged")
FINISHED = ("completed", "diverged")  # re-running a manifest leaves these alone
HEARTBEAT_S = 5.0  # the worker refreshes updated_at this often (contract: <= 10 s)
STALE_S = 30.0  # a running status older than this, with its pid gone, is interrupted


class RunFileError(Exception):
    """A run file is missing or corrupt; the message names the file."""


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


def atomic_write_bytes(path: os.PathLike, payload: bytes) -> None:
    """Temp file in the same directory, fsync, rename: readers see old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path):
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunFileError(f"{path} cannot be read ({e.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RunFileError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None


def read_events(path: Path, offset: int = 0) -> Tuple[List[dict], int]:
    """Complete lines from byte `offset` on, and the offset after the last complete
    line: a partial last line (a writer mid-line, or killed) is left for next time."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset
    events, used = parse_events(chunk)
    return events, offset + used


def parse_events(chunk: bytes) -> Tuple[List[dict], int]:
    """The events in the complete lines of `chunk`, and how many bytes those lines span."""
    end = chunk.rfind(b"\n") + 1
    events = []
    for line in chunk[:end].splitlines():
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn line from a crash mid-write; the run goes on after it
    return events, end


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


class RunDir:
    """One run's directory."""

    def __init__(self, path: os.PathLike):
        self.path = Path(path)

    @property
    def id(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    def spec(self) -> dict:
        s = read_json(self.file("spec.json"))
        if not isinstance(s, dict):
            raise RunFileError(f"{self.file('spec.json')} is missing or not a JSON object")
        return s

    def status(self) -> dict:
        s = read_json(self.file("status.json"))
        if s is None:
            return {"state": "queued"}
        if not isinstance(s, dict) or s.get("state") not in STATES:
            raise RunFileError(f"{self.file('status.json')} has no valid 'state'")
        return s

    def result(self) -> Optional[dict]:
        r = read_json(self.file("result.json"))
        if r is not None and not isinstance(r, dict):
            raise RunFileError(f"{self.file('result.json')} is not a JSON object")
        return r

    def events(self, offset: int = 0) -> Tuple[List[dict], int]:
        return read_events(self.file("events.jsonl"), offset)

    def tail(self) -> "EventTail":
        """A reader of this run's events that follows appends and notices a new file."""
        return EventTail(self)

    def epochs(self) -> List[dict]:
        """Epoch events, one per epoch: after a resume the later record of an epoch wins."""
        by_epoch = {}
        for e in self.events()[0]:
            if e.get("type") == "epoch":
                by_epoch[e.get("epoch")] = e
        return [by_epoch[k] for k in sorted(by_epoch, key=lambda k: (k is None, k))]

    def state(self, status: Optional[dict] = None) -> str:
        """The state a reader should believe: a 'running' run whose heartbeat is stale
        and whose process is gone reads as interrupted."""
        status = self.status() if status is None else status
        state = status.get("state", "queued")
        if state == "running":
            age = time.time() - (parse_iso(status.get("updated_at")) or 0)
            same_host = status.get("host") == socket.gethostname()
            gone = not pid_alive(status.get("pid")) if same_host else True
            if age > STALE_S and gone:
                return "interrupted"
            if same_host and gone and not self.locked():
                return "interrupted"  # died without a word; no need to wait for staleness
        return state

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.file("worker.log"), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def locked(self) -> bool:
        """Whether some process holds this run's lock (it is being trained)."""
        fd = try_lock(self)
        if fd is None:
            return True
        os.close(fd)
        return False

    def write_status(self, status: dict) -> None:
        atomic_write_json(self.file("status.json"), status)

    # certify-<sigma>.json: randomized-smoothing certificates (gaussreg.smoothing), one
    # file per noise level, written atomically by `gaussreg certify` or the worker

    @staticmethod
    def certification_name(sigma: float) -> str:
        return f"certify-{float(sigma):g}.json"

    def certification_files(self) -> List[Path]:
        return sorted(self.path.glob("certify-*.json"))

    def certifications(self) -> List[dict]:
        """Every certification of the run, by increasing sigma; RunFileError names a corrupt file."""
        out = []
        for f in self.certification_files():
            c = read_json(f)
            if not isinstance(c, dict) or not isinstance(c.get("per_image"), list) or "sigma" not in c:
                raise RunFileError(f"{f} is not a certification (no 'sigma' and 'per_image')")
            out.append(c)
        return sorted(out, key=lambda c: c["sigma"])

    def write_certification(self, cert: dict) -> Path:
        path = self.file(self.certification_name(cert["sigma"]))
        atomic_write_json(path, cert)
        return path


def try_lock(run: RunDir) -> Optional[int]:
    """An exclusive OS lock on the run (flock): held by whoever trains it, released by
    the kernel when that process dies, so a dead holder's lock is simply free."""
    try:
        fd = os.open(run.file("lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Store:
    """A folder of run directories (default ./runs)."""

    def __init__(self, root: os.PathLike = "runs"):
        self.root = Path(root)

    def runs(self) -> Iterator[RunDir]:
        if not self.root.is_dir():
            return
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and not p.name.startswith(("_", ".")) and (p / "spec.json").exists():
                yield RunDir(p)

    def get(self, run_id: str) -> RunDir:
        run = RunDir(self.root / run_id)
        if not (run.path / "spec.json").exists():
            matches = [r for r in self.runs() if r.id.startswith(run_id)]
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
        if not run.file("spec.json").exists():
            atomic_write_json(run.file("spec.json"), spec)
        if not run.file("status.json").exists():
            run.write_status({"state": "queued", "updated_at": now_iso(), "epoch": 0,
                              "max_epochs": spec.get("max_epochs")})
        return run

    def write_experiment(self, name: str, info: dict) -> None:
        """Experiment-level facts (tolerance, manifest) that are not part of any run."""
        d = self.root / "_experiments"
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / f"{name}.json", info)

    def experiment(self, name: str) -> dict:
        try:
            e = read_json(self.root / "_experiments" / f"{name}.json")
        except RunFileError:
            return {}
        return e if isinstance(e, dict) else {}


class EventTail:
    """Follows one run's events.jsonl from a byte offset, for every reader (CLI live view,
    TUI). A rerun starts the file anew (the scheduler deletes it, a fresh worker truncates
    it), possibly growing past the old offset before the next read: the tail notices by the
    file's identity and first line, restarts at 0 and says so, so readers drop what they had."""

    HEAD = 4096  # the first line (the start event) is far shorter

    def __init__(self, run: RunDir):
        self.path = run.file("events.jsonl")
        self.offset = 0
        self._ident = None

    def read(self) -> Tuple[List[dict], bool]:
        """(new complete events, restarted): restarted means the file is not the one read
        so far, and the events are from its beginning."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            restarted, self.offset, self._ident = self.offset > 0, 0, None
            return [], restarted
        with f:
            st = os.fstat(f.fileno())
            head = f.read(self.HEAD).split(b"\n", 1)[0]
            restarted = self.offset > 0 and ((st.st_dev, st.st_ino, head) != self._ident
                                             or st.st_size < self.offset)
            if restarted:
                self.offset = 0
            f.seek(self.offset)
            chunk = f.read()
        if self.offset == 0:
            head = chunk[:self.HEAD].split(b"\n", 1)[0]  # the first line as complete as this read has it
        events, used = parse_events(chunk)
        self.offset += used
        if self.offset:
            self._ident = (st.st_dev, st.st_ino, head)
        return events, restarted
