"""One grid cell as a process: ``python -m nvfp4bench`` in a subprocess, or in this process.

``run_cell_subprocess`` (the local grid's runner) starts one interpreter per cell, its stdout and
stderr appended to the cell's log after a header line (time, host, pid, GPU, Slurm job, command).
On Linux the child asks the kernel to SIGKILL it when its grid worker dies
(``prctl(PR_SET_PDEATHSIG)``, ``_cell_child``), so a killed grid leaves no orphan cell running
beside its own restart. ``PROCESSES`` holds the running children, so an interrupted grid can stop
them. ``run_cell_inprocess`` (a Slurm array task's runner) runs the cell CLI in this process with
fds 1 and 2 redirected to the log. ``child_env`` puts the package on the child's PYTHONPATH.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import os
import runpy
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from nvfp4bench.grid.cells import Target
from nvfp4bench.env import HOST, PACKAGE_ROOT
from nvfp4bench.train.cli import main as cell_main

PACKAGE_PARENT = PACKAGE_ROOT  # what children need on PYTHONPATH: the folder holding the package


def _cell_child() -> None:
    """Entry of a cell subprocess: die with the grid worker, then run ``python -m nvfp4bench``.

    sys.argv = ["-c", <parent pid>, <cell options>...].
    """
    parent = int(sys.argv[1])
    if sys.platform.startswith("linux"):
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
    cmd = [sys.executable, "-c", "from nvfp4bench.grid.process import _cell_child; _cell_child()",
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
