"""Slurm: the grid's cells that are not complete as one job array (``bash run_all.sh --slurm``).

The cells are written to a cell list (JSON Lines, one cell per line,
OUT/slurm/<time>-<pid>/cells.jsonl beside the job script) and submitted as one job array, one
array task per cell; task i runs ``python -m nvfp4bench.grid --slurm-task CELLS``, which picks
line SLURM_ARRAY_TASK_ID and goes through the grid's resolve / done? / claim / run / release
steps (nvfp4bench.grid). The task is already one process per cell, so it runs the cell CLI
in-process (fds 1 and 2 redirected to the cell's log) instead of starting a second interpreter;
a cell held by another worker is waited for. ``scancel`` (SIGTERM) releases the lock; a
resubmission includes only the cells that are not complete and resumes the interrupted ones.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nvfp4bench.atomic import write_text_atomic
from nvfp4bench.cell import Cell
from nvfp4bench.grid.cells import Resolver, Target, can_resume, is_done, resolve
from nvfp4bench.locks import (HEARTBEAT_S, STALE_AFTER_S, Heartbeat, clear_stale,
                                   lock_is_stale, log, try_claim)
from nvfp4bench.grid.process import (PACKAGE_PARENT, PROCESSES, CellRunner, child_env,
                                     run_cell_inprocess)
from nvfp4bench.grid.workers import POLL_S, signals_deferred


def write_cell_list(path: Path, targets: Sequence[Target]) -> Path:
    """JSON Lines, line i = array task i.

    Each line: {"cell": {arch, scale, recipe, fold, seed}, "forward": [options passed to the
    cell], "result": path at submission (informative; the task resolves the cell again)}.
    """
    return write_text_atomic(path, "".join(
        json.dumps({"cell": dataclasses.asdict(t.cell),
                    "forward": list(t.argv[len(t.cell.argv()):]),
                    "result": str(t.result)}) + "\n" for t in targets))


def read_cell(path: Path, index: int) -> dict:
    lines = Path(path).read_text().splitlines()
    if not 0 <= index < len(lines):
        raise ValueError(f"{path}: array task {index} out of range (the list has {len(lines)} "
                         f"cells)")
    return json.loads(lines[index])


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    time: str | None = None
    gpus_per_task: int | None = None
    max_running: int | None = None
    job_name: str = "nvfp4bench"
    extra: tuple[str, ...] = ()


def sbatch_script(cells: Path, n: int, logs: Path, opts: SlurmOptions,
                  cwd: Path, python: str = sys.executable) -> str:
    """The job-array script: #SBATCH lines, then one ``nvfp4bench.grid --slurm-task`` call."""
    array = f"0-{n - 1}" + (f"%{opts.max_running}" if opts.max_running else "")
    lines = ["#!/bin/bash",
             f"# nvfp4bench grid: {n} cells, listed in {cells} (line i = array task i)",
             f"#SBATCH --job-name={opts.job_name}",
             f"#SBATCH --array={array}",
             f"#SBATCH --output={logs}/%A_%a.out",
             f"#SBATCH --chdir={cwd}"]
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.time:
        lines.append(f"#SBATCH --time={opts.time}")
    if opts.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={opts.gpus_per_task}")
    lines += [f"#SBATCH {a}" for a in opts.extra]
    lines += [f"export PYTHONPATH={shlex.quote(str(PACKAGE_PARENT))}${{PYTHONPATH:+:$PYTHONPATH}}",
              f"exec {shlex.quote(python)} -m nvfp4bench.grid "
              f"--slurm-task {shlex.quote(str(cells))}",
              ""]
    return "\n".join(lines)


