"""Synthetic generator, store, folds, Dataset and augmentation (the embedded default path)."""
import json

import numpy as np
import pytest
import torch

from nvfp4bench.data import (SliceDataset, SliceStore, ensure_synthetic_store, load_folds,
                             patient_volumes, synthetic)
from nvfp4bench.data.augment import AugParams, apply, augment
from nvfp4bench.data.dataset import IMAGENET_MEAN, IMAGENET_STD, channel_stats
from nvfp4bench.data.preprocess import CaseSlices, SliceRule, normalise, select_slices
from nvfp4bench.data.store import StoreWriter, is_store

N_PATIENTS = 10  # the fewest that make 5 folds with a val and a test patient each


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "store"
    return ensure_synthetic_store(path, patients=N_PATIENTS, image_size=32, progress=False)


# ---------------------------------------------------------------- synthetic generator
def test_synthetic_same_seed_same_bytes_other_seed_differs():
    a, seg_a, _ = synthetic.simulate_case(7, 3, voxel_mm=4.0)
    b, seg_b, _ = synthetic.simulate_case(7, 3, voxel_mm=4.0)
    c, seg_c, _ = synthetic.simulate_case(8, 3, voxel_mm=4.0)
    assert all(a[m].tobytes() == b[m].tobytes() for m in a) and seg_a.tobytes() == seg_b.tobytes()
    assert any(a[m].tobytes() != c[m].tobytes() for m in a)


def test_synthetic_case_is_brats_like():
    infos = []
    for i in range(12):
        images, seg, info = synthetic.simulate_case(2026, i, voxel_mm=4.0)
        assert seg.shape == synthetic.grid_shape(4.0) == (60, 60, 39)
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 4}
        brain = images["t1"] > 0
        assert all((images[m] > 0).sum() == brain.sum() for m in images)  # one skull-strip mask
        assert not (seg[~brain]).any()  # tumour inside the brain
        assert not info["procedural_template"]
        if (seg == 4).any():  # enhancing tumour is brighter on T1ce than on T1 (relative to WM)
            wm = (seg == 0) & brain
            def ratio(m):
                return images[m][seg == 4].mean() / images[m][wm].mean()
            assert ratio("t1ce") > ratio("t1")
        if (seg == 2).any():  # edema is bright on FLAIR
            assert images["flair"][seg == 2].mean() > images["flair"][(seg == 0) & brain].mean()
        infos.append(info)
    lesions = [i["lesions"] for i in infos]
    assert 0 in lesions and max(lesions) >= 2  # tumour-free patients and several lesions


def test_procedural_fallback_warns_only_without_the_template(monkeypatch):
    def clear():
        synthetic._template_1mm.cache_clear()
        synthetic.load_template.cache_clear()

    clear()
    monkeypatch.setattr(synthetic, "template_dir", lambda: None)
    try:
        with pytest.warns(UserWarning, match="procedural"):
            images, seg, info = synthetic.simulate_case(1, 0, voxel_mm=8.0)
        assert info["procedural_template"] and (images["t1"] > 0).mean() > 0.1
    finally:
        clear()


def test_template_is_found_without_importing_nilearn():
    import sys
    assert synthetic.template_dir() is not None
    assert "nilearn" not in sys.modules


# ---------------------------------------------------------------- embedded default store
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


# ---------------------------------------------------------------- preprocessing known answers
def test_normalise_known_answer():
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, :2, :2] = [[1, 3], [1, 3]]  # brain mean 2, std 1
    u = normalise(x)
    np.testing.assert_allclose(u[0, 0, :2, :2], [[0.5 - 1 / 6, 0.5 + 1 / 6]] * 2, rtol=1e-6)
    assert (u[0, 0, 2:] == 0).all() and (u[0, 0, :, 2:] == 0).all()  # background stays 0


def test_select_slices_rules():
    brain = np.array([0, 10, 50, 100, 90, 40, 5, 0])
    tumour = np.array([0, 0, 0, 4, 3, 0, 0, 0])
    assert select_slices(brain, tumour, SliceRule("brain", 0.25)).tolist() == [2, 3, 4, 5]
    assert select_slices(brain, tumour, SliceRule("brain", 0.25, stride=2)).tolist() == [2, 4]
    assert select_slices(brain, tumour, SliceRule("tumour", 0.25, free_ratio=0.5)).tolist() == [2, 3, 4]
    assert select_slices(brain, tumour, SliceRule("all")).tolist() == list(range(8))
    assert select_slices(brain, 0 * tumour, SliceRule("tumour", 0.25)).tolist() == [2, 3, 4, 5]


