"""The report's input: every cell result file under a results directory, grouped per dataset.

``load_cells(root, eval_set)`` reads each ``<dataset>/<arch>/<scale>/<recipe>/fold<k>_seed<s>.json``
(k-fold split) and ``.../holdout_seed<s>.json`` (hold-out split, its one partition is fold 0;
docs/interfaces.md) into a ``CellResult``; identity comes from the path, and a file whose
``config`` (or ``data.name``) disagrees with it is left out and listed as a problem, as is every
file that is not a well-formed result (``results.result_problem``): never counted. ``dataset_views`` groups the cells of one dataset and one split
protocol into a ``DatasetView`` (the two protocols are never pooled): its archs, scales and
recipes in the study's order, its (fold, seed) blocks (k-fold: fold x seed; hold-out: (0, seed),
so recipes pair by seed), the cells missing from that grid, and the finite values of a metric per
block (``values``). ``PROTOCOLS`` says how the report names each protocol's blocks.

The metrics come from one evaluation partition, ``eval_set`` (``EVAL_SETS``): ``test`` (the
default: the held-out patients, never used for model selection) or ``val`` (the best checkpoint's
validation metrics, which the study's own statistics aggregate: its ``_save_metrics_json``).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

from nvfp4bench.cell import Cell, split_variant, variant_name
from nvfp4bench.config import DEFAULT_FORMAT, SPLITS
from nvfp4bench.quant.recipes import RECIPES
from nvfp4bench.results import result_problem

ARCH_ORDER = ("cnn", "vit", "vit_adamax", "swin")  # config.ARMS
EVAL_SETS = ("test", "val")  # the partition a report's metrics come from; test by default
SCALE_ORDER = ("tiny", "small", "base")
# fold<k>_seed<s>.json (k-fold) or holdout_seed<s>.json (hold-out): nvfp4bench.cell.Cell.stem
CELL_NAME = re.compile(r"^(?:fold(\d+)|(holdout))_seed(\d+)\.json$")


@dataclass(frozen=True)
class Protocol:
    """How the report names the replicates of one split protocol (a block is (fold, seed))."""

    title: str       # the section's heading
    block: str       # what recipes are paired by
    blocks: str      # the blocks, plural
    over: str        # what the statistics run over
    unit: str        # one replicate
    label: str       # one block, str.format(fold=, seed=)


PROTOCOLS = {
    "kfold": Protocol("k-fold cross-validation", "(fold, seed)", "(fold, seed) blocks",
                      "folds and seeds", "fold", "fold {fold} seed {seed}"),
    "holdout": Protocol("patient hold-out", "seed", "seeds", "seeds", "seed",
                        "holdout seed {seed}"),
}


@dataclass
class CellResult:
    """What the report reads of one cell's result file (the cell: ``.cell``)."""

    path: Path
    dataset: str
    arch: str
    scale: str
    recipe: str  # the variant: the recipe, or <recipe>@<format> (cell.variant_name)
    fold: int
    seed: int
    status: str
    error: str | None = None
    synthetic: bool | None = None
    metrics: dict = field(default_factory=dict)  # the eval_set partition's metrics
    diagnostics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    fingerprint: str | None = None
    split: str = "kfold"  # nvfp4bench.config.SPLITS
    collapsed: bool = False  # the run found its best model collapsed (train.run.collapsed)
    timing: dict = field(default_factory=dict)  # the result's "timing" block (seconds, step ms)
    epochs_run: int | None = None

    @property
    def cell(self) -> Cell:
        recipe, fmt = split_variant(self.recipe)
        return Cell(self.arch, self.scale, recipe, self.fold, self.seed, self.split, fmt)

    @property
    def key(self) -> tuple:
        """The cell's identity within one split protocol (a DatasetView)."""
        return (self.dataset, self.arch, self.scale, self.recipe, self.fold, self.seed)

    @property
    def block(self) -> tuple[int, int]:
        return (self.fold, self.seed)

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def _read_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f), None
    except (OSError, ValueError) as e:
        return None, f"{type(e).__name__}: {e}"


