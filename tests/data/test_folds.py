"""The splits are the study's: folds.json equals what the study's main.py procedure gives.

The reference below restates the study's procedure with pandas and scikit-learn on a per-slice
table (patient_id, slice_diagnosis), the way its release does it; where the study's code would
stop with sklearn's error, the reference computes the unstratified fallback that folds.py
documents, and the test checks that the fold says so.
"""
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

from nvfp4bench.data.folds import check_folds, load_folds, write_folds
from nvfp4bench.data.preprocess import CaseSlices
from nvfp4bench.data.store import SliceStore, StoreWriter

# the reference's StratifiedKFold warns when a stratum has fewer patients than folds
pytestmark = pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")


def patient_list(n: int, seed: int) -> dict[str, list[int]]:
    """n patients -> per-slice tumour flags: tumour-free patients, tied fractions, shuffled ids."""
    rng = np.random.default_rng(seed)
    tied = [(0, 10), (5, 20), (10, 20), (3, 12)]  # fractions 0, .25, .5, .25 again
    out = {}
    for i in rng.permutation(n):
        pid = f"TCGA_{'ABCD'[i % 4]}{i % 7}_{1000 + 37 * i % 9000:04d}_{19900101 + i}"
        r = rng.random()
        if r < 0.2:
            pos, tot = 0, int(rng.integers(5, 30))
        elif r < 0.5:
            pos, tot = tied[int(rng.integers(len(tied)))]
        else:
            tot = int(rng.integers(5, 40))
            pos = int(rng.integers(1, tot + 1))
        flags = [1] * pos + [0] * (tot - pos)
        out[pid] = [int(v) for v in rng.permutation(flags)]
    return out


def _tts(ids, size, seed, labels):
    try:
        return (*train_test_split(ids, test_size=size, random_state=seed, stratify=labels), True)
    except ValueError:
        return (*train_test_split(ids, test_size=size, random_state=seed), False)


def study_splits(slices: dict[str, list[int]]) -> dict:
    """The study's partitions (sorted), and whether each stratified step ran as in the study."""
    df = pd.DataFrame([(p, d) for p, ds in slices.items() for d in ds],
                      columns=["patient_id", "slice_diagnosis"])
    frac = df.groupby("patient_id")["slice_diagnosis"].mean()
    bins = pd.qcut(frac, q=3, labels=False, duplicates="drop")
    ids, labels = bins.index.values, bins.values
    kfold = []
    try:
        splits = list(StratifiedKFold(n_splits=5, shuffle=True, random_state=2026)
                      .split(ids, labels))
        outer = True
    except ValueError:
        splits, outer = list(KFold(n_splits=5, shuffle=True, random_state=2026).split(ids)), False
    for f, (tr, held) in enumerate(splits):
        strat = labels[held] if len(np.unique(labels[held])) > 1 else None
        val, test, ok = _tts(ids[held], 0.5, 2026 + f, strat)
        kfold.append({"train": sorted(ids[tr]), "val": sorted(val), "test": sorted(test),
                      "outer": outer, "inner": ok and strat is not None})
    try:
        train, rest, _, rest_labels = train_test_split(ids, labels, test_size=0.2,
                                                       random_state=2026, stratify=labels)
        outer = True
    except ValueError:
        train, rest, _, rest_labels = train_test_split(ids, labels, test_size=0.2,
                                                       random_state=2026)
        outer = False
    strat = rest_labels if len(np.unique(rest_labels)) > 1 else None
    val, test, ok = _tts(rest, 0.5, 2026, strat)
    holdout = [{"train": sorted(train), "val": sorted(val), "test": sorted(test),
                "outer": outer, "inner": ok and strat is not None}]
    return {"kfold": kfold, "holdout": holdout}


def build_store(path, slices: dict[str, list[int]]):
    """A slice store of 4x4 slices whose masks carry the given tumour flags, as data_prep
    writes it (StoreWriter, then write_folds)."""
    with StoreWriter(path, image_size=4, modalities=("t1", "flair", "t1ce")) as w:
        for pid in sorted(slices, key=lambda p: p[::-1]):  # store order != id order
            flags = slices[pid]
            masks = np.zeros((len(flags), 4, 4), np.uint8)
            masks[np.array(flags, bool), 1, 2] = 1
            w.add(CaseSlices(pid, np.zeros((len(flags), 3, 4, 4), np.uint8), masks,
                             np.arange(len(flags), dtype=np.int32), int(sum(flags)), None,
                             len(flags), (4, 4), None))
        w.finalize({"name": "t", "synthetic": True})
    write_folds(path)
    return path


CASES = [(n, s) for n in (10, 11, 13, 17, 24, 40, 57, 83, 110, 120) for s in (0, 1)]


