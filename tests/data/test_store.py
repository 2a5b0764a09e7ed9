"""The slice store (data/store.py) and the embedded default store (data/prep.py)."""
import json

import numpy as np
import pytest
import torch

from nvfp4bench.data import SliceDataset, SliceStore, ensure_synthetic_store
from nvfp4bench.data.preprocess import CaseSlices
from nvfp4bench.data.store import StoreWriter, is_store
from tests.data.conftest import N_PATIENTS


def test_ensure_synthetic_store_builds_once_and_checks_parameters(store_dir):
    store = SliceStore(store_dir)
    assert store.synthetic and store.name == "synthetic" and store.image_size == 32
    assert len(store.patients) == N_PATIENTS and store.channels == 3
    assert store.spacing is not None and len(store.fingerprint) == 32
    counts = [store.record(p)["slices"] for p in store.patients]
    assert min(counts) >= 8 and max(counts) <= 25
    mtime = (store_dir / "index.json").stat().st_mtime_ns
    assert ensure_synthetic_store(store_dir, patients=N_PATIENTS, image_size=32) == store_dir
    assert (store_dir / "index.json").stat().st_mtime_ns == mtime  # not rebuilt
    with pytest.raises(ValueError, match="built with"):
        ensure_synthetic_store(store_dir, patients=N_PATIENTS + 1, image_size=32)


def test_store_accessors_are_consistent(store_dir):
    store = SliceStore(store_dir)
    p = store.patients[1]
    idx = store.slice_indices([p])
    assert all(store.patient_of(i) == p for i in idx)
    pos = [store.slice_position(i) for i in idx]
    assert pos == sorted(pos) and len(set(pos)) == len(pos)
    img = store.image(idx[0])
    assert img.shape == (3, 32, 32) and img.dtype == np.float32 and 0 <= img.min() <= img.max() <= 1
    assert set(np.unique(store.mask(idx[0]))) <= {0, 1}
    rec = store.record(p)
    assert rec["uniform_gap"] and set(np.diff(pos)) == {rec["slice_gap"]}
    assert rec["spacing"][0] == rec["slice_gap"] * rec["voxel_spacing"][0]
    burden = store.record(p)["tumour_voxels"]
    assert (burden > 0) == any(store.mask(i).any() for i in store.slice_indices([p])) or burden < 50


# ---------------------------------------------------------------- store atomicity
def _case(cid, n=3, size=8):
    rng = np.random.default_rng(len(cid))
    return CaseSlices(cid, rng.integers(0, 255, (n, 2, size, size), dtype=np.uint8),
                      rng.integers(0, 2, (n, size, size), dtype=np.uint8),
                      np.arange(n, dtype=np.int32), 5, None, n, (size, size), None)


def test_interrupted_writer_leaves_no_store(tmp_path):
    target = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(target, image_size=8, modalities=("t1", "t2")) as w:
            w.add(_case("a"))
            raise KeyboardInterrupt  # Ctrl-C mid-run
    assert not target.exists() and list(tmp_path.iterdir()) == []
    # a hard kill (no cleanup) leaves only a hidden temp dir, which is not a store
    w = StoreWriter(target, image_size=8, modalities=("t1", "t2"))
    w.add(_case("a"))
    assert not target.exists() and not is_store(w.tmp)
    with pytest.raises(FileNotFoundError, match="not a slice store"):
        SliceStore(w.tmp)
    w.add(_case("bb"))
    w.finalize({"name": "t", "synthetic": False})
    store = SliceStore(target)
    assert store.patients == ["a", "bb"] and len(store) == 6
    np.testing.assert_array_equal(store.images[3:], _case("bb").images)


def test_damaged_store_is_refused(tmp_path):
    with StoreWriter(tmp_path / "s", image_size=8, modalities=("t1", "t2")) as w:
        w.add(_case("a"))
        w.finalize({"name": "t", "synthetic": False})
    np.save(tmp_path / "s" / "masks.npy", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="damaged"):
        SliceStore(tmp_path / "s")




def test_store_pickles_by_path_for_dataloader_workers(store_dir):
    import pickle

    store = SliceStore(store_dir)
    again = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) < 1000  # the path, not the arrays
    assert isinstance(again.images, np.memmap) and again.fingerprint == store.fingerprint
    ds = SliceDataset(store, store.patients[:2])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1)
    images, masks, idx = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and idx.tolist() == ds.indices[:4].tolist()


# ---------------------------------------------------------------- integrity
def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("array", ["images", "masks", "positions", "patient"])
def test_a_store_whose_bytes_changed_is_refused_naming_the_file(tmp_path, capsys, array):
    from nvfp4bench.data.prep import main as prep_main
    store = ensure_synthetic_store(tmp_path / "s", patients=4, image_size=16, progress=False)
    SliceStore(store).verify()                                  # as built: accepted
    assert set(SliceStore(store).index["checksums"]) == {f"{k}.npy" for k in
                                                         ("images", "masks", "positions",
                                                          "patient")}
    _flip_last_byte(store / f"{array}.npy")
    with pytest.raises(ValueError, match=f"{array}.npy: its bytes changed") as e:
        SliceStore(store).verify()                              # the cache sees the new mtime
    assert "\n" not in str(e.value)
    assert prep_main(["--verify", str(store)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{array}.npy" in err


def test_a_store_without_recorded_checksums_is_checked_against_its_fingerprint(tmp_path):
    store = ensure_synthetic_store(tmp_path / "s", patients=4, image_size=16, progress=False)
    index = json.loads((store / "index.json").read_text())
    del index["checksums"]                                      # as built by an older version
    (store / "index.json").write_text(json.dumps(index))
    SliceStore(store).verify()
    _flip_last_byte(store / "masks.npy")
    with pytest.raises(ValueError, match="does not match its fingerprint"):
        SliceStore(store).verify()


def test_training_refuses_a_damaged_store_before_building_a_model(tmp_path):
    from nvfp4bench.config import RunConfig
    from nvfp4bench.train.setup import setup
    store = ensure_synthetic_store(tmp_path / "s", patients=10, image_size=16, progress=False)
    _flip_last_byte(store / "images.npy")
    config = RunConfig(arch="cnn", scale="tiny", recipe="baseline", fold=0, data=str(store),
                       out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="images.npy: its bytes changed"):
        setup(config)
    assert not (tmp_path / "out").exists()