def submit_slurm(targets: Sequence[Target], out: Path, opts: SlurmOptions, *,
                 sbatch: str = "sbatch", dry_run: bool = False) -> str | None:
    """Submit ``targets`` as one job array; returns the job id (None for a dry run)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    jobdir = (out / "slurm" / f"{stamp}-{os.getpid()}").resolve()
    cells = jobdir / "cells.jsonl"
    script = sbatch_script(cells, len(targets), jobdir, opts, Path.cwd())
    if dry_run:
        print(script, end="")
        return None
    write_cell_list(cells, targets)
    (jobdir / "job.sh").write_text(script)
    try:
        res = subprocess.run([sbatch, "--parsable", str(jobdir / "job.sh")], capture_output=True,
                             text=True)
    except FileNotFoundError:
        raise SystemExit(f"nvfp4bench.grid: '{sbatch}' not found: --slurm needs the Slurm "
                         f"client commands on PATH") from None
    if res.returncode != 0:
        raise SystemExit(f"nvfp4bench.grid: sbatch failed (exit {res.returncode}): "
                         f"{res.stderr.strip() or res.stdout.strip()}")
    job = res.stdout.strip().split(";")[0]
    (jobdir / "job_id").write_text(job + "\n")
    print(f"submitted {len(targets)} cells as Slurm job array {job} ({opts.job_name})\n"
          f"  follow:     squeue -j {job}      (finished tasks: sacct -j {job} "
          f"--format=JobID,State,Elapsed,ExitCode)\n"
          f"  task logs:  {jobdir}/{job}_<task>.out\n"
          f"  cell logs:  beside each result, OUT/<dataset>/<arch>/<scale>/<recipe>/"
          f"fold<k>_seed<s>.log\n"
          f"  cell list:  {cells}  (line i = array task i)\n"
          f"  cancel:     scancel {job}   (resubmitting later runs only the cells not complete)",
          flush=True)
    return job


def slurm_task(cells: Path, index: int, *, runner: CellRunner = run_cell_inprocess,
               resolver: Resolver | None = None, stale_after: float = STALE_AFTER_S,
               heartbeat_s: float = HEARTBEAT_S, poll_s: float = POLL_S) -> int:
    """Run array task ``index`` of the cell list ``cells``: 0 when the cell ends complete.

    A cell held by another worker is waited for until it is complete, or its lock is released
    or goes stale (a task killed with SIGKILL on another node leaves a lock that only its
    missing heartbeat can expire), and then run here.
    """
    entry = read_cell(cells, index)
    cell = Cell(**entry["cell"])
    # Resolved again here: the hash must be the one of the code that runs the cell.
    target = (resolver or resolve)(cell, entry["forward"])
    if is_done(target):
        log(f"{cell.label} already complete: {target.result}")
        clear_stale(target.lock, stale_after)
        return 0
    lock = try_claim(target.lock, label=cell.label, stale_after=stale_after)
    if lock is None:
        log(f"{cell.label} {lock_is_stale(target.lock, stale_after)[1]}: waiting until it is "
            f"complete or its lock is released or stale (> {stale_after:.0f} s without heartbeat)")
    while lock is None:
        time.sleep(poll_s)
        if is_done(target):
            log(f"{cell.label} completed by another worker: {target.result}")
            return 0
        lock = try_claim(target.lock, label=cell.label, stale_after=stale_after)
    beat = Heartbeat(heartbeat_s)
    beat.add(lock)
    try:
        if is_done(target):
            log(f"{cell.label} completed by another worker: {target.result}")
            return 0
        resume = can_resume(target)
        log(f"{cell.label} start{' (resume)' if resume else ''} -> {target.log}")
        start = time.time()
        try:
            rc = runner(target, env=child_env(), resume=resume)
        except Exception as e:  # noqa: BLE001
            rc = f"{type(e).__name__}: {e}"
        ok = is_done(target)
        log(f"{cell.label} {'complete' if ok else f'failed (exit code {rc})'} in "
            f"{time.time() - start:.1f} s: {target.result}")
        return 0 if ok else 1
    except KeyboardInterrupt:
        with signals_deferred():
            PROCESSES.terminate_all()
            lock.release()
        if is_done(target):  # the cell had just finished
            log(f"{cell.label} complete (task interrupted after the cell): {target.result}")
            return 0
        log(f"{cell.label} interrupted (resubmit to resume it)")
        return 130
    finally:
        with signals_deferred():
            beat.stop()
            lock.release()