@pytest.mark.parametrize("n,seed", CASES)
def test_folds_json_is_the_studys_partition(tmp_path, n, seed):
    slices = patient_list(n, seed)
    store = build_store(tmp_path / "s", slices)
    saved = json.loads((store / "folds.json").read_text())
    want = study_splits(slices)
    for proto in ("kfold", "holdout"):
        folds = saved["protocols"][proto]["folds"]
        assert len(folds) == len(want[proto])
        for got, ref in zip(folds, want[proto]):
            assert {k: got[k] for k in ("train", "val", "test")} == \
                   {k: ref[k] for k in ("train", "val", "test")}
            flags = got["stratified"]
            outer = flags["folds"] if proto == "kfold" else flags["train_rest"]
            assert (outer, flags["val_test"]) == (ref["outer"], ref["inner"])
        check_folds(folds, slices, every_patient_held_once=proto == "kfold")
        assert load_folds(store, split=proto) == [
            {k: f[k] for k in ("train", "val", "test")} for f in folds]


def test_the_studys_own_runs_are_reproduced_without_fallback(tmp_path):
    """A dataset like the study's (110 patients, ~36 slices each): every step stratified."""
    slices = patient_list(110, 7)
    store = build_store(tmp_path / "s", slices)
    saved = json.loads((store / "folds.json").read_text())
    for f in saved["protocols"]["kfold"]["folds"]:
        assert f["stratified"]["folds"] and f["stratified"]["val_test"]
    h = saved["protocols"]["holdout"]["folds"][0]
    assert h["stratified"]["train_rest"] and h["stratified"]["val_test"]
    assert (len(h["train"]), len(h["val"]), len(h["test"])) == (88, 11, 11)


def test_load_folds_validates_and_keeps_an_old_file(tmp_path, capsys):
    store = build_store(tmp_path / "s", patient_list(20, 3))
    path = store / "folds.json"
    saved = json.loads(path.read_text())
    tampered = dict(saved, patients=saved["patients"][:-1])
    path.write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match="differ"):
        load_folds(store)
    leak = json.loads(json.dumps(saved))
    leak["protocols"]["holdout"]["folds"][0]["test"].append(
        leak["protocols"]["holdout"]["folds"][0]["train"][0])
    path.write_text(json.dumps(leak))
    with pytest.raises(ValueError, match="both train and test"):
        load_folds(store, split="holdout")
    old = {"n_folds": 5, "seed": 2026, "folds": [{"train": [], "val": [], "test": []}]}
    path.write_text(json.dumps(old))
    assert load_folds(store) == load_folds(store, split="kfold")
    assert json.loads((store / "folds.json.v1").read_text()) == old  # kept, not deleted
    assert "former folds" in capsys.readouterr().err
    assert json.loads(path.read_text()) == saved
    with pytest.raises(ValueError, match="unknown split"):
        load_folds(store, split="loo")


def test_too_few_patients_for_kfold_is_a_clear_error(tmp_path):
    store = build_store(tmp_path / "s", patient_list(6, 0))
    with pytest.raises(ValueError, match="no kfold split.*6 patients cannot make 5 folds"):
        load_folds(store)
    assert len(load_folds(store, split="holdout")) == 1


def test_data_prep_writes_the_folds_of_the_lgg_layout(tmp_path):
    """data_prep --source lgg (the study's dataset layout): folds.json is there before training,
    the patients are the folder names and the strata their positive-slice fractions."""
    from PIL import Image

    from nvfp4bench.data.prep import main
    slices = patient_list(12, 5)
    for pid, flags in slices.items():
        folder = tmp_path / "kaggle_3m" / pid
        folder.mkdir(parents=True)
        for n, flag in enumerate(flags[:6], start=1):  # a few slices each keep it fast
            Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(folder / f"{pid}_{n}.tif")
            mask = np.zeros((8, 8), np.uint8)
            mask[2:4, 2:4] = 255 * flag
            Image.fromarray(mask).save(folder / f"{pid}_{n}_mask.tif")
    out = tmp_path / "store"
    assert main(["--source", "lgg", "--input", str(tmp_path), "--output", str(out),
                 "--image-size", "8", "--no-progress"]) == 0
    saved = json.loads((out / "folds.json").read_text())
    kept = {p: f[:6] for p, f in slices.items()}
    assert saved["positive_fraction"] == {p: sum(f) / len(f) for p, f in sorted(kept.items())}
    want = study_splits(kept)
    got = saved["protocols"]["holdout"]["folds"][0]
    assert {k: got[k] for k in ("train", "val", "test")} == \
           {k: want["holdout"][0][k] for k in ("train", "val", "test")}
    assert SliceStore(out).patients == sorted(slices)


def test_the_embedded_store_is_built_with_its_folds(store_dir):
    """data_prep writes folds.json with the store (the embedded store takes the same path)."""
    saved = json.loads((store_dir / "folds.json").read_text())
    assert sorted(saved["patients"]) == sorted(SliceStore(store_dir).patients)
    assert len(load_folds(store_dir)) == 5 and len(load_folds(store_dir, split="holdout")) == 1
