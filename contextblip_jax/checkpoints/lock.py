"""One writer per workdir: a lock record `W/lock.json` that a training run holds while it writes there.

Two runs started on one workdir (a resubmitted job while the first still runs, a copy-pasted command) would
interleave their checkpoints and metrics, and either could resume from the other's state. A run takes the lock
before it writes anything and keeps it fresh with a heartbeat; a second run is refused with a message naming the
first. A lock left behind by a run that died is taken over: at once when its process is gone from this host or it
is an earlier run of the same requeued SLURM job, otherwise once its heartbeat is `stale_after_s` old.

The record lives in the same storage as the workdir, a local folder or `gs://BUCKET/PATH`, and is written through
tensorstore's kvstore (what Orbax writes arrays with) with storage generations: every write is conditional on the
generation last read ("must not exist" for a create), so of two runs racing for the lock exactly one write
succeeds, and a holder whose heartbeat no longer matches knows it was taken over. Cloud Storage enforces the
condition itself (`ifGenerationMatch`), and so does tensorstore's file driver, across threads and processes.

Only one process of a multi-process run should hold the lock (process 0); the caller decides which, this module
does not ask jax.

Imports: `files`.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from types import TracebackType
from typing import Any

import tensorstore as ts
from absl import logging

from contextblip_jax import files

LOCK_FILE = "lock.json"
_ATTEMPTS = 10
"""How many times `acquire` reads the lock again after losing a race for it before it gives up."""


class WorkdirLocked(RuntimeError):
    """Another live run holds the workdir: this one stops before writing anything there."""


class WorkdirLockLost(RuntimeError):
    """This run's lock was taken over by another run: this one stops before it writes another checkpoint."""


def kvstore_spec(workdir: str) -> dict[str, str]:
    """The tensorstore kvstore holding `workdir`'s top-level files: a local folder or `gs://BUCKET/PATH`."""
    location = files.resolve(workdir)  # refuses URLs other than gs://
    if not files.is_url(location):
        return {"driver": "file", "path": location + "/"}
    bucket, _, path = location.removeprefix("gs://").partition("/")
    if not bucket:
        raise ValueError(f"workdir {workdir!r}: a workdir is a local folder or gs://BUCKET/PATH")
    path = path.strip("/")
    return {"driver": "gcs", "bucket": bucket, "path": f"{path}/" if path else ""}


def _open(workdir: str) -> ts.KvStore:
    return ts.KvStore.open(kvstore_spec(workdir)).result()


def _parse(value: bytes) -> dict[str, Any] | None:
    """The holder record in `value`; None when it is not one (then the lock counts as stale)."""
    try:
        record = json.loads(value)
    except ValueError:
        return None
    fields = {"host": str, "pid": int, "heartbeat": (int, float), "token": str}
    if not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in fields.items()):
        return None
    return record


def _stored(kv: ts.KvStore) -> tuple[bool, dict[str, Any] | None, bytes]:
    """(whether a lock object exists, its holder record or None when it is not one, its storage generation)."""
    found = kv.read(LOCK_FILE).result()
    present = found.state == "value"
    return present, _parse(found.value) if present else None, found.stamp.generation


def holder(workdir: str) -> dict[str, Any] | None:
    """The record of the run holding `workdir`'s lock; None when none does (or the record is not one)."""
    return _stored(_open(workdir))[1]


def _iso(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).isoformat(timespec="seconds")


def _describe(record: dict[str, Any]) -> str:
    started = record.get("started_iso", "at an unknown time")
    return f"{record['host']} pid {record['pid']} (started {started})"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or a pid we may not signal: it exists
        return True
    return True


