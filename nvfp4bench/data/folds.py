"""Patient-level splits, exactly the study's (``main.py`` of its code release), in ``folds.json``.

The split is computed when the store is built (``data_prep.py`` calls ``write_folds``), so the
partitions can be read before any training, and stored in ``STORE/folds.json`` (``folds-k{k}-
seed{s}.json`` for other k or seeds). Loading validates the file against the store and raises on
any mismatch, never re-splitting silently. Two protocols (``--split``):

1. stratum. f_p = positive-slice fraction of patient p = (slices of p whose mask has any tumour
   pixel) / (slices of p), over the slices in the store. Patients sorted by id (pandas' groupby
   order), binned by ``pandas.qcut(f, q=3, labels=False, duplicates="drop")``: quantile edges of
   the f_p, duplicate edges dropped, so heavy ties (e.g. many tumour-free patients) give fewer
   than 3 strata (or, when every f_p is equal, no stratum at all: NaN labels).
2. ``kfold`` (5-fold cross-validation, the default): ``StratifiedKFold(5, shuffle=True,
   random_state=2026).split(ids, strata)``; fold f's held-out patients H_f are split into val and
   test by ``train_test_split(H_f, test_size=0.5, random_state=2026 + f, stratify=...)`` with the
   strata of H_f when H_f has more than one stratum, else unstratified ("stratified when possible",
   the study's own test). train = everyone else.
3. ``holdout`` (the study's main protocol, one partition, "fold 0"): ``train_test_split(ids,
   test_size=0.2, random_state=2026, stratify=strata)`` -> train, rest; then
   ``train_test_split(rest, test_size=0.5, random_state=2026, stratify=...)`` -> val, test, again
   stratified only when the rest has more than one stratum.

Where scikit-learn refuses a stratified split that the study's code asks for (a stratum with a
single patient, fewer patients per stratum than folds, NaN strata), the study's code stops with
that error. We do not: the same call runs unstratified (``KFold(5, shuffle=True, random_state)``
for the folds) and the fold records ``"stratified": false`` with sklearn's reason. Every split the
study's code produces is reproduced exactly (tests/data/test_folds.py compares with pandas + sklearn).

Each partition is stored sorted by patient id (the study's DataFrames keep the file order, i.e.
sorted by patient folder). Every split is checked: train, val and test are disjoint and cover all
patients; over the k folds every patient is held out exactly once.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from nvfp4bench.atomic import write_json_atomic
from nvfp4bench.data.store import SliceStore

N_FOLDS = 5
SPLIT_SEED = 2026
N_BINS = 3
HOLDOUT_TEST_SIZE = 0.2  # of all patients: the val + test share of the hold-out
VAL_TEST_RATIO = 0.5  # test share of the held-out patients
PROTOCOLS = ("kfold", "holdout")
FORMAT = "nvfp4bench-folds"
VERSION = 2


def positive_fraction(store) -> dict[str, float]:
    """Patient -> fraction of its stored slices whose mask has any tumour pixel."""
    out = {}
    for p in store.patients:
        r = store.record(p)
        n_pos = r.get("tumour_slices")
        if n_pos is None:  # an index written before the field existed
            masks = store.masks[r["start"]:r["start"] + r["slices"]]
            n_pos = int((masks.reshape(len(masks), -1).max(axis=1) > 0).sum())
        out[p] = float(n_pos) / float(r["slices"])
    return out


def strata(fraction: dict[str, float], n_bins: int = N_BINS) -> tuple[np.ndarray, np.ndarray]:
    """(patient ids sorted, their qcut labels): pandas.qcut(q=n_bins, labels=False,
    duplicates="drop") over the patients sorted by id (int labels, float NaN when undefined)."""
    import pandas as pd  # pandas and scikit-learn (~1 s to import): only when a split is made
    s = pd.Series(fraction, dtype=np.float64).sort_index()
    labels = pd.qcut(s, q=n_bins, labels=False, duplicates="drop")
    return s.index.to_numpy(dtype=object), labels.to_numpy()


def _can_stratify(labels: np.ndarray) -> bool:
    """The study's test before its second train_test_split: more than one stratum."""
    return len(np.unique(labels)) > 1


def _two_way(ids, labels, test_size: float, seed: int, stratify: bool):
    """train_test_split(ids, test_size, random_state=seed, stratify=labels if stratify) ->
    (a, b, stratified, reason); unstratified when sklearn refuses the stratified split."""
    from sklearn.model_selection import train_test_split  # (~1 s): only when a split is made
    if stratify:
        try:
            a, b = train_test_split(ids, test_size=test_size, random_state=seed, stratify=labels)
            return a, b, True, None
        except ValueError as e:
            reason = str(e)
    else:
        reason = "a single stratum"
    a, b = train_test_split(ids, test_size=test_size, random_state=seed, stratify=None)
    return a, b, False, reason