def load_cells(root, eval_set: str = "test") -> tuple[list[CellResult], list[str]]:
    """Every cell JSON under ``root`` (layout of docs/interfaces.md) and a list of problems found;
    each cell's metrics are those of the ``eval_set`` partition (``EVAL_SETS``).

    Identity comes from the path; the ``config`` inside (and ``data.name``) must agree with it,
    else the file is listed as a problem and left out. A file that is not a well-formed result
    (unreadable, truncated, or failing ``results.result_problem``) is listed with the first thing
    wrong and never counted; nothing here raises on a file's content."""
    if eval_set not in EVAL_SETS:
        raise ValueError(f"eval_set must be one of {', '.join(EVAL_SETS)}, got {eval_set!r}")
    root = Path(root)
    cells, problems = [], []
    # exactly <dataset>/<arch>/<scale>/<recipe>/<cell>.json below root: a results folder that
    # holds other results deeper down (results/examples/...) does not pool them with its own
    for path in sorted(root.glob("*/*/*/*/*_seed*.json")):
        match = CELL_NAME.match(path.name)
        if not match:
            continue
        dataset, arch, scale, recipe = path.relative_to(root).parts[:4]
        split = "holdout" if match.group(2) else "kfold"
        fold, seed = int(match.group(1) or 0), int(match.group(3))
        obj, err = _read_json(path)
        problem = err or result_problem(obj)
        if problem is not None:  # never counted: listed with the first thing wrong
            problems.append(f"`{path.relative_to(root)}`: left out, not a well-formed result: "
                            f"{problem}")
            continue
        config, data = obj["config"], obj["data"]
        # the recipe folder is the variant: <recipe>@<format> for a format other than nvfp4
        variant = variant_name(config["recipe"], config.get("format", DEFAULT_FORMAT))
        stated = {"arch": config["arch"], "scale": config["scale"], "recipe": variant,
                  "fold": config["fold"], "seed": config["seed"],
                  # a config from before --split existed ran the k-fold split
                  "split": config.get("split", "kfold"),
                  "dataset": data.get("results_dir") or data.get("name")}
        actual = {"arch": arch, "scale": scale, "recipe": recipe, "fold": fold, "seed": seed,
                  "split": split, "dataset": dataset}
        wrong = [f"{k}={stated[k]!r} (path says {actual[k]!r})" for k in actual
                 if stated[k] is not None and stated[k] != actual[k]]
        if wrong:
            problems.append(f"`{path.relative_to(root)}`: left out, its content disagrees with "
                            f"its path: {', '.join(wrong)}")
            continue
        metrics = obj.get(eval_set) if isinstance(obj.get(eval_set), dict) else {}
        diagnostics = obj.get("diagnostics") if isinstance(obj.get("diagnostics"), dict) else {}
        synthetic = data.get("synthetic") if isinstance(data.get("synthetic"), bool) else None
        fingerprint = data.get("fingerprint") if isinstance(data.get("fingerprint"), str) else None
        timing = obj.get("timing") if isinstance(obj.get("timing"), dict) else {}
        epochs = obj.get("epochs_run")
        cell = CellResult(path, dataset, arch, scale, recipe, fold, seed, obj["status"],
                          obj.get("error") if isinstance(obj.get("error"), str) else None,
                          synthetic, metrics, diagnostics, config, fingerprint, split,
                          obj.get("collapsed") is True, timing,
                          epochs if isinstance(epochs, int) and not isinstance(epochs, bool)
                          else None)
        cells.append(cell)  # one file per identity: the path is the identity
    return cells, problems


def ordered(values, order) -> list:
    known = [v for v in order if v in values]
    return known + sorted(v for v in values if v not in order)



def metric_value(cell: CellResult, metric: str) -> float | None:
    v = cell.metrics.get(metric)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


