"""Number options of the command lines, checked against their ranges when they are parsed.

Every numeric option of ``python -m nvfp4bench``, ``data_prep.py``, the grid and the checks is an
argparse ``type=`` made here, so a bad value stops the command before it reads any data or does
any work: exit code 2 and one line naming the option (``argument --lr: ...``).

* ``integer(lo, hi)``: a whole number in [lo, hi].
* ``real(lo, hi, low_open=..., high_open=...)``: a finite number in the interval, also
  representable in float32 (|x| <= 3.4e38), the precision the models and the quantizer compute in.

Ranges that are a choice, not a definition:

    MAX_THREADS = 256        CPU threads of torch; far more than any CPU here has. A huge count
                             crashes inside OpenMP (99999 segfaults) or crawls (1000 threads
                             made one epoch take minutes on 2 cores).
    MAX_WORKERS = 256        DataLoader / data_prep worker processes.
    SEED_MAX = 2**32 - 1     the largest seed NumPy's and torch's generators take from us.
    MAX_LR = 1e4             a larger Adam step overflows float32 weights within a few updates
                             (--lr 1e38 failed with a RuntimeError); 1e4 already collapses a run.
    MAX_EPOCHS = 100_000, MAX_PATIENCE = 100_000, MAX_BATCH = 65_536
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

FLOAT32_MAX = 3.4028234663852886e38
MAX_THREADS = 256
MAX_WORKERS = 256
SEED_MAX = 2**32 - 1
MAX_LR = 1e4
MAX_EPOCHS = 100_000
MAX_PATIENCE = 100_000
MAX_BATCH = 65_536


def _interval(lo, hi, low_open: bool = False, high_open: bool = False) -> str:
    return f"{'(' if low_open else '['}{lo:g}, {hi:g}{')' if high_open else ']'}"


def integer(lo: int, hi: int) -> Callable[[str], int]:
    """argparse type: a whole number from ``lo`` to ``hi``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer from {lo} to {hi}, got {text}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its own messages
    return parse


def real(lo: float, hi: float, *, low_open: bool = False, high_open: bool = False,
         what: str = "a finite number") -> Callable[[str], float]:
    """argparse type: a finite number in the interval (``lo``, ``hi``; open ends as asked),
    representable in float32; ``what`` names it in the error."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        inside = ((value > lo if low_open else value >= lo)
                  and (value < hi if high_open else value <= hi))
        if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX and inside):
            raise argparse.ArgumentTypeError(
                f"must be {what} in {_interval(lo, hi, low_open, high_open)}, got {text}")
        return value
    parse.__name__ = "real"
    return parse


def positive_int(hi: int) -> Callable[[str], int]:
    return integer(1, hi)


def non_negative_int(hi: int) -> Callable[[str], int]:
    return integer(0, hi)


def probability() -> Callable[[str], float]:
    """A probability strictly between 0 and 1."""
    return real(0.0, 1.0, low_open=True, high_open=True, what="a probability")


def fraction() -> Callable[[str], float]:
    """A share from 0 to 1, ends included."""
    return real(0.0, 1.0)