def _fold(ids, train, val, test, **info) -> dict:
    return {"train": sorted(ids[train].tolist()),
            "val": sorted(val.tolist()), "test": sorted(test.tolist()), **info}


def kfold_split(ids: np.ndarray, labels: np.ndarray, n_folds: int = N_FOLDS,
                seed: int = SPLIT_SEED) -> list[dict]:
    """The study's patient_kfold_split (module docstring, point 2)."""
    from sklearn.model_selection import KFold, StratifiedKFold  # (~1 s): only for a split
    if len(ids) < 2 * n_folds:
        raise ValueError(f"{len(ids)} patients cannot make {n_folds} folds with a validation and "
                         f"a test patient each (need >= {2 * n_folds})")
    try:
        with warnings.catch_warnings():  # "least populated class has fewer members than n_splits"
            warnings.simplefilter("ignore", UserWarning)
            splits = list(StratifiedKFold(n_folds, shuffle=True, random_state=seed)
                          .split(ids, labels))
        outer, outer_reason = True, None
    except ValueError as e:
        splits = list(KFold(n_folds, shuffle=True, random_state=seed).split(ids))
        outer, outer_reason = False, str(e)
    folds = []
    for f, (train, held) in enumerate(splits):
        val, test, inner, reason = _two_way(ids[held], labels[held], VAL_TEST_RATIO, seed + f,
                                            _can_stratify(labels[held]))
        folds.append(_fold(ids, train, val, test, stratified={
            "folds": outer, "folds_reason": outer_reason, "val_test": inner,
            "val_test_reason": reason}))
    return folds


def holdout_split(ids: np.ndarray, labels: np.ndarray, seed: int = SPLIT_SEED) -> list[dict]:
    """The study's patient_holdout_split (module docstring, point 3): one partition."""
    train, rest, outer, outer_reason = _two_way(ids, labels, HOLDOUT_TEST_SIZE, seed, True)
    order = {p: i for i, p in enumerate(ids)}  # labels of `rest` in its own (shuffled) order
    rest_labels = labels[[order[p] for p in rest]]
    val, test, inner, reason = _two_way(rest, rest_labels, VAL_TEST_RATIO, seed,
                                        _can_stratify(rest_labels))
    fold = {"train": sorted(train.tolist()), "val": sorted(val.tolist()),
            "test": sorted(test.tolist()),
            "stratified": {"train_rest": outer, "train_rest_reason": outer_reason,
                           "val_test": inner, "val_test_reason": reason}}
    return [fold]


SPLITTERS = {"kfold": lambda ids, labels, k, seed: kfold_split(ids, labels, k, seed),
             "holdout": lambda ids, labels, k, seed: holdout_split(ids, labels, seed)}


def make_split(fraction: dict[str, float], n_folds: int = N_FOLDS,
               seed: int = SPLIT_SEED) -> dict:
    """Both protocols as one JSON-ready dict (a protocol that cannot be made holds its error)."""
    ids, labels = strata(fraction)
    protocols = {}
    for name, splitter in SPLITTERS.items():
        try:
            folds = splitter(ids, labels, n_folds, seed)
            check_folds(folds, ids.tolist(), every_patient_held_once=name == "kfold")
            protocols[name] = {"folds": folds}
        except ValueError as e:
            protocols[name] = {"error": str(e)}
    return {"format": FORMAT, "version": VERSION, "seed": seed, "n_folds": n_folds,
            "n_bins": N_BINS, "rule": "the study's main.py splits (nvfp4bench.data.folds)",
            "stratified_by": "positive_slice_fraction", "patients": ids.tolist(),
            "positive_fraction": {p: fraction[p] for p in ids.tolist()},
            "stratum": {p: None if s != s else int(s) for p, s in zip(ids.tolist(), labels)},
            "protocols": protocols}


