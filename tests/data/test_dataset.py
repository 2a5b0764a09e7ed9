"""The torch Dataset of store slices (data/dataset.py)."""
import numpy as np
import torch

from nvfp4bench.data import (SliceDataset, SliceStore, load_folds,
                             patient_volumes)
from nvfp4bench.data.dataset import IMAGENET_MEAN, IMAGENET_STD, channel_stats


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
