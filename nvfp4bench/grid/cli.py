"""The grid runner: every arch x scale x recipe x fold (x seed) cell, resumable, parallel, on Slurm.

``bash run_all.sh [options]`` forwards to ``python -m nvfp4bench.grid [options]``. The grid is

    cells = seeds x scales x folds x archs x recipes          (1 x 3 x 5 x 3 x 8 = 360 by default)

(``--formats nvfp4,mxfp4`` adds one cell per quantized recipe cell and format; a baseline cell,
which quantizes nothing, is shared.)

The default archs are the three families with their study optimisers (cnn, vit, swin); the
fourth arm, ``vit_adamax`` (the ViT with Adamax), is one ``--archs`` away. ``--preset`` picks one
of the study's three run matrices instead (``PRESETS``; options given beside it narrow or change
it): ``holdout`` (--split holdout, the study's 4 arms x 3 scales x 8 recipes, seed 2026: 96
cells), ``multiseed`` (--split holdout, swin and cnn x 3 scales x 8 recipes x seeds
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

The pieces: targets and done-ness are nvfp4bench.grid.cells; one cell's process (subprocess or
in-process, its log) is nvfp4bench.grid.process; the worker threads and scheduling are
nvfp4bench.grid.workers; lock files (claim, heartbeat, stale, break, release) are
nvfp4bench.locks. This module is the command line.

Parallelism: ``--gpus 0,1`` runs one cell per GPU at a time (each worker gets its own
``CUDA_VISIBLE_DEVICES``); ``--jobs N`` runs N cells at once per device (CPU, or per GPU when
combined with --gpus). Workers in other processes or on other hosts sharing OUT are kept apart by
the locks; cells they hold are waited for (unless ``--no-wait``) and taken over if they go stale.

Slurm (``--slurm``): nvfp4bench.grid.slurm, one job array of the cells not complete.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nvfp4bench.data import DEFAULT_DATA_DIR, DataError, ensure_synthetic_store
from nvfp4bench.grid.cells import Resolver, Target, build_cells, cell_state, is_done, resolve
from nvfp4bench.locks import STALE_AFTER_S, log
from nvfp4bench.grid.process import child_env
from nvfp4bench.grid.slurm import SlurmOptions, read_cell, slurm_task, submit_slurm
from nvfp4bench.grid.workers import run_grid, worker_envs
from nvfp4bench import options
from nvfp4bench.config import ARMS
from nvfp4bench.models import SCALE_NAMES
from nvfp4bench.quant.formats import DEFAULT_FORMAT, FORMATS
from nvfp4bench.quant.recipes import RECIPES, STUDY_RECIPES
from nvfp4bench.report.cells import EVAL_SETS
from nvfp4bench.train.cli import parse_config

FOLDS = tuple(range(5))
DEFAULT_SEEDS = (2026,)
# Options that name the cell; the grid sets them, so they may not be forwarded.
CELL_OPTIONS = ("--arch", "--scale", "--recipe", "--format", "--fold", "--seed", "--resume")
SPLITS = ("kfold", "holdout")  # nvfp4bench.data.folds.PROTOCOLS
DEFAULT_ARCHS = ("cnn", "vit", "swin")  # the full grid: one arm per family (config.ARMS)


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
        if self.recipe_ids is None:
            return STUDY_RECIPES
        return tuple(n for n in STUDY_RECIPES if RECIPES[n].study_id in self.recipe_ids)


PRESETS: dict[str, Preset] = {
    "holdout": Preset("the study's main runs (its --arch all): patient hold-out, 4 arms (cnn, "
                      "vit, vit_adamax, swin) x 3 scales x 8 recipes, seed 2026",
                      split="holdout", archs=tuple(ARMS)),
    "multiseed": Preset("hold-out, swin and cnn x 3 scales x 8 recipes x seeds 2026-2035",
                        split="holdout", archs=("swin", "cnn"), seeds=tuple(range(2026, 2036))),
    "cv": Preset("5-fold CV, swin and cnn at the middle scale, recipes 0 and 5 (baseline, "
                 "2d_rht_sr)", archs=("swin", "cnn"), scales=("small",), recipe_ids=(0, 5)),
}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


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
        except argparse.ArgumentTypeError as e:  # a number out of its range (options.integer)
            raise argparse.ArgumentTypeError(f"{kind}: {e}") from None
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
    archs, scales = tuple(ARMS), SCALE_NAMES
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
                   help=f"comma list of arms, from {','.join(archs)} (default: "
                        f"{','.join(DEFAULT_ARCHS)}, one per family; the holdout preset: all 4)")
    g.add_argument("--scales", type=_csv("scale", scales), default=None,
                   help=f"comma list (default: all: {','.join(scales)})")
    g.add_argument("--recipes", type=_csv("recipe", list(RECIPES)), default=None,
                   help=f"comma list (default: the study's 8: {','.join(STUDY_RECIPES)})")
    g.add_argument("--formats", type=_csv("format", list(FORMATS)), default=(DEFAULT_FORMAT,),
                   help=f"comma list of block formats, from {','.join(FORMATS)}: every "
                        f"quantized recipe cell runs once per format, the baseline cells once "
                        f"(default: {DEFAULT_FORMAT})")
    g.add_argument("--folds", type=_csv("fold", FOLDS, int), default=None,
                   help="comma list (default: 0,1,2,3,4; 0 with --split holdout)")
    g.add_argument("--seeds", type=_csv("seed", None, options.integer(0, options.SEED_MAX)), default=None,
                   help=f"comma list (default: {','.join(map(str, DEFAULT_SEEDS))})")
    g.add_argument("--dry-run", action="store_true",
                   help="list the cells with their state and stop (last line: `N cells`)")
    r = p.add_argument_group("local run")
    r.add_argument("--gpus", type=_csv("gpu"), default=None,
                   help="comma list of GPU ids: one worker per GPU (CUDA_VISIBLE_DEVICES)")
    r.add_argument("--jobs", type=options.positive_int(options.MAX_WORKERS), default=1,
                   help="cells at once per device (default 1)")
    r.add_argument("--stale-after", type=options.real(1, 1e7), default=STALE_AFTER_S,
                   help=f"seconds without heartbeat after which another worker's lock is broken "
                        f"(default {STALE_AFTER_S:.0f})")
    r.add_argument("--no-wait", action="store_true",
                   help="do not wait for cells held by other workers; leave them to them")
    r.add_argument("--no-report", action="store_true",
                   help="do not run `python -m nvfp4bench.report OUT` at the end")
    r.add_argument("--eval-set", choices=EVAL_SETS, default="test",
                   help="the partition of the final report (test or val); an option of the "
                        "report only, never passed to the cells or part of a config hash")
    s = p.add_argument_group("Slurm")
    s.add_argument("--slurm", action="store_true",
                   help="submit the cells not complete as one job array and return")
    s.add_argument("--partition", help="sbatch --partition")
    s.add_argument("--time", help="sbatch --time per cell, e.g. 04:00:00")
    s.add_argument("--gpus-per-task", type=options.positive_int(64), help="sbatch --gpus-per-task (e.g. 1)")
    s.add_argument("--max-running", type=options.positive_int(10**6), help="at most this many array tasks at once")
    s.add_argument("--job-name", default="nvfp4bench", help="sbatch --job-name")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="one more sbatch option, repeatable; write it with '=', e.g. "
                        "--sbatch-arg=--mem=32G --sbatch-arg=--account=proj")
    s.add_argument("--slurm-task", metavar="CELLS", type=Path, help=argparse.SUPPRESS)
    s.add_argument("--task-index", type=options.non_negative_int(10**9), help=argparse.SUPPRESS)
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
        if name == "--split":
            parser.error("--split is the grid's own option (each cell gets it in its argv): "
                         "give it before --")
    _apply_preset(ns, parser)  # the split goes to each cell in its own argv (Cell.argv)
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
    preset = PRESETS[ns.preset] if ns.preset else Preset("the full grid")
    ns.split = ns.split or preset.split
    ns.archs = ns.archs or preset.archs or DEFAULT_ARCHS
    ns.scales = ns.scales or preset.scales or SCALE_NAMES
    ns.recipes = ns.recipes or preset.recipes()
    ns.seeds = ns.seeds or preset.seeds
    if ns.folds is None:
        ns.folds = (0,) if ns.split == "holdout" else FOLDS
    elif ns.split == "holdout" and tuple(ns.folds) != (0,):
        parser.error("--split holdout has one partition: --folds 0 (or leave --folds out)")


def plan(ns: argparse.Namespace, forward: Sequence[str],
         resolver: Resolver = resolve) -> list[Target]:
    cells = build_cells(ns.archs, ns.scales, ns.recipes, ns.folds, ns.seeds, ns.split,
                        ns.formats)
    return [resolver(c, forward) for c in cells]


def probe_config(ns: argparse.Namespace, forward: Sequence[str]):
    """The RunConfig of the grid's first cell: validates the forwarded options once, up front."""
    first = build_cells(ns.archs[:1], ns.scales[:1], ns.recipes[:1], ns.folds[:1], ns.seeds[:1],
                        ns.split)
    return parse_config([*first[0].argv(), *forward])


