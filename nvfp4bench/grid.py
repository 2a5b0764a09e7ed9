"""The grid runner: every arch x scale x recipe x fold (x seed) cell, resumable, parallel, on Slurm.

``bash run_all.sh [options]`` forwards to ``python -m nvfp4bench.grid [options]``. The grid is

    cells = seeds x scales x folds x archs x recipes          (1 x 3 x 5 x 3 x 8 = 360 by default)

``--preset`` picks one of the study's three run matrices instead (``PRESETS``; options given
beside it narrow or change it): ``holdout`` (--split holdout, 3 archs x 3 scales x 8 recipes, seed
2026: 72 cells), ``multiseed`` (--split holdout, swin and cnn x 3 scales x 8 recipes x seeds
2026-2035: 480), ``cv`` (5-fold CV, swin and cnn at the middle scale, the baseline and 2d_rht_sr,
i.e. the recipes with study ids 0 and 5: 20). ``--split holdout`` is forwarded to every cell and
has one partition (fold 0).

and one cell is one ``python -m nvfp4bench --arch A --scale S --recipe R --fold K --seed N
[forwarded options]`` subprocess, so a crash of one cell never takes the grid down.

How a cell moves through the grid::

    resolve   argv -> cli.parse_config -> RunConfig -> (result path, results.config_hash)
    done?     results.is_complete(result, hash): status "complete" and the same config hash.
              Decided from the result JSON only, never from logs.
    claim     O_CREAT | O_EXCL on <result stem>.lock holding pid, host, start time and a token;
              a lock is stale when its pid is dead on this host, or when its heartbeat (the lock's
              mtime, refreshed every HEARTBEAT_S by the holder) is older than --stale-after.
    re-check  done? again after the claim: a worker that finished the cell and released its lock
              between our first check and our claim must not be repeated.
    run       the subprocess, stdout + stderr appended to <result stem>.log; ``--resume`` is
              passed when the cell left a last-epoch checkpoint of the same config hash (an
              interrupted or failed run), so it continues from there.
    release   the lock is removed only by the holder whose token it carries.

Killing the grid at any moment and starting it again therefore finishes every cell exactly once:
complete cells are skipped, the killed cell's lock names a dead pid and is broken, and the cell
continues from its checkpoint. On Linux a cell subprocess asks the kernel to SIGKILL it when its
grid worker dies (``prctl(PR_SET_PDEATHSIG)``), so a killed grid leaves no orphan cell running
beside its own restart.

Lock files (claim, heartbeat, stale, break, release) are nvfp4bench.locks.

Parallelism: ``--gpus 0,1`` runs one cell per GPU at a time (each worker gets its own
``CUDA_VISIBLE_DEVICES``); ``--jobs N`` runs N cells at once per device (CPU, or per GPU when
combined with --gpus). Workers in other processes or on other hosts sharing OUT are kept apart by
the locks; cells they hold are waited for (unless ``--no-wait``) and taken over if they go stale.

Slurm (``--slurm``): nvfp4bench.slurm, one job array of the cells not complete.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import itertools
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from nvfp4bench.cell import Cell
from nvfp4bench.locks import (BREAK_GRACE_S, HEARTBEAT_S, HOST, STALE_AFTER_S,  # noqa: F401
                              UNREADABLE_GRACE_S, Heartbeat, Lock, _break_stale, _pid_alive,
                              clear_stale, lock_is_stale, log, try_claim)
from nvfp4bench.results import checkpoint_paths, sibling

FOLDS = tuple(range(5))
DEFAULT_SEEDS = (2026,)
POLL_S = 10.0  # how often a worker looks again at cells held by other workers
PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # what children need on PYTHONPATH
# Options that name the cell; the grid sets them, so they may not be forwarded.
CELL_OPTIONS = ("--arch", "--scale", "--recipe", "--fold", "--seed", "--resume")
SPLITS = ("kfold", "holdout")  # nvfp4bench.data.folds.PROTOCOLS


@dataclass(frozen=True)
class Preset:
    """One run matrix of the study (its README and main.py). None: the grid's default (all)."""

    description: str
    split: str = "kfold"
    archs: tuple[str, ...] | None = None
    scales: tuple[str, ...] | None = None
    recipe_ids: tuple[int, ...] | None = None  # the study's recipe ids (recipes.Recipe.study_id)
    seeds: tuple[int, ...] = DEFAULT_SEEDS

    def recipes(self) -> tuple[str, ...]:
        """Registry names of the preset's recipes, in study-id order."""
        from nvfp4bench.quant.recipes import RECIPES, STUDY_RECIPES
        if self.recipe_ids is None:
            return STUDY_RECIPES
        return tuple(n for n in STUDY_RECIPES if RECIPES[n].study_id in self.recipe_ids)