@dataclass
class DatasetView:
    """The cells of one dataset under one split protocol."""

    name: str
    split: str
    cells: list[CellResult]
    archs: list[str]
    scales: list[str]
    recipes: list[str]
    blocks: list[tuple[int, int]]
    missing: list[tuple]
    synthetic: bool | None
    by_key: dict
    eval_set: str = "test"  # EVAL_SETS: the partition every metric of the view comes from

    @property
    def protocol(self) -> Protocol:
        return PROTOCOLS[self.split]

    @property
    def stem(self) -> str:
        """File-name stem of this view's figures: the dataset (``<dataset>_holdout``)."""
        return self.name if self.split == "kfold" else f"{self.name}_{self.split}"

    def block_label(self, fold: int, seed: int) -> str:
        return self.protocol.label.format(fold=fold, seed=seed)

    def complete(self, arch, scale, recipe) -> dict[tuple[int, int], CellResult]:
        """(fold, seed) -> complete cell."""
        out = {}
        for fold, seed in self.blocks:
            cell = self.by_key.get((self.name, arch, scale, recipe, fold, seed))
            if cell is not None and cell.complete:
                out[(fold, seed)] = cell
        return out

    def values(self, arch, scale, recipe, metric) -> dict[tuple[int, int], float]:
        return {b: v for b, c in self.complete(arch, scale, recipe).items()
                if (v := metric_value(c, metric)) is not None}


def missing_cells(mine: list[CellResult], name: str, archs, scales, recipes, by_key) -> list:
    """The keys of the cells missing from each arch x scale's own grid, one per block format:
    the recipes run at that arch x scale in that format times the (fold, seed) blocks it has any
    cell of in that format (the baseline, which has no format, counts as nvfp4). Run matrices of
    different shapes in one folder (the hold-out matrix's 4 arms at one seed beside the
    multi-seed matrix's 2 arms at 5 seeds, or some recipes in other formats at one seed) are
    then not counted as missing each other's cells; a cell missing inside its own matrix is."""
    missing = []
    for arch, scale in product(archs, scales):
        here = [c for c in mine if (c.arch, c.scale) == (arch, scale)]
        for fmt in dict.fromkeys(split_variant(c.recipe)[1] for c in here):
            group = [c for c in here if split_variant(c.recipe)[1] == fmt]
            run = {c.recipe for c in group}
            blocks = sorted({c.block for c in group})
            missing += [(name, arch, scale, recipe, fold, seed)
                        for recipe in recipes if recipe in run
                        for fold, seed in blocks
                        if (name, arch, scale, recipe, fold, seed) not in by_key]
    return sorted(missing, key=lambda k: (archs.index(k[1]), scales.index(k[2]),
                                          recipes.index(k[3]), k[4], k[5]))


def dataset_views(cells: list[CellResult], eval_set: str = "test") -> list[DatasetView]:
    """One view per dataset and split protocol present (datasets sorted, protocols in SPLITS
    order); a view's blocks are the (fold, seed) grid of its own cells. ``eval_set``: the
    partition the cells were loaded with (``load_cells``), named by every table and figure."""
    views = []
    present = {(c.dataset, c.split) for c in cells}
    for name, split in sorted(present, key=lambda k: (k[0], SPLITS.index(k[1]))):
        mine = [c for c in cells if (c.dataset, c.split) == (name, split)]
        archs = ordered({c.arch for c in mine}, ARCH_ORDER)
        scales = ordered({c.scale for c in mine}, SCALE_ORDER)
        recipes = ordered({c.recipe for c in mine}, tuple(RECIPES))
        folds, seeds = sorted({c.fold for c in mine}), sorted({c.seed for c in mine})
        by_key = {c.key: c for c in mine}
        missing = missing_cells(mine, name, archs, scales, recipes, by_key)
        flags = {c.synthetic for c in mine if c.synthetic is not None}
        synthetic = True if True in flags else (False if flags == {False} else None)
        blocks = [(f, s) for f in folds for s in seeds]
        views.append(DatasetView(name, split, mine, archs, scales, recipes, blocks, missing,
                                 synthetic, by_key, eval_set))
    return views

