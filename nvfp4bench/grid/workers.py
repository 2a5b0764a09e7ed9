"""The local grid: worker threads that claim, run and release cells; scheduling and progress.

``run_grid(targets, envs)`` runs every target that is not done with one worker thread per
environment (``worker_envs``: ``--jobs`` workers per GPU of ``--gpus``, each with its own
``CUDA_VISIBLE_DEVICES``). A worker claims a cell's lock (nvfp4bench.locks), checks again that it
is not done, runs it (``--resume`` when it left a checkpoint of its config) and releases the lock;
cells held by other workers are retried every ``POLL_S`` until done or claimable (unless
``wait=False``). An interrupt stops the running cells and releases every lock
(``signals_deferred`` keeps a second signal from cutting that short). The ``Summary`` says what
this invocation saw.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from nvfp4bench.grid.cells import Target, can_resume, is_done
from nvfp4bench.locks import (HEARTBEAT_S, STALE_AFTER_S, Heartbeat, clear_stale, log,
                                   try_claim)
from nvfp4bench.grid.process import PROCESSES, CellRunner, child_env, run_cell_subprocess

POLL_S = 10.0  # how often a worker looks again at cells held by other workers


@dataclass
class Summary:
    """What one grid invocation saw."""

    total: int
    already: int = 0  # complete before this invocation started
    ran: int = 0  # completed by this invocation
    elsewhere: int = 0  # completed meanwhile by another worker (process or host)
    failed: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)  # held by live workers elsewhere (--no-wait)
    seconds: list[float] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.already + self.ran + self.elsewhere

    @property
    def remaining(self) -> int:
        return self.total - self.done - len(self.failed) - len(self.held)


class _Scheduler:
    """Hands each target to one worker thread; cells held elsewhere are retried every poll_s."""

    def __init__(self, targets: Iterable[Target], *, wait: bool, poll_s: float):
        self.pending = deque(targets)
        self.deferred: list[Target] = []
        self.last_requeue = time.monotonic()
        self.wait = wait
        self.poll_s = poll_s
        self.stop = threading.Event()
        self.cond = threading.Condition()

    def take(self) -> Target | None:
        """The next target, or None when nothing is left for this worker.

        Cells held elsewhere go back into the queue at most once per poll_s (not on every
        wake-up, which would spin), until they are done or their locks can be claimed.
        """
        with self.cond:
            while not self.stop.is_set():
                if self.pending:
                    return self.pending.popleft()
                if not self.deferred or not self.wait:
                    return None
                due = self.last_requeue + self.poll_s
                now = time.monotonic()
                if now >= due:
                    self.pending.extend(self.deferred)
                    self.deferred.clear()
                    self.last_requeue = now
                    continue
                self.cond.wait(due - now)
            return None

    def defer(self, target: Target) -> None:
        with self.cond:
            self.deferred.append(target)

    def halt(self) -> None:
        self.stop.set()
        with self.cond:
            self.cond.notify_all()


def worker_envs(gpus: Sequence[str] | None, jobs: int, base: dict | None = None) -> list[dict]:
    """One environment per worker: ``jobs`` workers per GPU (or on the one device).

    When several workers run and OMP_NUM_THREADS is unset, each gets cores / workers intra-op
    threads, so concurrent cells do not oversubscribe the CPU cores.
    """
    base = dict(os.environ if base is None else base)
    workers = len(gpus or [None]) * jobs
    extra: dict[str, str] = {}
    if workers > 1 and "OMP_NUM_THREADS" not in base:
        extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    if not gpus:
        return [child_env(base, **extra) for _ in range(jobs)]
    return [child_env(base, CUDA_VISIBLE_DEVICES=str(g), **extra)
            for g in gpus for _ in range(jobs)]


def run_grid(targets: Sequence[Target], envs: Sequence[dict], *,
             runner: CellRunner = run_cell_subprocess, stale_after: float = STALE_AFTER_S,
             heartbeat_s: float = HEARTBEAT_S, poll_s: float = POLL_S,
             wait: bool = True) -> Summary:
    """Run every target that is not done, one per worker environment at a time.

    Returns the Summary; cells whose runs ended without a complete result are in
    ``summary.failed`` (the next invocation retries them, with --resume when they left a
    checkpoint).
    """
    summary = Summary(total=len(targets))
    todo = []
    for t in targets:
        if is_done(t):
            summary.already += 1
            clear_stale(t.lock, stale_after)
        else:
            todo.append(t)
    log(f"{summary.total} cells: {summary.already} complete, {len(todo)} to run, "
        f"{len(envs)} worker{'s' if len(envs) != 1 else ''}")
    sched = _Scheduler(todo, wait=wait, poll_s=poll_s)
    beat = Heartbeat(heartbeat_s)
    mutex = threading.Lock()
    t0 = time.time()

    def report(target: Target, what: str, seconds: float | None = None) -> None:
        with mutex:
            if what == "complete":
                summary.ran += 1
                summary.seconds.append(seconds)
            elif what == "failed":
                summary.failed.append(target.cell.label)
            elif what == "elsewhere":
                summary.elsewhere += 1
            mean = (sum(summary.seconds) / len(summary.seconds)) if summary.seconds else None
            tail = f" in {seconds:.1f} s" if seconds is not None else ""
            rate = f", {mean:.1f} s/cell" if mean is not None else ""
            log(f"{target.cell.label} {what}{tail} | {summary.done}/{summary.total} done, "
                f"{len(summary.failed)} failed, {summary.remaining} remaining{rate}, "
                f"{time.time() - t0:.0f} s elapsed")

    def work(env: dict) -> None:
        while (target := sched.take()) is not None:
            if is_done(target):
                report(target, "elsewhere")
                continue
            lock = try_claim(target.lock, label=target.cell.label, stale_after=stale_after)
            if lock is None:
                sched.defer(target)
                continue
            beat.add(lock)
            try:
                if sched.stop.is_set():
                    continue
                if is_done(target):  # finished by another worker just before our claim
                    report(target, "elsewhere")
                    continue
                resume = can_resume(target)
                gpu = env.get("CUDA_VISIBLE_DEVICES")
                log(f"{target.cell.label} start{' (resume)' if resume else ''}"
                    f"{f' on GPU {gpu}' if gpu is not None else ''} -> {target.log}")
                start = time.time()
                try:
                    rc = runner(target, env=env, resume=resume)
                except Exception as e:  # the grid survives a cell it could not even start
                    rc = f"{type(e).__name__}: {e}"
                if sched.stop.is_set():
                    continue  # interrupted: neither complete nor a failure of the cell
                if is_done(target):
                    report(target, "complete", time.time() - start)
                else:
                    report(target, "failed", time.time() - start)
                    log(f"  {target.cell.label}: exit code {rc}, no complete result; "
                        f"see {target.log}")
            finally:
                lock.release()
                beat.remove(lock)

    def worker(env: dict, finished: threading.Event) -> None:
        try:
            work(env)
        finally:
            finished.set()  # after the worker's last lock.release()

    # The main thread waits on one Event per worker, never on Thread.join: on Python 3.11 a
    # KeyboardInterrupt that lands inside Thread.join marks the still-running thread as stopped
    # (threading._wait_for_tstate_lock releases the tstate lock a live thread holds, bpo-45274),
    # so a second join returned at once and the process exited before the worker released its
    # lock. Event.wait survives an interruption intact.
    finished = [threading.Event() for _ in envs]
    for i, (env, ev) in enumerate(zip(envs, finished)):
        threading.Thread(target=worker, args=(env, ev), name=f"grid-worker-{i}",
                         daemon=True).start()
    try:
        for ev in finished:
            while not ev.wait(0.5):
                pass
    except KeyboardInterrupt:
        with signals_deferred():  # a second Ctrl-C or SIGTERM must not cut the cleanup short
            log("interrupted: stopping the running cells (they resume from their checkpoints)")
            sched.halt()
            PROCESSES.terminate_all()
            deadline = time.monotonic() + 30
            for ev in finished:
                ev.wait(max(0.0, deadline - time.monotonic()))
            for lock in beat.held():  # a worker still stuck after 30 s: release for it
                lock.release()
                beat.remove(lock)
        raise
    finally:
        beat.stop()
    summary.held = [t.cell.label for t in sched.deferred]
    return summary


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM only log while the block runs (it stops cells and releases locks).

    Signal handlers run in the main thread only, and only it may change them; elsewhere this
    is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def note(signum, frame):
        log(f"{signal.Signals(signum).name} ignored: already stopping, releasing the locks")
    saved = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)