PRESETS: dict[str, Preset] = {
    "holdout": Preset("the study's main runs: patient hold-out, 3 archs x 3 scales x 8 recipes, "
                      "seed 2026", split="holdout"),
    "multiseed": Preset("hold-out, swin and cnn x 3 scales x 8 recipes x seeds 2026-2035",
                        split="holdout", archs=("swin", "cnn"), seeds=tuple(range(2026, 2036))),
    "cv": Preset("5-fold CV, swin and cnn at the middle scale, recipes 0 and 5 (baseline, "
                 "2d_rht_sr)", archs=("swin", "cnn"), scales=("small",), recipe_ids=(0, 5)),
}


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------

def build_cells(archs: Sequence[str], scales: Sequence[str], recipes: Sequence[str],
                folds: Sequence[int], seeds: Sequence[int]) -> list[Cell]:
    """Every combination, cheapest first: seed, then scale (tiny first), fold, arch, recipe.

    The recipes of one (arch, scale, fold, seed) are adjacent, so a partial grid already holds
    complete recipe comparisons.
    """
    return [Cell(arch, scale, recipe, int(fold), int(seed))
            for seed, scale, fold, arch, recipe
            in itertools.product(seeds, scales, folds, archs, recipes)]


@dataclass(frozen=True)
class Target:
    """A cell resolved against the cell CLI: its full argv, result path and config hash."""

    cell: Cell
    argv: tuple[str, ...]  # options of ``python -m nvfp4bench`` (cell options + forwarded)
    result: Path
    config_hash: str
    config: object = field(default=None, compare=False, repr=False)  # the RunConfig

    @property
    def lock(self) -> Path:
        return sibling(self.result, ".lock")

    @property
    def log(self) -> Path:
        return sibling(self.result, ".log")

    @property
    def checkpoint(self) -> Path:
        return checkpoint_paths(self.result)[0]


def resolve(cell: Cell, forward: Sequence[str]) -> Target:
    """Parse the cell's command line as the cell CLI will, and derive its result path and hash."""
    from nvfp4bench.cli import parse_config
    from nvfp4bench.results import config_hash, result_path
    argv = (*cell.argv(), *forward)
    config = parse_config(list(argv))
    return Target(cell, tuple(argv), result_path(config), config_hash(config), config)


Resolver = Callable[[Cell, Sequence[str]], Target]


