"""Command line of one cell (scaffold: the training issue fills in run())."""
from __future__ import annotations

import argparse

from nvfp4bench.recipes import RECIPES

ARCHS = ("cnn", "vit", "swin")
SCALES = ("tiny", "small", "base")


def build_parser() -> argparse.ArgumentParser:
    recipes = "\n".join(f"  {name:<11} {r.description}" for name, r in RECIPES.items())
    parser = argparse.ArgumentParser(
        prog="python -m nvfp4bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train and evaluate one cell (arch x scale x recipe x fold) of the grid.",
        epilog=f"recipes:\n{recipes}")
    parser.add_argument("--arch", choices=ARCHS, required=True)
    parser.add_argument("--scale", choices=SCALES, required=True)
    parser.add_argument("--recipe", choices=list(RECIPES), required=True)
    parser.add_argument("--fold", type=int, choices=range(5), required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    raise SystemExit("training is not implemented yet")
