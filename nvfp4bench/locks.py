"""Lock files: how grid workers on any number of hosts claim a cell exactly once.

    claim     O_CREAT | O_EXCL on <result stem>.lock holding pid, host, start time and a token
    stale     the holder's pid is dead on this host, or its heartbeat (the lock's mtime, refreshed
              every HEARTBEAT_S by the holder's Heartbeat thread) is older than --stale-after;
              a lock whose content cannot be parsed is stale only after UNREADABLE_GRACE_S
    break     serialised by a second O_EXCL file (``.lock.break``): the breaker re-reads the lock
              and removes it only if its bytes are still the stale ones it judged, so two workers
              breaking the same lock cannot remove a fresh lock that a third one just created
    release   only by the holder whose token the lock carries

Used by the grid (nvfp4bench.grid.cells, workers, slurm) and by a single cell run outside it
(``cell_lock``, nvfp4bench.train.run): one cell, one runner. It sits beside the shared
vocabulary because both training and the grid, which stands above training, take these locks.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from nvfp4bench.env import HOST, pid_alive

HEARTBEAT_S = 30.0  # a lock holder refreshes its lock's mtime this often
STALE_AFTER_S = 600.0  # a lock not refreshed for this long is stale (any host)
UNREADABLE_GRACE_S = 60.0  # a lock still empty/garbled this long after creation is stale
BREAK_GRACE_S = 60.0  # a leftover .break file (breaker crashed) older than this is removed


def log(msg: str) -> None:
    print(f"[grid] {msg}", flush=True)





def _age(path: Path) -> float:
    return time.time() - path.stat().st_mtime


def lock_is_stale(path: Path, stale_after: float = STALE_AFTER_S,
                  content: bytes | None = None) -> tuple[bool, str]:
    """(stale?, why). Stale: holder's pid dead on this host, or no heartbeat for stale_after s.

    A missing lock counts as stale ("gone"); a lock whose content cannot be parsed is stale only
    after UNREADABLE_GRACE_S (its creator may still be writing it).
    """
    try:
        age = _age(path)
        if content is None:
            content = path.read_bytes()
    except FileNotFoundError:
        return True, "gone"
    try:
        info = json.loads(content.decode())
        pid, host = int(info["pid"]), str(info["host"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        if age > UNREADABLE_GRACE_S:
            return True, f"unreadable lock, {age:.0f} s old"
        return False, "being written"
    if host == HOST and not pid_alive(pid):
        return True, f"pid {pid} on {host} is dead"
    if age > stale_after:
        return True, (f"no heartbeat for {age:.0f} s (> {stale_after:.0f} s) from pid {pid} "
                      f"on {host}")
    return False, f"held by pid {pid} on {host} since {info.get('started', '?')}"


def _break_stale(path: Path, seen: bytes, why: str) -> None:
    """Remove the stale lock ``path`` if it still holds the bytes ``seen`` (see module doc)."""
    brk = path.with_name(path.name + ".break")
    try:
        fd = os.open(brk, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if _age(brk) > BREAK_GRACE_S:  # its breaker crashed mid-way
                brk.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return
    try:
        os.close(fd)
        try:
            if path.read_bytes() != seen:  # re-claimed since we judged it: not ours to remove
                return
            path.unlink()
        except FileNotFoundError:
            return
        log(f"broke stale lock {path} ({why})")
    finally:
        brk.unlink(missing_ok=True)


@dataclass
class Lock:
    """A claim held by this process; refresh with heartbeat(), give up with release()."""

    path: Path
    token: str

    def heartbeat(self) -> None:
        try:
            os.utime(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Remove the lock file if it still carries our token."""
        try:
            info = json.loads(self.path.read_bytes().decode())
        except (OSError, ValueError, UnicodeDecodeError):
            return
        if info.get("token") == self.token:
            self.path.unlink(missing_ok=True)


def clear_stale(path: Path, stale_after: float = STALE_AFTER_S) -> None:
    """Remove ``path`` if it is a stale lock (e.g. a killed worker's, on a cell that completed)."""
    try:
        seen = path.read_bytes()
    except FileNotFoundError:
        return
    stale, why = lock_is_stale(path, stale_after, content=seen)
    if stale:
        _break_stale(path, seen, why)


def try_claim(path: Path, *, label: str = "", stale_after: float = STALE_AFTER_S,
              attempts: int = 3) -> Lock | None:
    """Create the lock ``path`` exclusively; None when a live holder has it.

    A stale lock is broken and the creation retried (at most ``attempts`` times).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    now = time.time()
    body = json.dumps({"pid": os.getpid(), "host": HOST, "token": token, "cell": label,
                       "started": _dt.datetime.fromtimestamp(now, _dt.timezone.utc)
                       .isoformat(timespec="seconds"), "started_unix": now}).encode()
    for _ in range(attempts):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                seen = path.read_bytes()
            except FileNotFoundError:
                continue  # released meanwhile: try again
            stale, why = lock_is_stale(path, stale_after, content=seen)
            if not stale:
                return None
            _break_stale(path, seen, why)
            continue
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        return Lock(path, token)
    return None


class Heartbeat:
    """One thread that refreshes the mtime of every lock this process holds."""

    def __init__(self, interval: float = HEARTBEAT_S):
        self.interval = interval
        self._held: dict[int, Lock] = {}
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="grid-heartbeat", daemon=True)
        self._thread.start()

    def add(self, lock: Lock) -> None:
        with self._mutex:
            self._held[id(lock)] = lock

    def remove(self, lock: Lock) -> None:
        with self._mutex:
            self._held.pop(id(lock), None)

    def held(self) -> list[Lock]:
        with self._mutex:
            return list(self._held.values())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for lock in self.held():
                lock.heartbeat()

    def stop(self) -> None:
        self._stop.set()


class CellBusy(RuntimeError):
    """Another live run holds this cell's lock."""


def holder(path: Path) -> dict | None:
    """The parsed lock at ``path`` (pid, host, started, ...), or None when it is missing or
    unreadable."""
    try:
        info = json.loads(path.read_bytes().decode())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


@contextlib.contextmanager
def cell_lock(path: Path, label: str, stale_after: float = STALE_AFTER_S):
    """Hold the cell lock ``path`` while one cell runs outside the grid: one cell, one runner.

    A lock held by this process or by its parent on this host is the grid's own claim for this
    very run (the grid starts each cell as a child, or runs it in process): the run goes on
    under it. Any other live holder refuses the run with ``CellBusy`` naming its pid, host and
    start. A stale lock is broken and claimed. The claim is refreshed by a heartbeat and
    released on exit.
    """
    info = holder(path)
    if (info is not None and info.get("host") == HOST
            and info.get("pid") in (os.getpid(), os.getppid())):
        yield None
        return
    lock = try_claim(path, label=label, stale_after=stale_after)
    if lock is None:
        info = holder(path) or {}
        raise CellBusy(f"{label}: another run of this cell is in progress (pid "
                       f"{info.get('pid', '?')} on {info.get('host', '?')} since "
                       f"{info.get('started', '?')}, lock {path}); wait for it to finish or "
                       f"stop it")
    beat = Heartbeat()
    beat.add(lock)
    try:
        yield lock
    finally:
        beat.stop()
        lock.release()