def can_resume(target: Target) -> bool:
    """True when the cell left a last-epoch checkpoint of this very config (hash inside).

    A checkpoint of another config (the options changed since) is not resumed: the cell starts
    again and overwrites it.
    """
    if not target.checkpoint.exists():
        return False
    import torch
    try:
        state = torch.load(target.checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a damaged checkpoint: start again  # noqa: BLE001
        log(f"{target.cell.label}: checkpoint {target.checkpoint} unreadable ({e}); "
            f"starting the cell again")
        return False
    return isinstance(state, dict) and state.get("config_hash") == target.config_hash


def is_done(target: Target) -> bool:
    """The only definition of "done": a complete result JSON with the same config hash."""
    from nvfp4bench.results import is_complete
    return is_complete(target.result, target.config_hash)


def cell_state(target: Target, stale_after: float = STALE_AFTER_S) -> str:
    """complete / running / failed / outdated (complete, other config) / partial / pending."""
    from nvfp4bench.results import read_result
    if is_done(target):
        return "complete"
    if target.lock.exists() and not lock_is_stale(target.lock, stale_after)[0]:
        return "running"
    r = read_result(target.result)
    if r is not None and r.get("status") == "failed":
        return "failed"
    if r is not None and r.get("status") == "complete":
        return "outdated"
    if target.checkpoint.exists():
        return "partial"
    return "pending"


# --------------------------------------------------------------------------------------------
# Running one cell
# --------------------------------------------------------------------------------------------

def _cell_child() -> None:
    """Entry of a cell subprocess: die with the grid worker, then run ``python -m nvfp4bench``.

    sys.argv = ["-c", <parent pid>, <cell options>...].
    """
    import runpy
    parent = int(sys.argv[1])
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the grid died before prctl took effect
            sys.exit("nvfp4bench.grid: the grid worker that started this cell is gone")
    sys.argv = ["python -m nvfp4bench", *sys.argv[2:]]
    runpy.run_module("nvfp4bench", run_name="__main__", alter_sys=True)


def child_env(base: dict | None = None, **extra: str) -> dict:
    """The environment of a cell: ``base`` (os.environ) + the package on PYTHONPATH + ``extra``."""
    env = dict(os.environ if base is None else base)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(PACKAGE_PARENT) + (os.pathsep + pp if pp else "")
    env.update(extra)
    return env


class Processes:
    """The cell subprocesses running now, so an interrupted grid can stop them."""

    def __init__(self) -> None:
        self._procs: set[subprocess.Popen] = set()
        self._mutex = threading.Lock()

    def add(self, p: subprocess.Popen) -> None:
        with self._mutex:
            self._procs.add(p)

    def discard(self, p: subprocess.Popen) -> None:
        with self._mutex:
            self._procs.discard(p)

    def terminate_all(self, grace: float = 10.0) -> None:
        with self._mutex:
            procs = list(self._procs)
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + grace
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()


PROCESSES = Processes()


def run_cell_subprocess(target: Target, *, env: dict, resume: bool) -> int:
    """Run ``python -m nvfp4bench <argv> [--resume]``; output appended to the cell's log."""
    argv = _cell_argv(target, resume)
    cmd = [sys.executable, "-c", "from nvfp4bench.grid import _cell_child; _cell_child()",
           str(os.getpid()), *argv]
    target.log.parent.mkdir(parents=True, exist_ok=True)
    with open(target.log, "ab") as f:
        f.write(_log_header(target.log, argv, env))
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env)
        PROCESSES.add(p)
        try:
            rc = p.wait()
        finally:
            PROCESSES.discard(p)
        f.write(f"==== exit code {rc}\n".encode())
    return rc


def _cell_argv(target: Target, resume: bool) -> list[str]:
    """The cell's options, + --resume, + --no-progress (a log gets one line per epoch, not
    carriage-return progress bars; it changes no number)."""
    extra = ["--resume"] if resume else []
    if "--no-progress" not in target.argv:
        extra.append("--no-progress")
    return [*target.argv, *extra]


def _log_header(log: Path, argv: Sequence[str], env: dict | None) -> bytes:
    """``_header``, on a line of its own even when a killed run left a half-written line."""
    try:
        with open(log, "rb") as f:
            f.seek(-1, os.SEEK_END)
            newline = f.read(1) == b"\n"
    except OSError:  # missing or empty
        newline = True
    return (b"" if newline else b"\n") + _header(argv, env)


def _header(argv: Sequence[str], env: dict | None) -> bytes:
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    gpu = (env or {}).get("CUDA_VISIBLE_DEVICES")
    job = os.environ.get("SLURM_JOB_ID")
    return (f"==== nvfp4bench.grid {stamp} host {HOST} pid {os.getpid()}"
            f"{f' CUDA_VISIBLE_DEVICES={gpu}' if gpu is not None else ''}"
            f"{f' SLURM_JOB_ID={job}' if job else ''}\n"
            f"==== python -m nvfp4bench {shlex.join(argv)}\n").encode()


def run_cell_inprocess(target: Target, *, env: dict | None = None, resume: bool) -> int:
    """Run the cell CLI in this process, its stdout and stderr (fds 1, 2) appended to its log.

    What a Slurm array task uses: the task is already one process per cell, so a second
    interpreter (and a second torch import) would only cost time. ``env`` is unused.
    """
    import traceback
    from nvfp4bench.cli import main as cell_main
    argv = _cell_argv(target, resume)
    target.log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(target.log, "ab") as f:
        f.write(_log_header(target.log, argv, env))
        f.flush()
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            try:
                rc = cell_main(list(argv))
            except SystemExit as e:  # argparse errors (2), or sys.exit(message)
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001 - the task reports it and exits non-zero
                traceback.print_exc()
                rc = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        f.write(f"==== exit code {rc}\n".encode())
    return rc


