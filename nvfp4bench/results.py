"""Result files: one JSON per cell, its path, its config hash, atomic writes.

Layout (docs/interfaces.md "Results")::

    OUT/<dataset>/<arch>/<scale>/<recipe>/fold<k>_seed<s>.json       the result
    OUT/<dataset>/<arch>/<scale>/<recipe>/fold<k>_seed<s>.ckpt.pt    last-epoch training state
    OUT/<dataset>/<arch>/<scale>/<recipe>/fold<k>_seed<s>.best.pt    best-epoch model weights
    OUT/<dataset>/<arch>/<scale>/<recipe>/fold<k>_seed<s>.{lock,log} the grid's lock and log
    (``holdout_seed<s>`` instead of ``fold<k>_seed<s>`` for ``--split holdout``; the folder
    ``<recipe>@<format>`` instead of ``<recipe>`` for a block format other than nvfp4)

``<dataset>`` identifies the store (``dataset_dir``): ``<name>-<first 8 hex digits of its content
fingerprint>`` (``brats-1f0c9a2e``), so two stores never share a result path, whatever their
names; the embedded synthetic store (data/synthetic, the default) keeps the stable ``synthetic``.
A result already at a path that was made from another store (a rebuilt embedded store) is never
replaced: ``check_same_store`` refuses, naming the file.

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
import re
from pathlib import Path
from typing import Any

from nvfp4bench import atomic
from nvfp4bench.cell import Cell
from nvfp4bench.config import DEFAULT_FORMAT, NON_RESULT_FIELDS, PROTOCOL_VERSION, SPLITS
from nvfp4bench.data.store import (DEFAULT_DATA_DIR, SYNTHETIC_NAME, SliceStore, is_store,
                                   store_dir_name)

SCHEMA_VERSION = 1
RESULT_STATUSES = ("complete", "failed", "running")
# result_problem: the identity keys of a result's config, with their types
IDENTITY_TYPES = {"arch": str, "scale": str, "recipe": str, "fold": int, "seed": int}
# the keys of a partition's metrics that are not numbers, with their types
PARTITION_EXTRAS = {"hd95_unit": (str, type(None)), "spacing": (list, type(None)),
                    "per_patient": list}


def config_hash(config) -> str:
    """sha256 (16 hex digits) of the resolved options that change the result.

    ``config`` is a RunConfig; per-architecture defaults are filled in first, so ``--lr 5e-4``
    and the CNN's default hash alike. The data enters as the store's content fingerprint (see
    ``data_identity``), so a store rebuilt in place makes its cells pending again and a store
    that moved keeps them complete. ``config.PROTOCOL_VERSION`` enters too: a result computed
    before a change of what a cell computes is outdated. The default ``--format nvfp4`` is left
    out, so that the hash of an nvfp4 cell is the one it had before formats existed.
    """
    d = {k: v for k, v in config.resolved().to_dict().items() if k not in NON_RESULT_FIELDS}
    if d.get("format") == DEFAULT_FORMAT:
        del d["format"]
    d["data"] = data_identity(config.data)
    d["protocol"] = PROTOCOL_VERSION
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _store_path(data) -> Path:
    return Path(data).expanduser() if data is not None else Path(DEFAULT_DATA_DIR)


def data_identity(data) -> str | None:
    """What identifies the data of a cell: ``fingerprint:<hex>`` of the store at ``data`` (None:
    the embedded store) when it exists; otherwise its absolute path (None for the embedded store
    not built yet: it is deterministic, and the grid builds it before it hashes any cell)."""
    path = _store_path(data)
    if is_store(path):
        return "fingerprint:" + SliceStore(path).fingerprint
    return None if data is None else str(path.resolve())


def dataset_dir(data) -> str:
    """The ``<dataset>`` folder of the store at ``data`` (None: the embedded synthetic store,
    ``synthetic`` even before it is built). A missing store raises FileNotFoundError."""
    if data is None and not _store_path(None).exists():
        return SYNTHETIC_NAME
    return store_dir_name(SliceStore(_store_path(data)))


def result_path(config, store=None) -> Path:
    """OUT/<dataset>/<arch>/<scale>/<variant>/fold<k>_seed<s>.json of a RunConfig; the variant is
    the recipe, ``<recipe>@<format>`` for a format other than nvfp4 (``Cell.variant``).

    ``store``: the config's SliceStore when already open (saves opening it again)."""
    dataset = store_dir_name(store) if store is not None else dataset_dir(config.data)
    cell = Cell.of(config)
    return Path(config.out) / dataset / cell.arch / cell.scale / cell.variant / f"{cell.stem}.json"


