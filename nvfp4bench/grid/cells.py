"""The grid's cells resolved: result path, config hash, and whether a cell is done.

``build_cells`` lists every arch x scale x recipe x fold x seed, cheapest first; ``resolve`` parses
a cell's command line as the cell CLI will (``cli.parse_config``) into a ``Target``: its argv,
result JSON, lock, log and checkpoint paths and its config hash. A cell is done when its result
JSON is complete with the same config hash (``is_done``, from the JSON only, never from logs);
``cell_state`` names the other states for ``--dry-run``; ``can_resume`` says whether a checkpoint
of this very config is there to continue from. The lifecycle of a cell: nvfp4bench.grid.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from nvfp4bench.cell import Cell
from nvfp4bench.locks import STALE_AFTER_S, lock_is_stale, log
from nvfp4bench.quant.formats import DEFAULT_FORMAT
from nvfp4bench.quant.recipes import RECIPES
from nvfp4bench.results import (checkpoint_paths, config_hash, is_complete, read_result,
                                result_path, sibling)
from nvfp4bench.train.cli import parse_config


def build_cells(archs: Sequence[str], scales: Sequence[str], recipes: Sequence[str],
                folds: Sequence[int], seeds: Sequence[int], split: str = "kfold",
                formats: Sequence[str] = (DEFAULT_FORMAT,)) -> list[Cell]:
    """Every combination, cheapest first: seed, then scale (tiny first), fold, arch, recipe,
    format.

    The recipes of one (arch, scale, fold, seed) are adjacent, so a partial grid already holds
    complete recipe comparisons. ``split`` is the cells' patient split (its ``--split`` is in
    each cell's argv, and ``holdout`` names the cells ``holdout`` in labels and logs).
    ``formats``: a quantized recipe runs once per format; a baseline recipe, which quantizes
    nothing, once (its cell is shared by every format).
    """
    return [Cell(arch, scale, recipe, int(fold), int(seed), split, fmt)
            for seed, scale, fold, arch, recipe
            in itertools.product(seeds, scales, folds, archs, recipes)
            for fmt in (formats if RECIPES[recipe].quantized else (DEFAULT_FORMAT,))]


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
    try:
        state = torch.load(target.checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a damaged checkpoint: start again  # noqa: BLE001
        log(f"{target.cell.label}: checkpoint {target.checkpoint} unreadable ({e}); "
            f"starting the cell again")
        return False
    return isinstance(state, dict) and state.get("config_hash") == target.config_hash


def is_done(target: Target) -> bool:
    """The only definition of "done": a complete result JSON with the same config hash."""
    return is_complete(target.result, target.config_hash)


def cell_state(target: Target, stale_after: float = STALE_AFTER_S) -> str:
    """complete / running / failed / outdated (complete, other config) / partial / pending."""
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
