"""``Cell``: one point of the grid, arch x scale x recipe x fold x seed (x split, x format).

The one type that names a cell (the grid's unit of work, the report's unit of analysis, the
cell CLI's selection). Its files share one stem, ``fold<k>_seed<s>`` (``holdout_seed<s>`` for the
study's hold-out split, whose one partition is fold 0), in the folder
``OUT/<dataset>/<arch>/<scale>/<variant>/`` (``nvfp4bench.results.result_path``), the variant
being the recipe, or ``<recipe>@<format>`` for a block format other than the default nvfp4.
"""
from __future__ import annotations

from dataclasses import dataclass

from nvfp4bench.quant.formats import DEFAULT_FORMAT

VARIANT_SEPARATOR = "@"


def variant_name(recipe: str, format: str = DEFAULT_FORMAT) -> str:
    """``recipe`` for the default format, ``recipe@format`` otherwise."""
    return recipe if format == DEFAULT_FORMAT else f"{recipe}{VARIANT_SEPARATOR}{format}"


def split_variant(variant: str) -> tuple[str, str]:
    """``(recipe, format)`` of a variant name (``variant_name``'s inverse)."""
    recipe, _, format = variant.partition(VARIANT_SEPARATOR)
    return recipe, format or DEFAULT_FORMAT


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    arch: str
    scale: str
    recipe: str
    fold: int
    seed: int
    split: str = "kfold"  # nvfp4bench.config.SPLITS
    format: str = DEFAULT_FORMAT  # nvfp4bench.quant.formats.FORMATS

    @classmethod
    def of(cls, config) -> "Cell":
        """The cell a RunConfig (or anything with these attributes) selects."""
        return cls(config.arch, config.scale, config.recipe, int(config.fold), int(config.seed),
                   getattr(config, "split", "kfold"), getattr(config, "format", DEFAULT_FORMAT))

    @property
    def variant(self) -> str:
        """The recipe in its format: ``<recipe>`` for nvfp4, else ``<recipe>@<format>``; the
        folder of the cell's files and the name the report compares it under."""
        return variant_name(self.recipe, self.format)

    @property
    def partition(self) -> str:
        """``fold<k>`` (k-fold CV) or ``holdout``."""
        return "holdout" if self.split == "holdout" else f"fold{int(self.fold)}"

    @property
    def label(self) -> str:
        return f"{self.arch}/{self.scale}/{self.variant}/{self.partition}/seed{self.seed}"

    @property
    def stem(self) -> str:
        """The name every file of this cell starts with: ``fold<k>_seed<s>`` or
        ``holdout_seed<s>``."""
        return f"{self.partition}_seed{int(self.seed)}"

    def argv(self) -> list[str]:
        """The options of ``python -m nvfp4bench`` that select this cell."""
        split = [] if self.split == "kfold" else ["--split", self.split]
        fmt = [] if self.format == DEFAULT_FORMAT else ["--format", self.format]
        return ["--arch", self.arch, "--scale", self.scale, "--recipe", self.recipe, *fmt,
                "--fold", str(self.fold), "--seed", str(self.seed), *split]
