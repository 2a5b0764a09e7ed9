"""Patient-level, burden-stratified k-fold splits, saved as a seeded JSON artifact.

Rule (seed s, k folds), nnU-Net style: the split is computed once and stored in
``STORE/folds.json`` (``folds-k{k}-seed{s}.json`` for other k or seeds); loading validates the file
against the store's patients and raises on any mismatch, never re-splitting silently.

1. burden b_p = whole-tumour voxels of patient p's volume.
2. bins: with q1, q2 the 1/3 and 2/3 quantiles of {b_p}, bin_p = [b_p > q1] + [b_p > q2], so
   tumour-free patients (b = 0) always fall in the lowest bin.
3. within each bin, patients (sorted by id) are shuffled by ``np.random.default_rng(s)`` and dealt
   round-robin to folds 0..k-1, the dealing continuing from bin to bin so fold sizes differ by <= 1.
4. fold f: test-time held-out set H_f = patients dealt to f, in dealing order (bin by bin);
   alternately val, test, val, ... (so both halves are stratified; val gets the odd one);
   train = everyone else.

Every fold is checked: train, val and test are disjoint and cover all patients, and every patient
is held out exactly once over the k folds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nvfp4bench.atomic import write_json_atomic

N_FOLDS = 5
SPLIT_SEED = 2026
N_BINS = 3


def burden_bins(burden: dict[str, float], n_bins: int = N_BINS) -> dict[str, int]:
    """Patient -> quantile bin 0..n_bins-1 of its burden (b = 0 always in bin 0)."""
    values = np.array(list(burden.values()), dtype=np.float64)
    edges = np.quantile(values, [i / n_bins for i in range(1, n_bins)])
    return {p: int((b > edges).sum()) for p, b in burden.items()}


def make_folds(burden: dict[str, float], n_folds: int = N_FOLDS, seed: int = SPLIT_SEED) -> dict:
    """The split as a JSON-ready dict: {"n_folds", "seed", "bins", "folds": [{train, val, test}]}."""
    if len(burden) < 2 * n_folds:
        raise ValueError(f"{len(burden)} patients cannot make {n_folds} folds with a validation "
                         f"and a test patient each (need >= {2 * n_folds})")
    bins = burden_bins(burden)
    rng = np.random.default_rng(seed)
    held: list[list[str]] = [[] for _ in range(n_folds)]
    turn = 0
    for b in range(N_BINS):
        members = sorted(p for p, v in bins.items() if v == b)
        for p in [members[i] for i in rng.permutation(len(members))]:
            held[turn % n_folds].append(p)
            turn += 1
    everyone = sorted(burden)
    folds = []
    for f in range(n_folds):
        val, test = held[f][0::2], held[f][1::2]
        out = set(held[f])
        folds.append({"train": [p for p in everyone if p not in out], "val": val, "test": test})
    split = {"n_folds": n_folds, "seed": seed, "stratified_by": "tumour_voxels",
             "n_bins": N_BINS, "rule": "nvfp4bench.data.folds (module docstring)",
             "patients": everyone, "bins": bins, "folds": folds}
    check_folds(split, everyone)
    return split


def check_folds(split: dict, patients) -> None:
    """Raise AssertionError on a leak (a patient in two partitions), a patient mismatch, or a
    patient not held out exactly once over the folds."""
    patients = set(patients)
    held_count: dict[str, int] = {}
    for f, fold in enumerate(split["folds"]):
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
    twice = [p for p, c in held_count.items() if c > 1]
    assert not twice, f"patients held out in more than one fold: {twice[:5]}"
    never = sorted(patients - set(held_count))
    assert not never, f"patients never held out (no fold tests them): {never[:5]}"


def folds_path(store_dir: str | Path, n_folds: int = N_FOLDS, seed: int = SPLIT_SEED) -> Path:
    name = "folds.json" if (n_folds, seed) == (N_FOLDS, SPLIT_SEED) else \
        f"folds-k{n_folds}-seed{seed}.json"
    return Path(store_dir) / name


def load_folds(store_dir: str | Path, n_folds: int = N_FOLDS, seed: int = SPLIT_SEED) -> list[dict]:
    """[{"train", "val", "test"}] per fold, patient ids; creates the JSON on first use.

    An existing file is validated against the store (same patients, same k and seed, no leak) and
    a mismatch raises ValueError: delete the file to re-split on purpose.
    """
    from nvfp4bench.data.store import SliceStore

    store = SliceStore(store_dir)
    path = folds_path(store_dir, n_folds, seed)
    if path.exists():
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
        try:
            check_folds(split, store.patients)
        except AssertionError as e:
            raise ValueError(f"{path}: {e}") from None
    else:
        split = make_folds({p: store.burden(p) for p in store.patients}, n_folds, seed)
        split["store_fingerprint"] = store.fingerprint
        write_json_atomic(path, split)  # the content is deterministic: concurrent writers agree
    return [{k: list(f[k]) for k in ("train", "val", "test")} for f in split["folds"]]
