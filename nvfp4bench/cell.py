"""``Cell``: one point of the grid, arch x scale x recipe x fold x seed (x split).

The one type that names a cell (the grid's unit of work, the report's unit of analysis, the
cell CLI's selection). Its files share one stem, ``fold<k>_seed<s>`` (``holdout_seed<s>`` for the
study's hold-out split, whose one partition is fold 0), in the folder
``OUT/<dataset>/<arch>/<scale>/<recipe>/`` (``nvfp4bench.results.result_path``).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    arch: str
    scale: str
    recipe: str
    fold: int
    seed: int
    split: str = "kfold"  # nvfp4bench.config.SPLITS

    @classmethod
    def of(cls, config) -> "Cell":
        """The cell a RunConfig (or anything with these attributes) selects."""
        return cls(config.arch, config.scale, config.recipe, int(config.fold), int(config.seed),
                   getattr(config, "split", "kfold"))

    @property
    def partition(self) -> str:
        """``fold<k>`` (k-fold CV) or ``holdout``."""
        return "holdout" if self.split == "holdout" else f"fold{int(self.fold)}"

    @property
    def label(self) -> str:
        return f"{self.arch}/{self.scale}/{self.recipe}/{self.partition}/seed{self.seed}"

    @property
    def stem(self) -> str:
        """The name every file of this cell starts with: ``fold<k>_seed<s>`` or
        ``holdout_seed<s>``."""
        return f"{self.partition}_seed{int(self.seed)}"

    def argv(self) -> list[str]:
        """The options of ``python -m nvfp4bench`` that select this cell."""
        split = [] if self.split == "kfold" else ["--split", self.split]
        return ["--arch", self.arch, "--scale", self.scale, "--recipe", self.recipe,
                "--fold", str(self.fold), "--seed", str(self.seed), *split]