CellRunner = Callable[..., int]  # runner(target, *, env: dict, resume: bool) -> exit code


# --------------------------------------------------------------------------------------------
# The local grid: workers, scheduling, progress
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _registry() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from nvfp4bench.models import ARCHS, SCALE_NAMES
    return tuple(ARCHS), tuple(SCALE_NAMES)


def _csv(kind: str, choices: Sequence | None = None, convert=str):
    def parse(text: str) -> tuple:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{kind}: empty list")
        try:
            values = tuple(convert(s) for s in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{kind}: not a comma-separated list of "
                                             f"{convert.__name__}: {text!r}") from None
        if choices is not None:
            bad = [v for v in values if v not in choices]
            if bad:
                raise argparse.ArgumentTypeError(
                    f"unknown {kind} {', '.join(map(str, bad))}; choose from "
                    f"{', '.join(map(str, choices))}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{kind}: repeated value in {text!r}")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    from nvfp4bench.quant.recipes import RECIPES, STUDY_RECIPES
    archs, scales = _registry()
    p = argparse.ArgumentParser(
        prog="bash run_all.sh", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the grid arch x scale x recipe x fold x seed (also: python -m "
                    "nvfp4bench.grid), one `python -m nvfp4bench` "
                    "subprocess per cell, skipping cells whose result JSON is complete with the "
                    "same config hash.",
        epilog="Every other option (or anything after `--`) is passed to each cell, e.g. "
               "--epochs 30 --image-size 128 --data DIR --out DIR --batch-size 16 --device cuda; "
               "see `python -m nvfp4bench --help`.\n\nExamples:\n"
               "  bash run_all.sh --dry-run\n"
               "  bash run_all.sh --preset holdout --gpus 0,1 --data data/lgg\n"
               "  bash run_all.sh --archs cnn,swin --scales tiny --recipes baseline,2d_rht_sr "
               "--folds 0,1 --epochs 5\n"
               "  bash run_all.sh --gpus 0,1,2,3 --data data/brats\n"
               "  bash run_all.sh --slurm --partition gpu --time 04:00:00 --gpus-per-task 1 "
               "--data data/brats")
    g = p.add_argument_group("grid")
    g.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="one of the study's run matrices: "
                        + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items())
                        + " (default: the full 5-fold grid); the options below change it")
    g.add_argument("--split", choices=SPLITS, default=None,
                   help="the cells' patient split, forwarded to each (default: kfold, or the "
                        "preset's); holdout has one partition, fold 0")
    g.add_argument("--archs", type=_csv("arch", archs), default=None,
                   help=f"comma list (default: all: {','.join(archs)})")
    g.add_argument("--scales", type=_csv("scale", scales), default=None,
                   help=f"comma list (default: all: {','.join(scales)})")
    g.add_argument("--recipes", type=_csv("recipe", list(RECIPES)), default=None,
                   help=f"comma list (default: the study's 8: {','.join(STUDY_RECIPES)})")
    g.add_argument("--folds", type=_csv("fold", FOLDS, int), default=None,
                   help="comma list (default: 0,1,2,3,4; 0 with --split holdout)")
    g.add_argument("--seeds", type=_csv("seed", None, int), default=None,
                   help=f"comma list (default: {','.join(map(str, DEFAULT_SEEDS))})")
    g.add_argument("--dry-run", action="store_true",
                   help="list the cells with their state and stop (last line: `N cells`)")
    r = p.add_argument_group("local run")
    r.add_argument("--gpus", type=_csv("gpu"), default=None,
                   help="comma list of GPU ids: one worker per GPU (CUDA_VISIBLE_DEVICES)")
    r.add_argument("--jobs", type=int, default=1,
                   help="cells at once per device (default 1)")
    r.add_argument("--stale-after", type=float, default=STALE_AFTER_S,
                   help=f"seconds without heartbeat after which another worker's lock is broken "
                        f"(default {STALE_AFTER_S:.0f})")
    r.add_argument("--no-wait", action="store_true",
                   help="do not wait for cells held by other workers; leave them to them")
    r.add_argument("--no-report", action="store_true",
                   help="do not run `python -m nvfp4bench.report OUT` at the end")
    s = p.add_argument_group("Slurm")
    s.add_argument("--slurm", action="store_true",
                   help="submit the cells not complete as one job array and return")
    s.add_argument("--partition", help="sbatch --partition")
    s.add_argument("--time", help="sbatch --time per cell, e.g. 04:00:00")
    s.add_argument("--gpus-per-task", type=int, help="sbatch --gpus-per-task (e.g. 1)")
    s.add_argument("--max-running", type=int, help="at most this many array tasks at once")
    s.add_argument("--job-name", default="nvfp4bench", help="sbatch --job-name")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="one more sbatch option, repeatable; write it with '=', e.g. "
                        "--sbatch-arg=--mem=32G --sbatch-arg=--account=proj")
    s.add_argument("--slurm-task", metavar="CELLS", type=Path, help=argparse.SUPPRESS)
    s.add_argument("--task-index", type=int, help=argparse.SUPPRESS)
    return p


