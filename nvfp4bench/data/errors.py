"""The one error type of the data pipeline: a bad input, named by its case and file.

Every check in the readers raises :class:`DataError` with the case id, the offending file and the
problem in words, so ``data_prep.py`` can print one line per bad case (and skip it with
``--on-error skip``) instead of a traceback.
"""
from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """A bad input: ``case`` (id or None), ``file`` (path or None) and ``problem`` (words)."""

    def __init__(self, problem: str, *, case: str | None = None, file: str | Path | None = None):
        self.problem = problem
        self.case = case
        self.file = None if file is None else str(file)
        super().__init__(str(self))

    def __str__(self) -> str:
        where = [p for p in (f"case {self.case}" if self.case else None, self.file) if p]
        return (": ".join(where) + ": " if where else "") + self.problem

    def __reduce__(self):  # picklable across multiprocessing workers
        return (_rebuild, (self.problem, self.case, self.file))


def _rebuild(problem: str, case: str | None, file: str | None) -> DataError:
    return DataError(problem, case=case, file=file)