def ensure_default_store(config) -> None:
    """Build the embedded synthetic store once here, not in N concurrent cells (or array tasks)."""
    if config.data is not None:
        return
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
        try:
            read_cell(ns.slurm_task, index)
        except (OSError, ValueError) as e:
            print(f"nvfp4bench.grid: error: --slurm-task: {e}", file=sys.stderr)
            return 2
        signal.signal(signal.SIGTERM, _raise_interrupt)
        return slurm_task(ns.slurm_task, index, stale_after=ns.stale_after)

    try:
        probe = probe_config(ns, forward)
        out = Path(probe.out)
        if not ns.dry_run:
            ensure_default_store(probe)
        targets = plan(ns, forward)
    except (DataError, OSError, ValueError) as e:  # e.g. --data that is not a slice store
        print(f"nvfp4bench.grid: error: {e}", file=sys.stderr)
        return 2
    if ns.dry_run:
        states = [cell_state(t, ns.stale_after) for t in targets]
        for t, st in zip(targets, states):
            print(f"{st:<9} {t.cell.arch:<5} {t.cell.scale:<6} {t.cell.variant:<11} "
                  f"{t.cell.partition} seed{t.cell.seed}  {t.result}")
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
        _run_report(out, ns.eval_set)
    return 0 if not summary.failed and not summary.held else 1


def _slurm_options(ns: argparse.Namespace):
    return SlurmOptions(partition=ns.partition, time=ns.time, gpus_per_task=ns.gpus_per_task,
                        max_running=ns.max_running, job_name=ns.job_name,
                        extra=tuple(ns.sbatch_arg))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _run_report(out: Path, eval_set: str = "test") -> None:
    """``python -m nvfp4bench.report OUT --eval-set E`` when the report module exists."""
    if importlib.util.find_spec("nvfp4bench.report") is None:
        log("nvfp4bench.report is not installed: no report written")
        return
    cmd = [sys.executable, "-m", "nvfp4bench.report", str(out), "--eval-set", eval_set]
    log(f"report: python -m nvfp4bench.report {out} --eval-set {eval_set}")
    rc = subprocess.call(cmd, env=child_env())
    if rc != 0:
        log(f"the report exited with code {rc}")


if __name__ == "__main__":
    sys.exit(main())