def _slurm() -> dict[str, Any]:
    """This process's SLURM job and how often SLURM requeued it, when it runs under SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    return {"slurm_job_id": job, "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}


class WorkdirLock:
    """Holds `W/lock.json` for this run from `acquire` to `release` (or as a context manager).

    A daemon thread rewrites the record every `heartbeat_s`, each time conditional on its own last write; when that
    fails another run has taken the lock over, and `check` (which the trainer calls before every checkpoint save)
    raises `WorkdirLockLost`. A failed heartbeat write (storage briefly unreachable) is logged and tried again at the
    next beat: the lock is only lost to someone else after `stale_after_s` without one.

    Take it in process 0 of a multi-process run only; the other processes share process 0's workdir and fate.
    """

    def __init__(self, workdir: str, stale_after_s: float = 120.0, heartbeat_s: float = 15.0):
        if not 0 < heartbeat_s < stale_after_s:
            raise ValueError(f"heartbeat_s={heartbeat_s} must be positive and below stale_after_s={stale_after_s}")
        self.workdir, self.stale_after_s, self.heartbeat_s = workdir, stale_after_s, heartbeat_s
        self._kv = _open(workdir)
        self._record: dict[str, Any] = {}
        self._generation = b""
        """The storage generation of this run's last write of the record."""
        self._lost: str | None = None
        """Why the lock is no longer this run's, once it is not."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return f"{self.workdir.rstrip('/')}/{LOCK_FILE}"

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> WorkdirLock:
        """Takes the lock, or raises `WorkdirLocked` naming the live run that holds it. Held already: a no-op; lost
        to another run: tries again like a new run would."""
        if self._thread is not None and self._lost is None:
            return self
        self.release()  # the finished heartbeat of a lock lost to another run
        now = time.time()
        token = uuid.uuid4().hex
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "started_iso": _iso(now)}
        mine |= {"heartbeat": now, "token": token, **_slurm(), "argv": sys.argv}
        for _ in range(_ATTEMPTS):
            present, current, generation = _stored(self._kv)
            if current is not None and current["token"] == token:  # our write landed though its answer was lost
                self._record, self._generation = current, generation
                break
            reason = self._takeover_reason(current) if present else None
            if present and reason is None:
                raise WorkdirLocked(self._locked_message(current))
            if self._write(mine, generation):
                if reason is not None:
                    old = "an unreadable record" if current is None else _describe(current)
                    logging.warning("%s: took over the lock from %s: %s", self.path, old, reason)
                break
        else:
            raise WorkdirLocked(f"{self.path}: other runs kept changing the lock in {_ATTEMPTS} tries; try again")
        self._lost = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock heartbeat {self.path}", daemon=True)
        self._thread.start()
        logging.info("%s: this run holds the lock", self.path)
        return self

    def check(self) -> None:
        """Raises `WorkdirLockLost` when another run has taken the lock over; reads the record to make sure."""
        if self._thread is None:
            raise RuntimeError(f"{self.path}: the lock is not held (acquire it first)")
        if self._lost is None:
            try:
                current, _ = self._read()
            except Exception as error:  # storage briefly unreachable: the heartbeat thread would have seen a takeover
                logging.warning("%s: could not read the lock to check it: %s", self.path, error)
            else:
                if not self._ours(current):
                    self._lose(current)
        if self._lost is not None:
            raise WorkdirLockLost(self._lost)

    def release(self) -> None:
        """Stops the heartbeat and deletes the record if it is still this run's; a no-op when not held."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._lost is not None:
            logging.warning("%s: not deleting the lock, which is no longer this run's: %s", self.path, self._lost)
            return
        try:
            if self._write(None, self._generation):
                return
            current, generation = self._read()  # a delete retried after it landed, a heartbeat's answer lost, or
            if not self._ours(current):  # a takeover since the last heartbeat
                if current is not None:
                    self._lose(current)
            elif not self._write(None, generation):
                logging.warning("%s: the lock changed while this run deleted it; left as it is", self.path)
        except Exception as error:  # a lock left behind is taken over later; the run's own error matters more
            logging.warning("%s: could not delete the lock: %s", self.path, error)

    def _write(self, record: dict[str, Any] | None, if_equal: bytes) -> bool:
        """Writes (or with None deletes) the record if its generation is still `if_equal`; False when it is not."""
        value = None if record is None else json.dumps(record, indent=1).encode() + b"\n"
        generation = self._kv.write(LOCK_FILE, value, if_equal=if_equal).result().generation
        if generation and record is not None:
            self._record, self._generation = record, generation
        return bool(generation)

    def _takeover_reason(self, current: dict[str, Any] | None) -> str | None:
        """Why the lock `current` holds may be taken over, or None when its holder may still be writing."""
        if current is None:
            return "its record is not a lock record"
        if current["host"] == socket.gethostname() and not _process_exists(current["pid"]):
            return f"its process {current['pid']} no longer exists"
        age = time.time() - current["heartbeat"]
        if age > self.stale_after_s:
            return f"its last heartbeat was {age:.0f} s ago, stale after {self.stale_after_s:g} s"
        slurm = _slurm()
        count = current.get("slurm_restart_count")
        job, restart = slurm.get("slurm_job_id"), slurm.get("slurm_restart_count")
        if job and current.get("slurm_job_id") == job and isinstance(count, int) and count < restart:
            return f"it is restart {count} of SLURM job {job}, which SLURM requeued as restart {restart}"
        return None

    def _locked_message(self, current: dict[str, Any]) -> str:
        age = time.time() - current["heartbeat"]
        stale_in = self.stale_after_s - age
        return (
            f"workdir {self.workdir} is in use by another run: {_describe(current)}, its last heartbeat {age:.0f} s "
            f"ago. It would count as stale after {self.stale_after_s:g} s without a heartbeat ({stale_in:.0f} s from "
            f"now if it has stopped). Stop the other run, or wait for it to end (or, if it died, for its lock to go "
            f"stale) and start this one again; {self.path} names the holder."
        )

    def _read(self) -> tuple[dict[str, Any] | None, bytes]:
        """The record as stored now (None when missing or not a lock record) and its generation."""
        _, current, generation = _stored(self._kv)
        return current, generation

    def _ours(self, current: dict[str, Any] | None) -> bool:
        return current is not None and current["token"] == self._record["token"]

    def _lose(self, current: dict[str, Any] | None) -> None:
        """Records that the lock is no longer this run's, naming who holds it now."""
        now = f"taken over by {_describe(current)}" if current else "removed or overwritten by something else"
        self._lost = f"{self.path}: this run's lock was {now}; another run may be writing to {self.workdir}"
        logging.error("%s", self._lost)

    def _beat(self) -> None:
        """The heartbeat thread: rewrites the record with a fresh `heartbeat` until released or taken over. A write
        refused although the record is still ours (a retried write that had landed) continues from its generation."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self._write({**self._record, "heartbeat": time.time()}, self._generation):
                    continue
                current, generation = self._read()
                if not self._ours(current):
                    self._lose(current)
                    return
                self._record, self._generation = current, generation
            except Exception as error:  # transient: the next beat tries again
                logging.warning("%s: could not write the lock's heartbeat: %s", self.path, error)