def check_folds(folds: list[dict], patients, every_patient_held_once: bool = True) -> None:
    """Raise AssertionError on a leak (a patient in two partitions), a patient mismatch, or (k
    folds) a patient not held out exactly once over the folds."""
    patients = set(patients)
    held_count: dict[str, int] = {}
    for f, fold in enumerate(folds):
        parts = {k: set(fold[k]) for k in ("train", "val", "test")}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            leak = parts[a] & parts[b]
            assert not leak, f"fold {f}: patients in both {a} and {b}: {sorted(leak)[:5]}"
        for k in parts:
            assert len(parts[k]) == len(fold[k]), f"fold {f}: a patient is listed twice in {k}"
        union = parts["train"] | parts["val"] | parts["test"]
        assert union == patients, (
            f"fold {f}: patients differ from the store's (missing {sorted(patients - union)[:5]}, "
            f"unknown {sorted(union - patients)[:5]})")
        for p in parts["val"] | parts["test"]:
            held_count[p] = held_count.get(p, 0) + 1
    if not every_patient_held_once:
        return
    twice = [p for p, c in held_count.items() if c > 1]
    assert not twice, f"patients held out in more than one fold: {twice[:5]}"
    never = sorted(patients - set(held_count))
    assert not never, f"patients never held out (no fold tests them): {never[:5]}"


def folds_path(store_dir: str | Path, n_folds: int = N_FOLDS, seed: int = SPLIT_SEED) -> Path:
    name = "folds.json" if (n_folds, seed) == (N_FOLDS, SPLIT_SEED) else \
        f"folds-k{n_folds}-seed{seed}.json"
    return Path(store_dir) / name


def _write(path: Path, split: dict) -> None:
    write_json_atomic(path, split)  # the content is deterministic: concurrent writers agree


def write_folds(store_dir: str | Path, n_folds: int = N_FOLDS, seed: int = SPLIT_SEED) -> Path:
    """Compute both protocols' splits of the store at ``store_dir`` and write its folds file."""
    path = folds_path(store_dir, n_folds, seed)
    _write(path, make_split(positive_fraction(SliceStore(store_dir)), n_folds, seed))
    return path


def _validated(path: Path, store, n_folds: int, seed: int) -> dict:
    try:
        split = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it to re-split") from None
    if split.get("n_folds") != n_folds or split.get("seed") != seed:
        raise ValueError(f"{path}: holds {split.get('n_folds')} folds with seed "
                         f"{split.get('seed')}, asked for {n_folds} with seed {seed}")
    if sorted(split.get("patients", [])) != sorted(store.patients):
        raise ValueError(f"{path}: its patients differ from the store's {store.path}; the store "
                         "was rebuilt? Delete the folds file to re-split on purpose")
    if split.get("positive_fraction") != positive_fraction(store):
        raise ValueError(f"{path}: its positive-slice fractions differ from the store's "
                         f"{store.path}; the store was rebuilt? Delete the folds file to re-split")
    for name, proto in split.get("protocols", {}).items():
        if "folds" in proto:
            try:
                check_folds(proto["folds"], store.patients, every_patient_held_once=name == "kfold")
            except AssertionError as e:
                raise ValueError(f"{path}: {name}: {e}") from None
    return split


def load_folds(store_dir: str | Path, n_folds: int = N_FOLDS, seed: int = SPLIT_SEED, *,
               split: str = "kfold") -> list[dict]:
    """[{"train", "val", "test"}] per fold of protocol ``split`` (one for "holdout"), patient ids.

    The folds file is written by data_prep; a store without one gets it here. A file written by an
    older nvfp4bench (its own round-robin folds) is kept as ``<name>.v1`` and replaced. An existing
    file is validated against the store (same patients and fractions, same k and seed, no leak);
    a mismatch raises ValueError: delete the file to re-split on purpose.
    """

    if split not in PROTOCOLS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(PROTOCOLS)}")
    store = SliceStore(store_dir)
    path = folds_path(store_dir, n_folds, seed)
    if path.exists() and not _is_current(path):
        old = path.with_name(path.name + ".v1")
        try:
            os.replace(path, old)
            print(f"nvfp4bench: {path} held nvfp4bench's former folds; kept as {old.name}, "
                  f"replaced by the study's splits", file=sys.stderr)
        except FileNotFoundError:  # another process moved it first
            pass
    if not path.exists():
        write_folds(store_dir, n_folds, seed)
    proto = _validated(path, store, n_folds, seed)["protocols"].get(split)
    if proto is None or "folds" not in proto:
        why = (proto or {}).get("error", "missing")
        raise ValueError(f"{path}: no {split} split for this store: {why}")
    return [{k: list(f[k]) for k in ("train", "val", "test")} for f in proto["folds"]]


def _is_current(path: Path) -> bool:
    """True unless the file is readable JSON of another (older) folds format."""
    try:
        split = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return True  # let _validated name the problem
    return not isinstance(split, dict) or split.get("version") == VERSION or "folds" not in split
