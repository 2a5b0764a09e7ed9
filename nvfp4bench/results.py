"""Result files: one JSON per cell, its path, its config hash, atomic writes.

Layout (docs/interfaces.md "Results")::

    OUT/<dataset>/<arch>/<scale>/<recipe>/fold<k>_seed<s>.json       the result
    OUT/<dataset>/<arch>/<scale>/<recipe>/fold<k>_seed<s>.ckpt.pt    last-epoch training state
    OUT/<dataset>/<arch>/<scale>/<recipe>/fold<k>_seed<s>.best.pt    best-epoch model weights
    (``holdout_seed<s>`` instead of ``fold<k>_seed<s>`` for ``--split holdout``)

A cell is done when its JSON has ``status == "complete"`` and the ``config_hash`` of the options
that change the numbers (everything but the output directory, --resume, the worker count and the
progress bar). The grid decides "done" from this, never from logs.

Values are Python floats / ints / strings; a value that does not exist is ``null``, never 0.0, and
a NaN or infinity refuses to be written (``to_jsonable`` raises), so a result never needs patching.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
SYNTHETIC_NAME = "synthetic"  # dataset name of the embedded store


def config_hash(config) -> str:
    """sha256 (16 hex digits) of the resolved options that change the result.

    ``config`` is a RunConfig; per-architecture defaults are filled in first, so ``--lr 5e-4``
    and the CNN's default hash alike. The data enters as the store's content fingerprint (see
    ``data_identity``), so a store rebuilt in place makes its cells pending again and a store
    that moved keeps them complete.
    """
    from nvfp4bench.config import NON_RESULT_FIELDS
    d = {k: v for k, v in config.resolved().to_dict().items() if k not in NON_RESULT_FIELDS}
    d["data"] = data_identity(config.data)
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data_identity(data) -> str | None:
    """What identifies the data of a cell: ``fingerprint:<hex>`` of the store at ``data`` (None:
    the embedded store) when it exists; otherwise its absolute path (None for the embedded store
    not built yet: it is deterministic, and the grid builds it before it hashes any cell)."""
    from nvfp4bench.data import DEFAULT_DATA_DIR, SliceStore
    from nvfp4bench.data.store import is_store
    path = Path(data).expanduser() if data is not None else Path(DEFAULT_DATA_DIR)
    if is_store(path):
        return "fingerprint:" + SliceStore(path).fingerprint
    return None if data is None else str(path.resolve())


def result_path(out_dir, dataset: str, arch: str, scale: str, recipe: str, fold: int,
                seed: int, split: str = "kfold") -> Path:
    """OUT/<dataset>/<arch>/<scale>/<recipe>/fold<k>_seed<s>.json (k-fold CV), or
    .../holdout_seed<s>.json for the hold-out split (its only partition)."""
    name = f"holdout_seed{int(seed)}.json" if split == "holdout" else \
        f"fold{int(fold)}_seed{int(seed)}.json"
    return Path(out_dir) / dataset / arch / scale / recipe / name


def checkpoint_paths(json_path) -> tuple[Path, Path]:
    """(last-epoch training state, best-epoch weights) beside a result JSON."""
    p = Path(json_path)
    stem = p.name[:-len(".json")] if p.name.endswith(".json") else p.name
    return p.with_name(stem + ".ckpt.pt"), p.with_name(stem + ".best.pt")


def dataset_name(data) -> str:
    """The name of the dataset at ``data`` (None: the embedded synthetic store).

    Reads the store's metadata when it exists; the embedded store not built yet is "synthetic".
    """
    from nvfp4bench.data import DEFAULT_DATA_DIR, SliceStore
    path = Path(data) if data is not None else Path(DEFAULT_DATA_DIR)
    if data is None and not path.exists():
        return SYNTHETIC_NAME
    return SliceStore(path).name


def to_jsonable(obj: Any, where: str = "result") -> Any:
    """Plain JSON types from tensors, numpy scalars, dataclasses, paths and tuples.

    Non-finite floats raise ValueError naming where they are: a result holds no NaN.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"{where}: non-finite value {obj!r} cannot be written to a result")
        return float(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj), where)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return to_jsonable(obj.item(), where)
    if hasattr(obj, "tolist"):
        return to_jsonable(obj.tolist(), where)
    raise TypeError(f"{where}: cannot write {type(obj).__name__} to JSON")


def write_json_atomic(path, obj) -> Path:
    """Write ``obj`` as JSON to ``path`` via a temporary file in the same directory + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(obj), indent=1, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it private; results are read by other users too
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_result(path) -> dict | None:
    """The result at ``path``; None when it is missing or not a readable JSON object."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def is_complete(path, config_hash: str) -> bool:
    """True when ``path`` holds a complete result of the config with hash ``config_hash``."""
    r = read_result(path)
    return bool(r) and r.get("status") == "complete" and r.get("config_hash") == config_hash