def split_argv(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(grid options, options forwarded to every cell). Anything after ``--`` is forwarded."""
    argv = list(argv)
    tail: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1:]
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    forward = unknown + tail
    for opt in forward:
        name = opt.split("=", 1)[0]
        if name == "--resume":
            parser.error("--resume is not needed: the grid resumes interrupted cells itself")
        if name in CELL_OPTIONS:
            parser.error(f"{name} selects cells; use {name}s to choose them")
    if ns.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {ns.jobs}")
    _apply_preset(ns, parser)
    if ns.split != "kfold":
        forward = ["--split", ns.split, *forward]
    if ns.slurm and (ns.gpus or ns.jobs != 1):
        parser.error("--gpus and --jobs spread a local run; with --slurm, each array task is "
                     "one cell: ask for its GPU with --gpus-per-task 1")
    slurm_only = [f"--{k.replace('_', '-')}" for k in ("partition", "time", "gpus_per_task",
                                                        "max_running", "sbatch_arg")
                  if getattr(ns, k)]
    if slurm_only and not ns.slurm:
        parser.error(f"{', '.join(slurm_only)} only apply with --slurm")
    return ns, forward


def _apply_preset(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill the cell axes left unset from --preset (or the full grid's defaults)."""
    archs, scales = _registry()
    preset = PRESETS[ns.preset] if ns.preset else Preset("the full grid")
    ns.split = ns.split or preset.split
    ns.archs = ns.archs or preset.archs or archs
    ns.scales = ns.scales or preset.scales or scales
    ns.recipes = ns.recipes or preset.recipes()
    ns.seeds = ns.seeds or preset.seeds
    if ns.folds is None:
        ns.folds = (0,) if ns.split == "holdout" else FOLDS
    elif ns.split == "holdout" and tuple(ns.folds) != (0,):
        parser.error("--split holdout has one partition: --folds 0 (or leave --folds out)")


def plan(ns: argparse.Namespace, forward: Sequence[str],
         resolver: Resolver = resolve) -> list[Target]:
    cells = build_cells(ns.archs, ns.scales, ns.recipes, ns.folds, ns.seeds)
    return [resolver(c, forward) for c in cells]


def probe_config(ns: argparse.Namespace, forward: Sequence[str]):
    """The RunConfig of the grid's first cell: validates the forwarded options once, up front."""
    from nvfp4bench.cli import parse_config
    first = build_cells(ns.archs[:1], ns.scales[:1], ns.recipes[:1], ns.folds[:1], ns.seeds[:1])
    return parse_config([*first[0].argv(), *forward])


def ensure_default_store(config) -> None:
    """Build the embedded synthetic store once here, not in N concurrent cells (or array tasks)."""
    if config.data is not None:
        return
    from nvfp4bench.data import DEFAULT_DATA_DIR, ensure_synthetic_store
    ensure_synthetic_store(DEFAULT_DATA_DIR, progress=config.progress)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns, forward = split_argv(argv)
    if ns.slurm_task is not None:
        index = ns.task_index
        if index is None:
            if "SLURM_ARRAY_TASK_ID" not in os.environ:
                raise SystemExit("nvfp4bench.grid: --slurm-task needs SLURM_ARRAY_TASK_ID "
                                 "(or --task-index)")
            index = int(os.environ["SLURM_ARRAY_TASK_ID"])
        from nvfp4bench.slurm import read_cell, slurm_task
        try:
            read_cell(ns.slurm_task, index)
        except (OSError, ValueError) as e:
            print(f"nvfp4bench.grid: error: --slurm-task: {e}", file=sys.stderr)
            return 2
        signal.signal(signal.SIGTERM, _raise_interrupt)
        return slurm_task(ns.slurm_task, index, stale_after=ns.stale_after)

    from nvfp4bench.data import DataError
    try:
        probe = probe_config(ns, forward)
        out = Path(probe.out)
        if not ns.dry_run:
            ensure_default_store(probe)
        targets = plan(ns, forward)
    except (DataError, OSError, ValueError) as e:  # e.g. --data that is not a slice store
        print(f"nvfp4bench.grid: error: {e}", file=sys.stderr)
        return 2
    from nvfp4bench.slurm import submit_slurm
    if ns.dry_run:
        states = [cell_state(t, ns.stale_after) for t in targets]
        for t, st in zip(targets, states):
            print(f"{st:<9} {t.cell.arch:<5} {t.cell.scale:<6} {t.cell.recipe:<11} "
                  f"fold{t.cell.fold} seed{t.cell.seed}  {t.result}")
        counts = {s: states.count(s) for s in dict.fromkeys(states)}
        print("# " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        if ns.slurm:
            todo = [t for t, s in zip(targets, states) if s != "complete"]
            print(f"# --slurm would submit {len(todo)} cells with this script:")
            if todo:
                submit_slurm(todo, out, _slurm_options(ns), dry_run=True)
        print(f"{len(targets)} cells")
        return 0

    if ns.slurm:
        todo = [t for t in targets if not is_done(t)]
        if not todo:
            print(f"nothing to submit: all {len(targets)} cells are complete")
            return 0
        print(f"{len(targets)} cells: {len(targets) - len(todo)} complete, "
              f"{len(todo)} to submit")
        submit_slurm(todo, out, _slurm_options(ns))
        return 0

    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        summary = run_grid(targets, worker_envs(ns.gpus, ns.jobs), stale_after=ns.stale_after,
                           wait=not ns.no_wait)
    except KeyboardInterrupt:
        return 130
    secs = summary.seconds
    log(f"finished: {summary.done}/{summary.total} complete ({summary.already} before, "
        f"{summary.ran} run here, {summary.elsewhere} by other workers), "
        f"{len(summary.failed)} failed, {len(summary.held)} held by other workers"
        + (f"; {sum(secs) / len(secs):.1f} s per cell" if secs else ""))
    for label in summary.failed:
        log(f"  failed: {label} (rerun the grid to retry it)")
    for label in summary.held:
        log(f"  held elsewhere: {label}")
    if not ns.no_report:
        _run_report(out)
    return 0 if not summary.failed and not summary.held else 1


def _slurm_options(ns: argparse.Namespace):
    from nvfp4bench.slurm import SlurmOptions
    return SlurmOptions(partition=ns.partition, time=ns.time, gpus_per_task=ns.gpus_per_task,
                        max_running=ns.max_running, job_name=ns.job_name,
                        extra=tuple(ns.sbatch_arg))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


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


def _run_report(out: Path) -> None:
    """``python -m nvfp4bench.report OUT`` when the report module exists."""
    import importlib.util
    if importlib.util.find_spec("nvfp4bench.report") is None:
        log("nvfp4bench.report is not installed: no report written")
        return
    log(f"report: python -m nvfp4bench.report {out}")
    rc = subprocess.call([sys.executable, "-m", "nvfp4bench.report", str(out)], env=child_env())
    if rc != 0:
        log(f"the report exited with code {rc}")


if __name__ == "__main__":
    sys.exit(main())