# ---------------------------------------------------------------- folds (tests/data/test_folds.py)
def test_the_embedded_store_is_built_with_its_folds(store_dir):
    """data_prep writes folds.json with the store (the embedded store takes the same path)."""
    saved = json.loads((store_dir / "folds.json").read_text())
    assert sorted(saved["patients"]) == sorted(SliceStore(store_dir).patients)
    assert len(load_folds(store_dir)) == 5 and len(load_folds(store_dir, split="holdout")) == 1


# ---------------------------------------------------------------- Dataset
def test_dataset_items_shapes_ranges_and_indices(store_dir):
    store = SliceStore(store_dir)
    folds = load_folds(store_dir)
    ds = SliceDataset(store, folds[0]["val"])
    assert len(ds) == len(store.slice_indices(folds[0]["val"]))
    mean, std = channel_stats(3)
    for k in range(0, len(ds), 5):
        image, mask, i = ds[k]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert store.patient_of(i) in folds[0]["val"]
        u = image * std + mean
        assert -1e-5 <= u.min() and u.max() <= 1 + 1e-5
        np.testing.assert_allclose(u.numpy(), store.image(i), atol=1e-5)
        np.testing.assert_array_equal(mask[0].numpy(), store.mask(i))
    big = SliceDataset(store, folds[0]["val"], image_size=64)
    assert big[0][0].shape == (3, 64, 64) and big[0][1].shape == (1, 64, 64)
    assert torch.allclose(channel_stats(3)[0].flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(channel_stats(2)[1].flatten(), torch.tensor([sum(IMAGENET_STD) / 3] * 2))


def test_dataset_augmentation_deterministic_per_seed_epoch_index(store_dir):
    store = SliceStore(store_dir)
    patients = store.patients[:3]
    a = SliceDataset(store, patients, augment=True, seed=5)
    b = SliceDataset(store, patients, augment=True, seed=5)
    for e in (0, 1):
        a.set_epoch(e)
        b.set_epoch(e)
        for k in range(len(a)):
            assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
    a.set_epoch(0)
    first = [a[k][0] for k in range(len(a))]
    a.set_epoch(1)
    assert any(not torch.equal(x, a[k][0]) for k, x in enumerate(first))


def test_patient_volumes_restacks_in_z_order(store_dir):
    store = SliceStore(store_dir)
    idx = store.slice_indices(store.patients[:2])[::-1]  # reversed on purpose
    vols = patient_volumes(store, idx, np.array(idx))
    assert set(vols) == set(store.patients[:2])
    for p, (pos, vals) in vols.items():
        assert list(pos) == sorted(pos)
        assert [store.slice_position(int(i)) for i in vals] == list(pos)


# ---------------------------------------------------------------- augmentation geometry
def _blob():
    m = torch.zeros(1, 32, 32)
    m[0, 5:12, 8:20] = 1
    m[0, 20:26, 3:6] = 1
    return m


def test_flips_and_quarter_turn_known_answers():
    mask = _blob()
    image = torch.cat([mask, 0.5 * mask, torch.rand(1, 32, 32)])
    p = AugParams(True, True, None, None, None, None, None)
    img2, m2 = apply(image, mask, p)
    assert torch.equal(m2, mask.flip(-1).flip(-2)) and torch.equal(img2, image.flip(-1).flip(-2))
    q = AugParams(False, False, None, None, (0.0, 0.0), 1.0, 90.0)
    img3, m3 = apply(image, mask, q)
    turned = [torch.rot90(mask, k, dims=(-2, -1)) for k in (1, 3)]
    assert any(torch.equal(m3, t) for t in turned)  # pixel centres map onto pixel centres
    assert torch.allclose(img3[:1], m3, atol=1e-5)  # the image turned the same way


def test_random_augmentation_moves_image_and_mask_together():
    mask = _blob()
    image = torch.cat([mask, mask, mask])
    moved = 0
    for index in range(40):
        img, m = augment(image, mask, seed=1, epoch=0, index=index)
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        agree = ((img[1] > 0.5) == (m[0] > 0.5)).float().mean()
        assert agree > 0.97
        moved += not torch.equal(m, mask)
    assert moved > 20
    a = augment(image, mask, seed=1, epoch=3, index=7)
    b = augment(image, mask, seed=1, epoch=3, index=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


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