def sibling(json_path, suffix: str) -> Path:
    """The cell file beside a result JSON: ``sibling(p, ".ckpt.pt")`` -> fold<k>_seed<s>.ckpt.pt."""
    p = Path(json_path)
    stem = p.name[:-len(".json")] if p.name.endswith(".json") else p.name
    return p.with_name(stem + suffix)


def checkpoint_paths(json_path) -> tuple[Path, Path]:
    """(last-epoch training state, best-epoch weights) beside a result JSON."""
    return sibling(json_path, ".ckpt.pt"), sibling(json_path, ".best.pt")


def check_same_store(json_path, fingerprint: str) -> None:
    """Refuse (ValueError, one line) when ``json_path`` holds a result of another store."""
    found = ((read_result(json_path) or {}).get("data") or {}).get("fingerprint")
    if found is not None and found != fingerprint:
        raise ValueError(f"{json_path} holds a result made from another data store (fingerprint "
                         f"{found[:12]}, this store {fingerprint[:12]}); not replacing it: move "
                         f"it away or pass another --out")


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


def write_result(path, obj) -> Path:
    """Write the result ``obj`` (made plain by ``to_jsonable``) as JSON to ``path``, atomically."""
    return atomic.write_json_atomic(path, to_jsonable(obj))


def read_result(path) -> dict | None:
    """The result at ``path``; None when it is missing or not a readable JSON object."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def result_problem(obj) -> str | None:
    """The first thing wrong with a result object, or None when it is well-formed.

    Well-formed: a JSON object with this ``schema_version``, a known ``status``, a 16-hex-digit
    ``config_hash``, a ``config`` object whose identity keys have their types (arch, scale,
    recipe: str; fold, seed: int; split one of SPLITS), a ``data`` object, and, when complete,
    ``val`` and ``test`` objects whose metrics are finite numbers or null (their few descriptive
    keys, ``PARTITION_EXTRAS``, have their own types). The report, the grid's "done" and
    ``--resume`` read only well-formed results.
    """
    if not isinstance(obj, dict):
        return "not a JSON object"
    if obj.get("schema_version") != SCHEMA_VERSION:
        return f"schema_version is {obj.get('schema_version')!r}, not {SCHEMA_VERSION}"
    if obj.get("status") not in RESULT_STATUSES:
        return f"status is {obj.get('status')!r}, not one of {', '.join(RESULT_STATUSES)}"
    h = obj.get("config_hash")
    if not (isinstance(h, str) and re.fullmatch(r"[0-9a-f]{16}", h)):
        return f"config_hash is {h!r}, not 16 hex digits"
    config = obj.get("config")
    if not isinstance(config, dict):
        return f"config is a {type(config).__name__}, not an object"
    for key, kind in IDENTITY_TYPES.items():
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"config.{key} is {value!r}, not a {kind.__name__}"
    if config.get("split", "kfold") not in SPLITS:
        return f"config.split is {config.get('split')!r}, not one of {', '.join(SPLITS)}"
    if not isinstance(obj.get("data"), dict):
        return f"data is a {type(obj.get('data')).__name__}, not an object"
    if obj["status"] == "complete":
        for part in ("val", "test"):
            block = obj.get(part)
            if not isinstance(block, dict):
                return f"status complete but {part} is a {type(block).__name__}, not an object"
            for key, value in block.items():
                if key in PARTITION_EXTRAS:
                    if not isinstance(value, PARTITION_EXTRAS[key]):
                        return f"{part}.{key} is {value!r}"
                elif value is not None and (isinstance(value, bool)
                                            or not isinstance(value, (int, float))
                                            or not math.isfinite(value)):
                    return f"{part}.{key} is {value!r}, not a finite number or null"
    return None


def is_complete(path, config_hash: str) -> bool:
    """True when ``path`` holds a well-formed, complete result of the config with hash
    ``config_hash``."""
    r = read_result(path)
    return (r is not None and result_problem(r) is None and r["status"] == "complete"
            and r["config_hash"] == config_hash)
