"""Atomic file writes: the one way nvfp4bench writes a result, checkpoint, report or folds file.

    write_atomic(path, fill)   fill(tmp) writes a temporary file beside ``path`` (same directory,
                               so the same file system); it is fsync'ed, made world-readable
                               (0o644: mkstemp creates 0o600) and renamed over ``path``
                               (os.replace). A reader sees the old file or the new one, never a
                               half-written one; on any error the temporary file is removed.

``write_text_atomic``, ``write_json_atomic`` (plain JSON types, NaN refused) and
``save_torch_atomic`` (``torch.save``) are this with the obvious ``fill``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch


def write_atomic(path, fill: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically: ``fill(tmp)`` writes a temporary file that replaces it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fill(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, newline=""))


def write_json_atomic(path, obj, indent: int | None = 1) -> Path:
    """``obj`` (plain JSON types only; NaN and infinity refused) as JSON, newline-terminated."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def save_torch_atomic(obj, path) -> Path:
    """``torch.save(obj, path)``, atomically (the argument order of torch.save)."""
    return write_atomic(path, lambda tmp: torch.save(obj, tmp))
