"""Per-volume preprocessing known answers (data/preprocess.py)."""
import numpy as np

from nvfp4bench.data.preprocess import SliceRule, normalise, select_slices


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
